"""Fingerprints of short training runs, one per algorithm family: to show that a refactor changes no number.

Runs a few iterations of Flow-GRPO with GRPO-Guard, DanceGRPO, DiffusionNFT, DRaFT-LV and LeapAlign on the Shapes
presets (CLI overrides make them small: float32, one thread, 4 prompts x 4 images, 2 iterations), then prints the
SHA-256 of each run's ``metrics.jsonl`` (timings and the evaluation's settings left out) and of its saved weights.
Run it before a change (``--out before.json``) and after it (``--compare before.json``) on the same machine:
identical fingerprints mean the change kept every rollout, reward, update and evaluation bit for bit. Floating-point
sums differ between CPUs, so fingerprints are compared on one machine, not recorded in the repository.

    python benchmarks/fingerprint.py --out /tmp/before.json
    python benchmarks/fingerprint.py --compare /tmp/before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

COMMON = [
    "--threads",
    "1",
    "--model.no-autocast",
    "--model.no-compile",
    "--iterations",
    "2",
    "--prompts-per-iter",
    "4",
    "--group-size",
    "4",
    "--eval.num-steps",
    "3",
    "--eval.samples-per-prompt",
    "1",
    "--save-every",
    "2",
]
RUNS = {
    "grpo-guard": ["shapes_grpo_cpu", "--grpo.micro-batch", "8", "--grpo.num-steps", "4"],
    "dance": ["shapes_dance_cpu", "--grpo.micro-batch", "8"],
    "nft": ["shapes_nft_cpu", "--nft.micro-batch", "8", "--nft.num-steps", "4"],
    "draft-lv": ["shapes_draft_lv_cpu", "--draft.micro-batch", "8"],
    "leapalign": ["shapes_leapalign_cpu", "--leapalign.micro-batch", "8", "--leapalign.num-steps", "4"],
}  # fmt: skip


def digest(run: Path) -> dict[str, str]:
    """SHA-256 of the run's metrics (without timings) and of its newest saved weights."""
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.append({k: v for k, v in row.items() if not k.startswith("time") and k != "eval/settings"})
    metrics = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    # The tensors, not the file: safetensors writes its metadata in no fixed order.
    tensors = load_file(str(sorted((run / "checkpoints").glob("iter_*.safetensors"))[-1]))
    weights = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        weights.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        weights.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {"metrics": metrics, "weights": weights.hexdigest()}


def fingerprints(only: list[str]) -> dict[str, dict[str, str]]:
    out = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        for name in only:
            preset, *args = RUNS[name]
            run = Path(tmp) / name
            cmd = [sys.executable, "-m", "rewardflow.cli", "train", preset, "--run-dir", str(run), *COMMON, *args]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{name}: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
            out[name] = digest(run)
            print(name, out[name], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", help="write the fingerprints here (JSON)")
    parser.add_argument("--compare", help="compare with fingerprints written before; exit 1 on any difference")
    args = parser.parse_args()
    got = fingerprints(args.runs)
    if args.out:
        Path(args.out).write_text(json.dumps(got, indent=2))
    if args.compare:
        want = json.loads(Path(args.compare).read_text())
        differ = [f"{n}.{k}" for n in got for k in got[n] if want.get(n, {}).get(k) != got[n][k]]
        print("identical" if not differ else f"different: {', '.join(differ)}")
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
