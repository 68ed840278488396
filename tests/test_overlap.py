"""Scoring rollout chunks in a worker thread while the next chunk samples changes nothing but the wall-clock."""

import json
import threading

import pytest
from safetensors.torch import load_file

from rewardflow.cli import main
from rewardflow.rewards import REWARDS
from rewardflow.shapes.reward import ShapesJudgeReward


def _run(tmp_path, tiny_run_args, name, overlap, algorithm):
    run = tmp_path / name
    extra = ["--nft.micro-batch", "4", "--nft.optimizer-steps", "2"] if algorithm == "nft" else []
    args = ["train", "shapes_grpo_smoke", "--run-dir", str(run), "--algorithm", algorithm,
            "--overlap-scoring" if overlap else "--no-overlap-scoring", *extra, *tiny_run_args]  # fmt: skip
    assert main(args) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith("time_")} for m in metrics], load_file(
        run / "checkpoints" / "iter_00002.safetensors"
    )


@pytest.mark.parametrize("algorithm", ["grpo", "nft"])
def test_overlapped_scoring_gives_bitwise_identical_metrics_and_weights(tmp_path, tiny_run_args, monkeypatch,
                                                                        algorithm):  # fmt: skip
    threads, chunks = set(), []

    class Recording(ShapesJudgeReward):
        def __call__(self, images, prompts, metadata):
            threads.add(threading.current_thread().name)
            chunks.append(len(prompts))
            return super().__call__(images, prompts, metadata)

    monkeypatch.setitem(REWARDS, "shapes-judge", lambda cfg: Recording(cfg.extra_object_penalty))
    seq_metrics, seq_weights = _run(tmp_path, tiny_run_args, "sequential", False, algorithm)
    assert threads == {"MainThread"}
    threads.clear()
    ovl_metrics, ovl_weights = _run(tmp_path, tiny_run_args, "overlapped", True, algorithm)
    assert threads and "MainThread" not in threads, threads  # training rewards were scored off the main thread
    assert set(chunks) == {4}  # 8 rollouts per iteration, scored as chunks of micro_batch = 4
    assert seq_metrics == ovl_metrics
    assert seq_weights.keys() == ovl_weights.keys()
    for k in seq_weights:
        assert seq_weights[k].equal(ovl_weights[k]), k


def test_a_reward_error_in_the_worker_reaches_the_loop(tmp_path, tiny_run_args, monkeypatch):
    class Fails:
        name = "fails"

        def __call__(self, images, prompts, metadata):
            if threading.current_thread().name != "MainThread":
                raise RuntimeError("scorer fell over")
            return ShapesJudgeReward()(images, prompts, metadata)

    monkeypatch.setitem(REWARDS, "shapes-judge", lambda cfg: Fails())
    with pytest.raises(RuntimeError, match="scorer fell over"):
        main(["train", "shapes_grpo_smoke", "--run-dir", str(tmp_path / "r"), *tiny_run_args])
