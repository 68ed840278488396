"""Quality benchmark: a Shapes preset (any algorithm), before and after, strict and clean, with hacking monitors.

Runs ``rewardflow train PRESET`` into a fresh run folder (the run evaluates the base at iteration 0, the EMA weights
every ``eval_every`` iterations if the preset sets it, and at the end; the report compares the first and the last),
then measures the KL of the tuned policy to the base along its own SDE rollouts
on the evaluation prompts, and writes a Markdown report with per-category before/after tables, the two-object
prompts split by pair of shapes, colour and shape histograms and detections per image, plus the raw numbers as JSON.

    python benchmarks/shapes_grpo.py shapes_grpo_cpu --out benchmarks/results
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import torch

from rewardflow.algorithms import grpo
from rewardflow.build import load_trained_policy
from rewardflow.data.prompts import load_prompts
from rewardflow.presets import get_preset
from rewardflow.train import train


@torch.no_grad()
def kl_to_base(run_dir: Path, seed: int = 0, probe: grpo.GRPOConfig | None = None) -> float:
    """Mean code-form KL per trained step between the tuned policy (EMA weights) and the base.

    Measured along Flow-GRPO SDE rollouts of the tuned policy: with ``probe``'s SDE and CFG scale when given
    (one probe for every run makes runs comparable), else with the run's own ``grpo`` section at the
    evaluation's CFG scale (for DiffusionNFT, which never uses this SDE, it is a distance between the models).
    """
    policy, cfg = load_trained_policy(run_dir)
    prompts = [r.prompt for r in load_prompts(cfg.eval.prompts)]
    gcfg = probe or dataclasses.replace(cfg.grpo, guidance_scale=cfg.eval.guidance_scale)
    n = len(prompts)
    cond = policy.encode_prompts(prompts)
    batch = grpo.collect(policy, cond, gcfg, torch.Generator().manual_seed(seed))
    kls = [
        grpo.step_terms(policy, batch, slice(i, i + gcfg.micro_batch), j, gcfg, need_reference=True)[1].mean().item()
        for i in range(0, n, gcfg.micro_batch)
        for j in batch.trained_steps
    ]
    return sum(kls) / len(kls)


def write_results(out: str | Path, name: str, rows: list, lines: list[str]) -> None:
    """``OUT/NAME-TIMESTAMP.json`` (the raw rows) and ``.md`` (the table lines) of one benchmark run."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (folder / f"{name}-{stamp}.json").write_text(json.dumps(rows, indent=2))
    (folder / f"{name}-{stamp}.md").write_text("\n".join(lines) + "\n")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def table(before: dict, after: dict, key: str) -> list[str]:
    cats = list(before[key])
    lines = ["| category | base | tuned | change |", "|---|---|---|---|"]
    for c in cats:
        b, a = before[key][c], after[key][c]
        lines.append(f"| {c} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    ov = "overall" if key == "categories" else "clean_overall"
    lines.append(f"| **overall** | **{before[ov]:.3f}** | **{after[ov]:.3f}** | **{after[ov] - before[ov]:+.3f}** |")
    return lines


def pair_table(before: dict, after: dict) -> list[str]:
    """Strict accuracy base -> tuned by pair of shapes and category (empty for reports written before the split)."""
    if "shape_pairs" not in before or "shape_pairs" not in after:
        return []
    cats = list(after["shape_pairs"])
    pairs = sorted({p for c in cats for p in after["shape_pairs"][c]})
    lines = ["Strict accuracy of the prompts that name two objects, by their pair of shapes (base -> tuned):", ""]
    lines += ["| pair | " + " | ".join(cats) + " |", "|---" * (1 + len(cats)) + "|"]

    def cell(rep: dict, c: str, p: str) -> str:
        value = rep["shape_pairs"].get(c, {}).get(p)
        return "-" if value is None else f"{value:.2f}"

    for p in pairs:
        cells = [f"{cell(before, c, p)} -> {cell(after, c, p)}" if p in after["shape_pairs"][c] else "" for c in cats]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return lines + [""]


def report(preset: str, run: Path, wall: float | None, kl: float) -> tuple[str, dict]:
    evals = sorted((run / "eval").glob("iter_*.json"))
    before, after = json.loads(evals[0].read_text()), json.loads(evals[-1].read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [m for m in metrics if "reward" in m]
    train_seconds = sum(m["time_iteration"] for m in train_rows)
    # The commit the run trained at (meta.json), not the one the report is written at.
    meta = json.loads((run / "meta.json").read_text()) if (run / "meta.json").exists() else {}
    commit = (meta.get("git_commit") or "unknown")[:7]
    hist = [
        "| | "
        + " | ".join(before["histogram"]["colors"])
        + " | "
        + " | ".join(before["histogram"]["shapes"])
        + " | blobs |"
    ]
    hist.append("|---" * (2 + len(before["histogram"]["colors"]) + len(before["histogram"]["shapes"])) + "|")
    for name, rep in (("base", before), ("tuned", after)):
        h = rep["histogram"]
        hist.append(
            f"| {name} | " + " | ".join(str(v) for v in h["colors"].values()) + " | "
            + " | ".join(str(v) for v in h["shapes"].values()) + f" | {h['blobs']} |"
        )  # fmt: skip
        dets = ", ".join(f"{c} {v:.2f}" for c, v in rep["detections_per_image"].items())
        hist.append(f"<!-- {name} detections per image: {dets} -->")
    lines = [
        f"### `{preset}` ({dt.date.today().isoformat()}, commit {commit})",
        "",
        f"- Command: `python benchmarks/shapes_grpo.py {preset}{'' if wall is not None else ' --report-only'}` "
        f"(run folder `{run}`)",
        f"- Machine: {machine()}",
        f"- Training: {len(train_rows)} iterations in **{train_seconds / 60:.1f} min** of training loop"
        + (f" ({wall / 60:.1f} min wall including the {len(evals)} evaluations)" if wall is not None else ""),
        f"- Evaluation: {before['num_prompts']} prompts x {before['samples_per_prompt']} samples, "
        f"{before['settings']['num_steps']} Euler steps, CFG {before['settings']['guidance_scale']}, EMA weights",
        f"- Strict overall **{before['overall']:.3f} -> {after['overall']:.3f}** "
        f"({100 * (after['overall'] - before['overall']):+.1f} points); clean overall "
        f"**{before['clean_overall']:.3f} -> {after['clean_overall']:.3f}** "
        f"({100 * (after['clean_overall'] - before['clean_overall']):+.1f} points)",
        f"- Held-out combinations (strict): {before['held_out_strict']:.3f} -> {after['held_out_strict']:.3f}; "
        f"seen: {before['seen_strict']:.3f} -> {after['seen_strict']:.3f}",
        f"- KL to the base (code form, mean per trained step on the tuned policy's rollouts): {kl:.3e}",
        f"- Mean training reward: first iteration {train_rows[0]['reward']:.3f}, "
        f"last 5 {sum(m['reward'] for m in train_rows[-5:]) / 5:.3f}",
        "",
        "Strict accuracy (GenEval semantics):",
        "",
        *table(before, after, "categories"),
        "",
        "Clean accuracy (strict and nothing unrequested):",
        "",
        *table(before, after, "clean_categories"),
        "",
        *pair_table(before, after),
        "Detected colours and shapes over all evaluation images (reward hacking would show here):",
        "",
        *hist,
        "",
        "Detections per image, base -> tuned: "
        + ", ".join(
            f"{c} {before['detections_per_image'][c]:.2f} -> {after['detections_per_image'][c]:.2f}"
            for c in before["detections_per_image"]
        ),
        "",
    ]
    raw = {"preset": preset, "before": before, "after": after, "kl_to_base": kl, "train_seconds": train_seconds}
    return "\n".join(lines), raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--run-dir", default=None, help="default: runs/bench-PRESET-TIMESTAMP")
    parser.add_argument("--report-only", action="store_true", help="re-read an existing --run-dir")
    args = parser.parse_args()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run = Path(args.run_dir or f"runs/bench-{args.preset}-{stamp}")
    t0 = time.time()
    if not args.report_only:
        cfg = get_preset(args.preset)
        cfg.run_dir = str(run)
        train(cfg)
    wall = None if args.report_only else time.time() - t0
    text, raw = report(args.preset, run, wall, kl_to_base(run))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.preset}-{stamp}.md").write_text(text)
    (out / f"{args.preset}-{stamp}.json").write_text(json.dumps(raw, indent=2))
    print(text)


if __name__ == "__main__":
    main()
