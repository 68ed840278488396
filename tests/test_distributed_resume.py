"""Two processes (torchrun, gloo) against one, exact resume after SIGKILL and SIGTERM, damaged checkpoints.

Every run here is a subprocess with one torch thread per process, so that runs compare bit for bit.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rewardflow.utils.checkpoint import SHARDED_MANIFEST, checksum_file, load_state, state_files

# 4 prompts x 4 samples = 16 rows per iteration, micro-batches of 4, 2 optimizer steps: each optimizer step's
# 2 micro-batches are dealt one to each of 2 ranks. The shipped base model, so that rewards vary within groups.
# float32 on every CPU: with bfloat16 autocast (on CPUs that compute it natively) the other summation order of two
# ranks grew, by the second iteration of DiffusionNFT, into relative differences of 4e-4 (loss_pos) and 9e-3
# (ref_loss) (measured on an AVX-512 + AMX VM), too close to a real error to tell apart; the autocast path has its
# own tests. Every test here shares this, so exact resume is also checked in float32 only (its code is the same).
EVAL = Path(__file__).parent / "data" / "eval_six.txt"
SMALL = ["--prompts-per-iter", "4", "--group-size", "4", "--threads", "1", "--model.checkpoint", "base",
         "--eval.prompts", str(EVAL), "--eval.samples-per-prompt", "2", "--eval.num-steps", "2",
         "--model.no-autocast"]  # fmt: skip
ALGORITHMS = {
    "grpo": ["--grpo.micro-batch", "4", "--grpo.optimizer-steps", "2", "--grpo.num-steps", "4"],
    "nft": ["--algorithm", "nft", "--nft.micro-batch", "4", "--nft.optimizer-steps", "2", "--nft.num-steps", "4"],
    "draft": [
        "--algorithm",
        "draft",
        "--reward.names",
        "shapes-score",
        "--draft.micro-batch",
        "4",
        "--draft.optimizer-steps",
        "2",
        "--draft.num-steps",
        "4",
        "--draft.k",
        "1",
    ],  # fmt: skip
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(run, args, procs=1):
    train = ["-m", "rewardflow.cli", "train", "shapes_grpo_smoke", "--run-dir", str(run), *SMALL, *args]
    if procs == 1:
        return [sys.executable, *train]
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1",
                "--master_port", str(_port())]  # fmt: skip
    return [sys.executable, *launcher, *train]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _run(run, args, procs=1):
    done = subprocess.run(_command(run, args, procs), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _train_rows(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m for m in rows if "reward" in m]


def _final(run):
    """The newest resume state, or for a sharded run its EMA export and metrics (the shards stay sharded)."""
    newest = state_files(run / "checkpoints")[0]
    if newest.is_dir():
        iteration = int(newest.stem.split("_")[1])
        ema = load_file(run / "checkpoints" / f"iter_{iteration:05d}.safetensors")
        return {"iteration": iteration, "trainable": ema, "ema": {"shadow": list(ema.values())}}
    return load_state(newest)


@pytest.mark.parametrize("algorithm,fsdp", [("grpo", False), ("nft", False), ("draft", False), ("grpo", True),
                                            ("nft", True)])  # fmt: skip
def test_two_ranks_with_half_the_rows_each_match_one_process_with_all(tmp_path, algorithm, fsdp):
    args = ["--iterations", "2", *ALGORITHMS[algorithm]]
    _run(tmp_path / "one", args)
    # Replicated: also checks, at every save, that both ranks hold the same weights. Sharded (FSDP2, the full
    # fine-tune of the tiny DiT and of its frozen reference and old copies): each rank holds half of each weight.
    _run(tmp_path / "two", [*args, *(["--model.fsdp"] if fsdp else [])], procs=2)
    if fsdp:
        assert (tmp_path / "two" / "checkpoints" / "state_00002.dcp" / "manifest.sha256").is_file()
    one, two = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "two")
    keys = [k for k in one[0] if not k.startswith("time_")]
    assert keys == [k for k in two[0] if not k.startswith("time_")]
    # The same rows, noise and rewards; gradients summed in another order (float rounding). FSDP2 reduce-scatters
    # with its own scaling, so it gets a looser tolerance. Weights: Adam's first steps move a weight by about lr
    # (5e-5) whatever its gradient's size, so a weight whose gradient is near zero can differ by a rounding's worth
    # of an Adam step; 1e-5 (a fifth of a step) still catches a missed or doubled micro-batch.
    rel = 2e-3 if fsdp else 1e-4
    for a, b in zip(one, two):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-6), (algorithm, a["iteration"], k)
    if fsdp:  # a sharded run's resume state stays sharded: compare the EMA exports, gathered from the shards
        export = "checkpoints/iter_00002.safetensors"
        wa, wb = load_file(tmp_path / "one" / export), load_file(tmp_path / "two" / export)
    else:
        wa, wb = _final(tmp_path / "one")["trainable"], _final(tmp_path / "two")["trainable"]
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=rel, atol=1e-5)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...), read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _kill_after_a_checkpoint(run, args, procs, sig, max_delay=1.5):
    """Start a run, wait for its first complete resume state (its checksum written), then send ``sig`` to every
    process of it at a random moment up to ``max_delay`` seconds later."""
    proc = subprocess.Popen(_command(run, args, procs), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    deadline = time.time() + 240

    def complete(state: Path) -> bool:  # a kill before the checksum leaves nothing to resume from, by design
        return (state / SHARDED_MANIFEST).is_file() or checksum_file(state).is_file()

    while not ((run / "checkpoints").exists() and any(map(complete, state_files(run / "checkpoints")))):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(random.Random(os.getpid()).uniform(0.0, max_delay))
    if sig == signal.SIGKILL:  # torchrun detaches each worker into a process group of its own: kill them all
        for pid in [*_descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    else:
        proc.send_signal(sig)  # the launcher (or the one process) gets it, as from a scheduler
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _interrupt(run, args, procs, sig, iterations):
    """:func:`_kill_after_a_checkpoint` until the signal lands before the run's last iteration: a signal that comes
    after the run finished interrupts nothing, so the run is started again with a shorter delay (the last try sends
    it as soon as the first checkpoint is complete). Returns the exit status and the standard error."""
    for max_delay in (1.5, 0.3, 0.0):
        code, err = _kill_after_a_checkpoint(run, args, procs, sig, max_delay)
        lines = (run / "metrics.jsonl").read_text().splitlines()  # a kill can cut the last line short
        finished = sum('"reward"' in line and line.endswith("}") for line in lines)
        if code != 0 and finished < iterations:
            return code, err
        shutil.rmtree(run)
    raise AssertionError(f"{sig!r} never landed before the run's iteration {iterations}")


@pytest.mark.parametrize("procs,fsdp", [(1, False), (2, False), (2, True)])
def test_a_run_killed_with_sigkill_and_resumed_ends_exactly_like_an_uninterrupted_one(tmp_path, procs, fsdp):
    args = ["--iterations", "4", "--save-every", "1", "--keep-checkpoints", "2", *ALGORITHMS["grpo"],
            *(["--model.fsdp"] if fsdp else [])]  # fmt: skip
    _run(tmp_path / "whole", args, procs)
    _interrupt(tmp_path / "cut", args, procs, signal.SIGKILL, 4)  # killed before its last iteration
    _run(tmp_path / "cut", [*args, "--resume"], procs)
    a, b = _final(tmp_path / "whole"), _final(tmp_path / "cut")
    assert a["iteration"] == b["iteration"] == 4
    for k in a["trainable"]:  # (sharded: the EMA exports, gathered from the shards)
        assert torch.equal(a["trainable"][k], b["trainable"][k]), k
    assert all(torch.equal(x, y) for x, y in zip(a["ema"]["shadow"], b["ema"]["shadow"]))
    strip = lambda rows: [{k: v for k, v in m.items() if not k.startswith("time_")} for m in rows]  # noqa: E731
    assert strip(_train_rows(tmp_path / "whole")) == strip(_train_rows(tmp_path / "cut"))
    assert len(state_files(tmp_path / "cut" / "checkpoints")) == 2  # keep_checkpoints


def test_sigterm_saves_a_checkpoint_and_stops_and_resume_auto_finishes(tmp_path):
    args = ["--iterations", "5", "--save-every", "1", *ALGORITHMS["grpo"]]
    code, err = _interrupt(tmp_path / "run", args, 1, signal.SIGTERM, 5)
    assert code == 128 + signal.SIGTERM and "SIGTERM received: stopped after iteration" in err
    stopped = _final(tmp_path / "run")["iteration"]
    assert stopped == len(_train_rows(tmp_path / "run")) < 5  # the checkpoint is of the last finished iteration
    _run(tmp_path / "run", [*args, "--resume", "auto"])
    _run(tmp_path / "fresh", [*args, "--resume", "auto"])  # auto in an empty folder: a new run
    a, b = _final(tmp_path / "run"), _final(tmp_path / "fresh")
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in a["trainable"])


def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_is_used(tmp_path, caplog):
    args = ["--iterations", "3", "--save-every", "1", "--keep-checkpoints", "3", *ALGORITHMS["grpo"]]
    _run(tmp_path / "whole", args)
    _run(tmp_path / "run", args)
    newest = state_files(tmp_path / "run" / "checkpoints")[0]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated, e.g. by a full disk
    done = _run(tmp_path / "run", [*args, "--resume"])
    assert f"resume state {newest} does not match its checksum: truncated or corrupted" in done.stderr
    assert "resuming" in done.stderr and "at iteration 2" in done.stderr
    a, b = _final(tmp_path / "whole"), _final(tmp_path / "run")
    assert b["iteration"] == 3 and all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in a["trainable"])
    assert len(_train_rows(tmp_path / "run")) == 3  # the replayed iteration's record replaced, not duplicated


def test_rank_rows_deal_each_optimizer_steps_micro_batches_equally_and_keyed_streams_follow_the_rows():
    from rewardflow.algorithms.batching import KeyedRandom, rank_rows

    # 16 rows, micro-batches of 2, 2 optimizer steps: step 0 is micro-batches 0-3, step 1 is 4-7.
    two = [rank_rows(16, 2, 2, r, 2) for r in range(2)]
    assert two == [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]]
    assert rank_rows(16, 2, 2, 0, 1) == list(range(16))
    with pytest.raises(ValueError, match="cannot be dealt equally to 3 ranks: change grpo.micro_batch"):
        rank_rows(16, 2, 2, 0, 3, "grpo")
    with pytest.raises(ValueError, match="grpo.micro_batch"):
        rank_rows(15, 2, 1, 0, 1, "grpo")
    # Rank 1's first micro-batch (global rows 4, 5) draws what one process draws for rows 4, 5.
    one, other = KeyedRandom(0, 3), KeyedRandom(0, 3, two[1])
    assert torch.equal(torch.randn(4, generator=one.rows("rollout", 4)),
                       torch.randn(4, generator=other.rows("rollout", 0)))  # fmt: skip
    assert not torch.equal(torch.randn(4, generator=one.rows("rollout", 4)),
                           torch.randn(4, generator=one.rows("train", 4)))  # fmt: skip
    assert torch.equal(torch.randn(4, generator=one.shared("window")),
                       torch.randn(4, generator=other.shared("window")))  # fmt: skip
