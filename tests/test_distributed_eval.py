"""Evaluation sharded over 2 and 4 processes (torchrun, gloo) and over two launches of a two-node rendezvous gives
the report one process gives, and its pooled images and sample grid, bit for bit; a sharded diffusers run exports
its gathered weights."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rewardflow.evaluate import EvalConfig, evaluate, shard_rows

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def eval_config(rows: int = 0) -> EvalConfig:
    """6 prompts x 3 samples in batches of 4: 5 batches, so 4 ranks hold 4, 4, 4 and 6 images; a learned reward
    (the Shapes scorer, a network) beside the pixel one. ``rows`` 3: one prompt x 3 samples in batches of 1."""
    folder = Path(__file__).parent / "data"
    if rows == 3:  # fewer rows than 4 ranks: one rank samples nothing and calls no reward
        return EvalConfig(prompts=str(folder / "eval_one.txt"), samples_per_prompt=3, num_steps=2, batch_size=1,
                          rewards=("jpeg-compressibility", "shapes-score"))  # fmt: skip
    return EvalConfig(prompts=str(folder / "eval_six.txt"), samples_per_prompt=3, num_steps=2, batch_size=4,
                      rewards=("jpeg-compressibility", "shapes-score"))  # fmt: skip


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], out: Path, *extra: str) -> subprocess.Popen:
    worker = [str(ROOT / "tests" / "dist_eval_worker.py"), str(out), *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, *worker]
    return subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def one_process():
    from rewardflow.shapes.tiny_dit import load_policy

    torch.set_num_threads(1)
    return evaluate(load_policy("base", autocast=False), eval_config())


def test_fewer_rows_than_ranks_leave_a_rank_idle_and_the_report_whole(tmp_path):
    """3 images on 4 ranks: one rank samples nothing and calls no reward; the report is one process's."""
    from rewardflow.shapes.tiny_dit import load_policy

    torch.set_num_threads(1)
    alone = evaluate(load_policy("base", autocast=False), eval_config(3))
    out = tmp_path / "report.json"
    _finish([_launch(["--nproc_per_node", "4", "--master_addr", "127.0.0.1", "--master_port", str(_port())], out,
                     "3")])  # fmt: skip
    _check(out, alone, 4)


def _check(out: Path, one_process, world: int) -> None:
    report, images = one_process
    got = json.loads(out.read_text())
    assert got["world"] == world
    assert got["report"] == json.loads(json.dumps(report))  # every number the same
    tensors = load_file(str(out) + ".safetensors")
    assert torch.equal(tensors["pooled"], images.pooled) and torch.equal(tensors["samples"], images.samples)


def test_shards_are_whole_batches_dealt_in_runs():
    assert [shard_rows(18, 4, r, 4) for r in range(4)] == [
        (range(0, 4), 4, 2), (range(4, 8), 4, 2), (range(8, 12), 4, 2), (range(12, 18), 4, 2)]  # fmt: skip
    assert shard_rows(18, 4, 0, 1) == (range(0, 18), 4, 5)
    # Fewer batches than ranks: the batch shrinks so that every rank samples (2048 prompts on 64 GPUs: 32 each).
    assert {len(shard_rows(2048, 120, r, 64)[0]) for r in range(64)} == {32}
    # 18 batches of 120 on 8 ranks: 2 or 3 each, none idle.
    assert sorted(len(shard_rows(2048, 120, r, 8)[0]) // 120 for r in range(8)) == [2, 2, 2, 2, 2, 2, 2, 3]
    assert [len(shard_rows(3, 4, r, 4)[0]) for r in range(4)] == [0, 1, 1, 1]  # fewer rows than ranks


@pytest.mark.parametrize("procs", [2, 4])
def test_sharded_evaluation_equals_one_process(procs, tmp_path, one_process):
    out = tmp_path / "report.json"
    port = str(_port())
    _finish([_launch(["--nproc_per_node", str(procs), "--master_addr", "127.0.0.1", "--master_port", port], out)])
    _check(out, one_process, procs)


def test_two_node_rendezvous_on_one_machine(tmp_path, one_process):
    """Two launches of ``torchrun --nnodes 2`` meeting at a c10d rendezvous on 127.0.0.1, one process each."""
    out = tmp_path / "report.json"
    endpoint = f"127.0.0.1:{_port()}"
    common = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
              "--rdzv_id", "rewardflow-test"]  # fmt: skip
    _finish([_launch(common, out), _launch(common, tmp_path / "other.json")])
    written = [p for p in (out, tmp_path / "other.json") if p.exists()]
    assert len(written) == 1  # the launch that got rank 0 wrote it
    _check(written[0], one_process, 2)


def test_a_sharded_full_fine_tune_of_a_diffusers_model_exports_its_gathered_weights(tmp_path):
    """Two ranks, FSDP, a full fine-tune of the tiny SD3: each save writes ``diffusers/transformer`` from the gathered
    EMA weights, which a plain ``from_pretrained`` loads equal to the run's own EMA checkpoint; the run evaluates
    sharded (``lockstep``: both ranks run the same forward passes)."""
    pytest.importorskip("diffusers")
    from diffusers import SD3Transformer2DModel

    from rewardflow.models.tiny_diffusers import save_tiny_sd3

    model = save_tiny_sd3(tmp_path / "sd3")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\ntwo dogs on grass\n")
    run = tmp_path / "run"
    train = ["-m", "rewardflow.cli", "train", "shapes_grpo_smoke", "--run-dir", str(run), "--model.kind", "sd3",
             "--model.path", str(model), "--model.resolution", "32", "--model.lora-rank", "0", "--model.fsdp",
             "--model.no-autocast", "--iterations", "1", "--threads", "1", "--train-prompts", str(prompts),
             "--balance-prompts-by", "", "--reward.names", "jpeg-compressibility", "--eval.prompts", str(prompts),
             "--eval.no-judge", "--eval.rewards", "jpeg-compressibility", "--eval.num-steps", "2",
             "--eval.samples-per-prompt", "3", "--eval.batch-size", "2"]  # fmt: skip
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_port())]  # fmt: skip
    done = subprocess.run([sys.executable, *launcher, *train], env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ema = load_file(str(run / "checkpoints" / "iter_00001.safetensors"))
    exported = SD3Transformer2DModel.from_pretrained(run / "diffusers" / "transformer").state_dict()
    assert ema and all(torch.equal(exported[name], t) for name, t in ema.items())
    assert "StableDiffusion3Pipeline" in (run / "diffusers" / "README.md").read_text()
