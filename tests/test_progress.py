"""The training bar's remaining time, and evaluations between the first and the last that change no training."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from rewardflow.cli import main
from rewardflow.utils.progress import TrainProgress, clock


def test_the_remaining_time_leaves_out_warm_up_and_counts_each_evaluation_by_kind():
    # 10 iterations; full evaluations at the end, subset ones after iterations 4 and 8.
    progress = TrainProgress(0, 10, lambda n: (1, sum(d in (4, 8) for d in range(max(n, 1), 10))), enabled=False)
    progress.evaluated(30.0, subset=False)  # the base model's evaluation
    for seconds in (100.0, 50.0):  # compile, lazy initialisation: warm-up
        progress.update({})
        progress.account(seconds)
    assert progress.remaining() is None  # nothing timed after warm-up yet: no guess
    progress.update({})
    progress.account(10.0)
    # 7 iterations of 10 s, one full evaluation (30 s) and two subset ones (timed as full until one is measured).
    assert progress.remaining() == 7 * 10.0 + 30.0 + 2 * 30.0
    progress.evaluated(6.0, subset=True)  # a subset evaluation measured: the others are timed like it
    progress.update({})  # iteration 4: its own evaluation still to come, as the bar shows it then
    progress.account(20.0)
    assert progress.remaining() == 6 * 15.0 + 30.0 + 2 * 6.0
    assert clock(59.6) == "1:00" and clock(3725) == "1:02:05"


def test_evaluations_on_the_subset_change_nothing_in_training(tmp_path, tiny_run_args):
    runs = {}
    for name, extra in (("plain", []), ("evaluated", ["--eval-every", "1", "--eval.subset-every", "3"])):
        run = tmp_path / name
        args = ["train", "shapes_grpo_smoke", "--run-dir", str(run), "--iterations", "3", *extra, *tiny_run_args]
        assert main(args) == 0
        runs[name] = run
    a = load_file(str(runs["plain"] / "checkpoints" / "iter_00003.safetensors"))
    b = load_file(str(runs["evaluated"] / "checkpoints" / "iter_00003.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (runs["evaluated"] / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/overall" in r]
    assert [r["iteration"] for r in evals] == [0, 1, 2, 3]
    full, subset = evals[0]["eval/num_prompts"], evals[1]["eval/num_prompts"]
    assert subset == -(-full // 3) and evals[-1]["eval/num_prompts"] == full  # the first and the last: every prompt
    assert "eval/drift" in evals[1]  # the subset's rows of the base images: drift on every intermediate point
    assert sorted(p.name for p in (runs["evaluated"] / "samples").glob("eval_*.png")) == [
        "eval_00000.png", "eval_00003.png"
    ]  # grids only where every prompt was sampled  # fmt: skip
