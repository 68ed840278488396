"""The training bar's remaining time, and evaluations between the first and the last that change no training."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from rewardflow.cli import main
from rewardflow.utils.progress import TrainProgress, clock


def test_the_remaining_time_leaves_out_warm_up_and_counts_the_evaluation_images_to_come():
    # 10 iterations; 600 images at the end, 100 after iterations 4 and 8 (a subset).
    progress = TrainProgress(0, 10, lambda n: 600 + 100 * sum(d in (4, 8) for d in range(max(n, 1), 10)),
                             enabled=False)  # fmt: skip
    progress.evaluated(90.0, 600)  # the base model's evaluation: 0.15 s an image, warming up
    for seconds in (100.0, 50.0):  # compile, lazy initialisation: warm-up
        progress.update({})
        progress.account(seconds)
    assert progress.remaining() is None  # nothing timed after warm-up yet: no guess
    progress.update({})
    progress.account(10.0)
    # 7 iterations of 10 s, and 800 evaluation images at the base's 0.15 s each.
    assert progress.remaining() == 7 * 10.0 + 800 * 0.15
    progress.evaluated(10.0, 100)  # a later evaluation, warm: 0.1 s an image from now on
    progress.update({})  # iteration 4: its own evaluation still to come, as the bar shows it then
    progress.account(20.0)
    assert progress.remaining() == 6 * 15.0 + 800 * 0.1
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
