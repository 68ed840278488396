"""Side-by-side studies from the same base: the online methods, or the direct-gradient methods.

``--family online`` (default): Flow-GRPO, Flow-GRPO-Fast, DanceGRPO, MixGRPO and DiffusionNFT.
``--family direct``: DRaFT-1, DRaFT-LV, ReFL, AlignProp and LeapAlign against their presets' learned reward
(``shapes-count``).

Each method's Shapes preset trains into its own run folder for the same wall-clock budget (or until its
iterations are done), evaluated every few iterations. Then, per method: strict and clean accuracy (per
category) against iterations and against training minutes, the training time to a target gain over the
method's own base evaluation, the KL of the last checkpoint to the base, and sample diversity. For the direct
family also the learned reward on the evaluation images at each evaluation (next to the judge's accuracy, the
truth it stands in for), where the judge's accuracy peaked while the learned reward went on rising, and the
activation memory of one training step. Writes a Markdown report, the raw numbers as JSON and a plot.

    python benchmarks/study.py --minutes 24 --parallel 2 --threads 1 --out benchmarks/results
    python benchmarks/study.py --family direct --minutes 12 --parallel 2 --threads 1

On a CPU give each run one thread and run no more at a time than cores, so every method gets one core;
training minutes exclude the evaluations. ``--report-only --runs DIR`` re-reads the runs of an earlier study.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from direct_memory import step_memory  # noqa: E402
from shapes_grpo import kl_to_base, machine  # noqa: E402

from rewardflow.algorithms.grpo import GRPOConfig  # noqa: E402
from rewardflow.build import build_policy, load_trained_policy  # noqa: E402
from rewardflow.config import apply_overrides  # noqa: E402
from rewardflow.data.prompts import load_prompts  # noqa: E402
from rewardflow.evaluate import generate  # noqa: E402
from rewardflow.models.protocol import FlowPolicy  # noqa: E402
from rewardflow.presets import get_preset  # noqa: E402
from rewardflow.rewards import build_reward  # noqa: E402

# One KL probe for every method: Flow-GRPO's SDE (a = 1.0, 10 steps, all 9 SDE steps) without CFG, so the
# number is a distance between the tuned and the base model that does not depend on a method's own sampler.
KL_PROBE = GRPOConfig(num_steps=10, noise_level=1.0, guidance_scale=1.0, micro_batch=60)

FAMILIES = {
    "online": {
        "Flow-GRPO": "shapes_grpo_cpu",
        "Flow-GRPO-Fast": "shapes_grpo_fast_cpu",
        "DanceGRPO": "shapes_dance_cpu",
        "MixGRPO": "shapes_mix_cpu",
        "DiffusionNFT": "shapes_nft_cpu",
    },
    "direct": {
        "DRaFT-1": "shapes_draft_cpu",
        "DRaFT-LV": "shapes_draft_lv_cpu",
        "ReFL": "shapes_refl_cpu",
        "AlignProp": "shapes_alignprop_cpu",
        "LeapAlign": "shapes_leapalign_cpu",
    },
}


@torch.no_grad()
def diversity(policy: FlowPolicy, eval_cfg, prompts: int = 60) -> float:
    """Mean over prompts of the RMS pixel distance between two samples of the same prompt (all pairs)."""
    names = [r.prompt for r in load_prompts(eval_cfg.prompts)][:prompts]
    per = eval_cfg.samples_per_prompt
    images = generate(policy, [p for p in names for _ in range(per)], eval_cfg).view(len(names), per, -1)
    pairs = list(itertools.combinations(range(per), 2))
    dists = [((images[:, i] - images[:, j]) ** 2).mean(dim=1).sqrt() for i, j in pairs]
    return torch.stack(dists).mean().item()


def study_config(preset: str, runs: Path, args: argparse.Namespace):
    """The preset as the study runs it: its own run folder, evaluated and saved every ``--eval-every``."""
    common = [f"run_dir={runs / preset}", f"eval_every={args.eval_every}", f"save_every={args.eval_every}"]
    return apply_overrides(get_preset(preset), [*common, f"threads={args.threads}", *args.set])


def run_all(presets: list[str], runs: Path, args: argparse.Namespace) -> None:
    """Train every preset, ``args.parallel`` at a time, each stopped after ``args.minutes``."""
    for p in presets:
        study_config(p, runs, args)  # a bad --set fails before anything starts
        if (runs / p).exists():
            raise FileExistsError(f"{runs / p} exists (an earlier study?); pick another --runs folder")
    runs.mkdir(parents=True, exist_ok=True)
    kept = ("family", "minutes", "parallel", "threads", "eval_every", "set")
    (runs / "study_args.json").write_text(json.dumps({k: getattr(args, k) for k in kept}, indent=2))
    queue, active = list(presets), {}
    while queue or active:
        while queue and len(active) < args.parallel:
            p = queue.pop(0)
            log = (runs / f"{p}.log").open("w")
            cmd = [sys.executable, __file__, "--child", p, "--runs", str(runs)]
            cmd += ["--threads", str(args.threads), "--eval-every", str(args.eval_every)]
            cmd += [f"--set={o}" for o in args.set]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            active[p] = (proc, log, time.time() + 60 * args.minutes)
            print(f"started {p}", flush=True)
        time.sleep(2)
        for p, (proc, log, deadline) in list(active.items()):
            if proc.poll() is None and time.time() < deadline:
                continue
            if proc.poll() is None:
                proc.terminate()
            proc.wait()
            log.close()
            del active[p]
            print(f"finished {p} (exit code {proc.returncode})", flush=True)


def curve(run: Path) -> list[dict]:
    """Evaluations of a run with the training seconds spent before each."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds, spent = {0: 0.0}, 0.0
    for m in rows:
        if "reward" in m:
            spent += m["time_iteration"]
            seconds[m["iteration"]] = spent
    points = []
    for f in sorted((run / "eval").glob("iter_*.json")):
        it = int(f.stem.split("_")[1])
        rep = json.loads(f.read_text())
        points.append(
            {
                "iteration": it,
                "minutes": seconds[it] / 60,
                "strict": rep["overall"],
                "clean": rep["clean_overall"],
                "categories": rep["categories"],
                "rewards": rep.get("rewards", {}),
                "settings": {**rep["settings"], "num_prompts": rep["num_prompts"], "per": rep["samples_per_prompt"]},
            }
        )
    return points


def summarise(name: str, preset: str, run: Path, target_gain: float) -> dict:
    points = curve(run)
    base, last = points[0], points[-1]
    hit = next((p for p in points if p["strict"] >= base["strict"] + target_gain), None)
    best = max(points, key=lambda p: p["strict"])
    tuned, cfg = load_trained_policy(run)
    extra = {}
    if cfg.method().monitored:  # a direct-gradient method
        prompts = [r.prompt for r in load_prompts(cfg.eval.prompts)][: cfg.algo.micro_batch]
        reward = build_reward(cfg.reward)
        extra["step_memory"] = step_memory(
            build_policy(cfg.model), cfg.algorithm, cfg.algo, reward, prompts, str(cfg.model.resolved_device())
        )
        extra["learned"] = learned_vs_judge(points, cfg.reward.names[0])
    return {
        **extra,
        "method": name,
        "preset": preset,
        "points": points,
        "iterations": last["iteration"],
        "sec_per_iteration": 60 * last["minutes"] / max(1, last["iteration"]),
        "eval_guidance": base["settings"]["guidance_scale"],
        "time_to_target": None if hit is None else {"minutes": hit["minutes"], "iteration": hit["iteration"]},
        "best": {"strict": best["strict"], "iteration": best["iteration"]},
        "kl_to_base": kl_to_base(run, probe=KL_PROBE),
        "stopped": "iterations" if last["iteration"] >= cfg.iterations else "time",
        "diversity_base": diversity(build_policy(cfg.model), cfg.eval),
        "diversity_tuned": diversity(tuned, cfg.eval),
    }


def learned_vs_judge(points: list[dict], name: str) -> dict:
    """The learned reward at the base, at the judge's best evaluation and at the last, and how it moved after."""
    best = max(points, key=lambda p: p["strict"])
    first, last = points[0], points[-1]
    return {
        "name": name,
        "base": first["rewards"][name],
        "at_best_judge": best["rewards"][name],
        "last": last["rewards"][name],
        "best_judge_iteration": best["iteration"],
        "judge_after_best": last["strict"] - best["strict"],
    }


def plot(results: list[dict], path: Path) -> None:
    if "learned" in results[0]:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4))
        for r in results:
            name = r["learned"]["name"]
            axes[2].plot(
                [p["rewards"][name] for p in r["points"]], [p["strict"] for p in r["points"]], marker="o", ms=3
            )
        axes[2].set_xlabel(f"learned reward ({results[0]['learned']['name']}) on the evaluation images")
        axes[2].set_ylabel("judge strict accuracy")
        axes[2].grid(alpha=0.3)
    else:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        xs_it = [p["iteration"] for p in r["points"]]
        xs_min = [p["minutes"] for p in r["points"]]
        ys = [p["strict"] for p in r["points"]]
        label = f"{r['method']} (eval CFG {r['eval_guidance']:g})"
        axes[0].plot(xs_it, ys, marker="o", ms=3, label=label)
        axes[1].plot(xs_min, ys, marker="o", ms=3, label=label)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("training minutes (evaluations excluded)")
    axes[0].set_ylabel("strict accuracy (Shapes evaluation set)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].sharey(axes[0])
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def strict_at(points: list[dict], minutes: float) -> float:
    """Strict accuracy at ``minutes`` of training, linearly interpolated between evaluations."""
    for a, b in zip(points, points[1:]):
        if a["minutes"] <= minutes <= b["minutes"]:
            f = (minutes - a["minutes"]) / max(1e-9, b["minutes"] - a["minutes"])
            return a["strict"] + f * (b["strict"] - a["strict"])
    return points[-1]["strict"]


def learned_table(results: list[dict]) -> list[str]:
    name = results[0]["learned"]["name"]
    lines = [
        "",
        f"Learned reward (`{name}`, mean on the evaluation images) against the judge's strict accuracy, and the "
        "activation memory one training step keeps for its backward pass (its micro-batch, on the run's device):",
        "",
        f"| method | {name} base -> last | judge best (it) | {name} at the judge's best | judge last - best | "
        "step memory |",
        "|---" * 6 + "|",
    ]
    for r in results:
        ln, mem = r["learned"], r["step_memory"]
        gpu = "" if mem["peak_gpu_mib"] is None else f", GPU peak {mem['peak_gpu_mib']:.0f} MiB"
        lines.append(
            f"| {r['method']} | {ln['base']:.3f} -> {ln['last']:.3f} | {r['best']['strict']:.3f} "
            f"({ln['best_judge_iteration']}) | {ln['at_best_judge']:.3f} | {100 * ln['judge_after_best']:+.1f} pts | "
            f"{mem['saved_mib']:.1f} MiB{gpu} |"
        )
    return lines


def report(results: list[dict], args: argparse.Namespace, runs: Path) -> str:
    ev = results[0]["points"][0]["settings"]
    common = min(r["points"][-1]["minutes"] for r in results)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    gain = 100 * args.target_gain
    lines = [
        f"### Side-by-side study of the {args.family} methods ({dt.date.today().isoformat()}, commit {commit})",
        "",
        f"- Command: `python benchmarks/study.py --family {args.family} --minutes {args.minutes:g} "
        f"--parallel {args.parallel} --threads {args.threads} --eval-every {args.eval_every} "
        f"--target-gain {args.target_gain:g}" + "".join(f" --set {o}" for o in args.set) + f"` (runs in `{runs}`)",
        f"- Machine: {machine()}; {args.threads} thread(s) per run, {args.parallel} run(s) at a time",
        f"- Each method: its preset, stopped after {args.minutes:g} minutes of wall-clock (evaluations included) or "
        f"at its last iteration; accuracy of the EMA weights on {ev['num_prompts']} evaluation prompts x "
        f"{ev['per']} samples, {ev['num_steps']} Euler steps, at each preset's evaluation CFG (the base scores "
        "differ with it); minutes are training-loop minutes, evaluations excluded",
        "- KL to base: code form per step along one probe SDE for every method (Flow-GRPO's, a = 1.0, 10 steps, "
        "no CFG) on the evaluation prompts; diversity: mean RMS pixel distance between two samples of one prompt",
        "",
        f"| method | preset | eval CFG | iterations (stopped by) | training min | s/it | base | strict at "
        f"{common:.1f} min | last | best (it) | time to +{gain:.0f} pts | KL to base | diversity base -> last |",
        "|---" * 13 + "|",
    ]
    for r in results:
        p0, pn = r["points"][0], r["points"][-1]
        ttt = r["time_to_target"]
        ttt_s = (
            f"not in {pn['minutes']:.1f} min" if ttt is None else f"{ttt['minutes']:.1f} min ({ttt['iteration']} it)"
        )
        at = strict_at(r["points"], common)
        lines.append(
            f"| {r['method']} | `{r['preset']}` | {r['eval_guidance']:g} | {r['iterations']} ({r['stopped']}) | "
            f"{pn['minutes']:.1f} | {r['sec_per_iteration']:.1f} | {p0['strict']:.3f} | "
            f"{at:.3f} ({100 * (at - p0['strict']):+.1f}) | "
            f"{pn['strict']:.3f} ({100 * (pn['strict'] - p0['strict']):+.1f}) | "
            f"{r['best']['strict']:.3f} ({r['best']['iteration']}) | {ttt_s} | {r['kl_to_base']:.2e} | "
            f"{r['diversity_base']:.3f} -> {r['diversity_tuned']:.3f} |"
        )
    cats = list(results[0]["points"][0]["categories"])
    lines += ["", "Per-category strict accuracy, base -> last evaluation:", ""]
    lines += ["| method | " + " | ".join(cats) + " |", "|---" * (len(cats) + 1) + "|"]
    for r in results:
        p0, pn = r["points"][0], r["points"][-1]
        lines.append(
            f"| {r['method']} | "
            + " | ".join(f"{p0['categories'][c]:.2f} -> {pn['categories'][c]:.2f}" for c in cats)
            + " |"
        )
    if "learned" in results[0]:
        lines += learned_table(results)
    by = {r["method"]: r for r in results}
    if "Flow-GRPO" in by and "DiffusionNFT" in by:
        g, n = by["Flow-GRPO"]["time_to_target"], by["DiffusionNFT"]["time_to_target"]
        head = f"NFT / Flow-GRPO training time to +{gain:.0f} points over each one's own base"
        if g and n:
            ratio = f"{head}: **{n['minutes'] / g['minutes']:.2f}**"
        else:
            ratio = f"{head}: not measurable (a method did not get there)"
        lines += ["", ratio + " (NFT's base is evaluated without CFG, Flow-GRPO's with CFG 4.5)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=list(FAMILIES), default="online")
    parser.add_argument(
        "--methods",
        default="",
        help="comma-separated (default: all of the family's): "
        + "; ".join(f"{f}: {', '.join(m)}" for f, m in FAMILIES.items()),
    )
    parser.add_argument("--minutes", type=float, default=24.0, help="wall-clock budget per method")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--eval-every", type=int, default=12)
    parser.add_argument("--set", action="append", default=[], help="section.field=value for every method")
    parser.add_argument("--target-gain", type=float, default=0.05, help="strict accuracy gain over the base")
    parser.add_argument("--runs", default=None, help="default: runs/study-TIMESTAMP")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    runs = Path(args.runs or f"runs/study-{stamp}")
    if args.child:
        from rewardflow.train import train

        train(study_config(args.child, runs, args))
        return
    methods = FAMILIES[args.family]
    names = [m.strip() for m in args.methods.split(",") if m.strip()] or list(methods)
    unknown = [m for m in names if m not in methods]
    if unknown:
        raise ValueError(f"unknown {args.family} methods {unknown}; choose from {', '.join(methods)}")
    presets = [methods[m] for m in names]
    if not args.report_only:
        run_all(presets, runs, args)
    elif (runs / "study_args.json").is_file():  # report the settings the runs were made with
        vars(args).update(json.loads((runs / "study_args.json").read_text()))
    if args.threads:
        torch.set_num_threads(args.threads * args.parallel)
    results = [summarise(m, methods[m], runs / methods[m], args.target_gain) for m in names]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / f"study-{stamp}.png")
    text = report(results, args, runs)
    (out / f"study-{stamp}.md").write_text(text)
    (out / f"study-{stamp}.json").write_text(json.dumps(results, indent=2))
    print(text)


if __name__ == "__main__":
    main()
