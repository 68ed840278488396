"""Hyperparameter sweep: several variants of a training preset (any algorithm) side by side, in parallel.

Each variant is the preset with dotted overrides; every variant trains into its own run folder with
frequent evaluations until its iterations are done or the time budget runs out (then it is stopped and
its evaluations so far are kept). The summary is a table of strict / clean overall accuracy per variant
and evaluated iteration, written as Markdown and JSON.

    python benchmarks/sweep.py shapes_grpo_cpu --minutes 7 --eval-every 10 --out sweep \\
        --variant base --variant clip1e3:grpo.clip_range=1e-3 \\
        --variant long:grpo.kl_beta=0.04,grpo.optimizer_steps=2 --set model.device=cuda

Made for a GPU (the runs share it); on a CPU give each variant one thread (``--set threads=1``) and run
no more variants than cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rewardflow.config import apply_overrides
from rewardflow.presets import get_preset


def parse_variant(spec: str) -> tuple[str, list[str]]:
    name, _, rest = spec.partition(":")
    return name, [o for o in rest.split(",") if o]


def collect(run: Path) -> dict[str, Any]:
    evals = {}
    for f in sorted((run / "eval").glob("iter_*.json")):
        rep = json.loads(f.read_text())
        evals[int(f.stem.split("_")[1])] = {
            "overall": rep["overall"],
            "clean_overall": rep["clean_overall"],
            "categories": rep["categories"],
            "colors": rep["histogram"]["colors"],
            "blobs": rep["histogram"]["blobs"],
        }
    rows = []
    if (run / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [m for m in rows if "reward" in m]
    seconds = [m["time_iteration"] for m in train_rows]
    last = train_rows[-1] if train_rows else {}
    return {
        "evals": evals,
        "iterations": len(train_rows),
        "sec_per_iteration": sum(seconds) / len(seconds) if seconds else None,
        "clip_frac": sum(m["clip_frac"] for m in train_rows) / len(train_rows) if "clip_frac" in last else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset")
    parser.add_argument(
        "--variant", action="append", default=[], help="NAME or NAME:key=value,key=value (values without commas)"
    )
    parser.add_argument("--set", action="append", default=[], help="override for every variant")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget for all variants")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--runs", default="runs/sweep", help="parent folder of the variants' run folders")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    common = [*args.set, f"eval_every={args.eval_every}"]
    if args.iterations:
        common.append(f"iterations={args.iterations}")

    if args.child:  # one variant, in its own process
        from rewardflow.train import train

        name, overrides = parse_variant(args.child)
        cfg = apply_overrides(get_preset(args.preset), [*common, *overrides, f"run_dir={args.runs}/{name}"])
        train(cfg)
        return

    variants = [parse_variant(v) for v in args.variant] or [("base", [])]
    names = [name for name, _ in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique, got {names}")
    runs = Path(args.runs)
    for name, overrides in variants:  # fail before starting anything
        apply_overrides(get_preset(args.preset), [*common, *overrides])
        if (runs / name).exists():
            raise FileExistsError(f"{runs / name} exists (an earlier sweep?); pick another --runs folder")
    runs.mkdir(parents=True, exist_ok=True)
    procs, logs = {}, []
    for spec in args.variant or ["base"]:
        name = parse_variant(spec)[0]
        log = (runs / f"{name}.log").open("w")
        logs.append(log)
        cmd = [sys.executable, __file__, args.preset, "--child", spec, "--runs", args.runs]
        cmd += [f"--set={s}" for s in args.set] + ["--eval-every", str(args.eval_every)]
        cmd += ["--iterations", str(args.iterations)] if args.iterations else []
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60 * args.minutes
    while time.time() < deadline and any(p.poll() is None for p in procs.values()):
        time.sleep(2)
    for p in procs.values():
        if p.poll() is None:
            p.terminate()
    for p in procs.values():
        p.wait()
    for log in logs:
        log.close()
    summary = {
        name: {"overrides": overrides, "exit_code": procs[name].returncode, **collect(runs / name)}
        for name, overrides in variants
    }
    lines = [f"# Sweep of `{args.preset}` (common overrides: {', '.join(common)})", ""]
    for name, s in summary.items():
        evs = " ".join(f"{i}:{e['overall']:.3f}/{e['clean_overall']:.3f}" for i, e in s["evals"].items())
        sec = f"{s['sec_per_iteration']:.2f}" if s["sec_per_iteration"] else "-"
        clip = f"{s['clip_frac']:.2f}" if s["clip_frac"] is not None else "-"
        stopped = {0: "done", -15: "stopped at the time limit"}.get(s["exit_code"], f"FAILED ({name}.log)")
        what = ", ".join(s["overrides"]) or "preset"
        head = f"- {name} ({what}): {stopped}, {s['iterations']} it, {sec} s/it, clip {clip}"
        lines.append(f"{head}; strict/clean {evs}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sweep-{args.preset}.md").write_text("\n".join(lines) + "\n")
    (out / f"sweep-{args.preset}.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
