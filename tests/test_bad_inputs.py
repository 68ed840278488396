"""Bad input to every command: exit status 2 and one message naming the field, path or value, nothing written.

Each case is a command line (``{run}`` is a fresh folder under the test's tmp_path, ``{tmp}`` the tmp_path itself)
and a piece of the message it must print. Ranges and finiteness are declared next to each field
(``rewardflow.utils.configs.Range``) and checked in one place, so NaN, infinity and out-of-range values all end here.
"""

from __future__ import annotations

import re
import shutil

import pytest

from rewardflow.cli import main

TRAIN = ["train", "shapes_grpo_smoke", "--run-dir", "{run}"]
CASES = {
    "negative grad clip": (TRAIN + ["--grpo.grad-clip", "-1"], "grpo.grad_clip must be > 0"),
    "NaN clip range": (TRAIN + ["--grpo.clip-range", "nan"], "grpo.clip_range must be a finite number"),
    "NaN reward weight": (TRAIN + ["--reward.weights", "nan"], "reward.weights must be a finite number"),
    "infinite learning rate": (TRAIN + ["--optim.lr", "inf"], "optim.lr must be a finite number"),
    "zero learning rate": (TRAIN + ["--optim.lr", "0"], "optim.lr must be > 0"),
    "EMA decay above 1": (TRAIN + ["--ema-decay", "1.5"], "ema_decay must be in [0, 1)"),
    "negative eval interval": (TRAIN + ["--eval-every", "-1"], "eval_every must be >= 0"),
    "negative LoRA alpha": (TRAIN + ["--model.lora-alpha", "-8"], "model.lora_alpha must be >= 0"),
    "negative threads": (TRAIN + ["--threads", "-1"], "threads must be >= 0"),
    "no iterations": (TRAIN + ["--iterations", "0"], "iterations must be >= 1"),
    "no checkpoints kept": (TRAIN + ["--keep-checkpoints", "0"], "keep_checkpoints must be >= 1"),
    "no bad iterations allowed": (TRAIN + ["--max-bad-iterations", "0"], "max_bad_iterations must be >= 1"),
    "groups of one": (TRAIN + ["--group-size", "1"], "group_size must be >= 2"),
    "no SDE noise": (TRAIN + ["--grpo.noise-level", "0"], "grpo.noise_level must be > 0"),
    "timestep fraction": (TRAIN + ["--grpo.timestep-fraction", "1.5"], "grpo.timestep_fraction must be in (0, 1]"),
    "negative KL weight": (TRAIN + ["--grpo.kl-beta", "-0.1"], "grpo.kl_beta must be >= 0"),
    "odd best/worst k": (TRAIN + ["--grpo.best-worst-k", "3"], "grpo.best_worst_k must be 0 or a positive even"),
    "window stay": (TRAIN + ["--grpo.window-iters-min", "30"], "grpo.window_iters_min must be <= grpo.window_iters"),
    "NFT beta": (TRAIN + ["--nft.beta", "0"], "nft.beta must be > 0"),
    "DRaFT grad clip": (TRAIN + ["--draft.grad-clip", "0"], "draft.grad_clip must be > 0"),
    "LeapAlign alpha": (TRAIN + ["--leapalign.alpha", "2"], "leapalign.alpha must be in [0, 1]"),
    "unknown reward": (TRAIN + ["--reward.names", "nope"], "reward.names has unknown rewards ['nope']"),
    "unknown eval reward": (TRAIN + ["--eval.rewards", "nope"], "eval.rewards has unknown rewards ['nope']"),
    "bad device": (TRAIN + ["--model.device", "cuda:x"], "model.device must be 'cpu', 'cuda', 'cuda:N' or 'auto'"),
    "reward server timeout": (TRAIN + ["--reward.remote-timeout", "0"], "reward.remote_timeout must be > 0"),
    "guidance below 1": (TRAIN + ["--eval.guidance-scale", "0.5"], "eval.guidance_scale must be >= 1"),
    "aggregate for another method": (TRAIN + ["--algorithm", "nft", "--nft.micro-batch", "4",
                                               "--reward.aggregate", "loss"],
                                     "reward.aggregate 'loss' is not implemented by algorithm 'nft'"),
    "missing prompt file": (TRAIN + ["--train-prompts", "{tmp}/missing.txt"], "missing.txt does not exist"),
    "binary prompt file": (TRAIN + ["--train-prompts", "{tmp}/binary.txt"], "binary.txt is not UTF-8 text"),
    "run folder that is a file": (["train", "shapes_grpo_smoke", "--run-dir", "{tmp}/a_file"],
                                  "a_file is a file; pick another --run-dir"),
    "server port": (["serve-reward", "jpeg-compressibility", "--port", "70000"], "--port must be in 0..65535"),
    "server slots": (["serve-reward", "jpeg-compressibility", "--limits.concurrency", "0"],
                     "limits.concurrency must be >= 1"),
    "server body deadline": (["serve-reward", "jpeg-compressibility", "--limits.body-timeout", "nan"],
                             "limits.body_timeout must be a finite number"),
    "pretraining steps": (["pretrain", "--out-dir", "{run}", "--steps", "0"], "pretrain.steps must be >= 1"),
    "pretraining learning rate": (["pretrain", "--out-dir", "{run}", "--lr", "nan"], "pretrain.lr must be a finite"),
    "pretraining into a used folder": (["pretrain", "--out-dir", "{tmp}/used"], "used is not empty"),
    "eval samples": (["eval", "--base", "--samples-per-prompt", "0"], "eval.samples_per_prompt must be >= 1"),
    "eval guidance": (["eval", "--base", "--guidance-scale", "nan"], "eval.guidance_scale must be a finite number"),
    "eval of no run": (["eval", "--run-dir", "{tmp}/nowhere"], "nowhere is not a run folder"),
    "export of no run": (["export", "{tmp}/nowhere", "--out", "{tmp}/out"], "nowhere is not a run folder"),
    "report of no run": (["report", "{tmp}/nowhere"], "nowhere is not a run folder"),
}  # fmt: skip


def run_cli(argv: list[str]) -> int:
    """``main``'s exit status; tyro reports a field its dataclass refused by exiting 2 itself."""
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code or 0)


def flat(text: str) -> str:
    """Whitespace and tyro's box drawing folded to single spaces (its box wraps long messages)."""
    return re.sub(r"[\s\u2500-\u257f]+", " ", text)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_message_naming_it_and_nothing_is_written(case, tmp_path, capsys):
    argv, message = CASES[case]
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x01")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "pretrain_config.json").write_text("{}")
    run = tmp_path / "run"
    argv = [a.format(run=run, tmp=tmp_path) for a in argv]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert flat(message) in flat(err) and "Traceback" not in err, err
    assert not run.exists()  # checked before anything is written


def test_a_broken_run_config_and_other_settings_are_refused_on_resume(tmp_path, tiny_run_args, capsys):
    run = tmp_path / "run"
    assert main([*(a.format(run=run) for a in TRAIN), "--iterations", "1", *tiny_run_args]) == 0
    capsys.readouterr()
    # Other settings than the folder's: the fields are named; the folder is unchanged.
    before = (run / "config.yaml").read_text()
    assert main([*(a.format(run=run) for a in TRAIN), "--resume", "--seed", "5", *tiny_run_args]) == 2
    assert "these fields differ from its config.yaml: seed" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == before
    # The folder moved: it resumes from its new place.
    moved = tmp_path / "moved"
    shutil.move(run, moved)
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(moved), "--resume", "--iterations", "2",
                 *tiny_run_args]) == 0  # fmt: skip
    assert (moved / "checkpoints" / "iter_00002.safetensors").is_file()
    # A config.yaml that is not YAML: named, nothing else touched.
    (moved / "config.yaml").write_text("seed: [unclosed")
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(moved), "--resume", *tiny_run_args]) == 2
    assert f"{moved / 'config.yaml'} is not a valid run config" in capsys.readouterr().err


def test_a_full_disk_while_saving_is_one_message_and_the_checkpoints_before_stay_whole(
    tmp_path, tiny_run_args, capsys, monkeypatch
):
    import torch

    from rewardflow.utils.checkpoint import load_state

    real, calls = torch.save, {"n": 0}

    def disk_fills_up(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:  # the second resume state: what torch.save's writer raises on a full disk
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_up)
    run = tmp_path / "run"
    argv = ["train", "shapes_grpo_smoke", "--run-dir", str(run), "--iterations", "3", "--save-every", "1"]
    assert main([*argv, *tiny_run_args]) == 1
    err = capsys.readouterr().err
    assert f"could not write the checkpoint of iteration 2 in {run}" in err and "Traceback" not in err
    assert load_state(run / "checkpoints" / "state_00001.pt")["iteration"] == 1
    assert not list((run / "checkpoints").glob(".*.tmp"))  # no partial file left on the full disk
    monkeypatch.setattr(torch, "save", real)
    assert main([*argv, "--resume", *tiny_run_args]) == 0


def test_a_second_signal_during_a_save_lets_it_finish_then_stops():
    import signal

    from rewardflow.run_state import StopSignals

    stop = StopSignals()
    stop._handle(signal.SIGTERM, None)  # the first: save at the end of the iteration
    with pytest.raises(KeyboardInterrupt):
        with stop.saving():
            stop._handle(signal.SIGINT, None)  # the second, mid-save: no interruption here
            finished = True  # the rest of the save runs
    assert finished
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)  # outside a save a second signal stops at once
