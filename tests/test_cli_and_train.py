import dataclasses
import json
from pathlib import Path

import pytest
import torch

from rewardflow.algorithms.nft import NFTConfig, old_decay
from rewardflow.cli import main
from rewardflow.config import TrainConfig, from_yaml, to_yaml
from rewardflow.presets import PRESETS, get_preset, shapes_recipe
from rewardflow.shapes.tiny_dit import save_tiny_dit
from rewardflow.utils.checkpoint import load_state
from rewardflow.utils.configs import config_differences
from tests.conftest import make_policy


def test_presets_are_complete_and_consistent():
    for name in PRESETS:
        cfg = get_preset(name)
        assert cfg.rows_per_iter % cfg.algo.micro_batch == 0
        assert from_yaml(to_yaml(cfg)) == cfg  # config.yaml round-trips exactly (tuples included)
    recipe = shapes_recipe()
    assert recipe.grpo.clip_range == 1e-4 and recipe.grpo.kl_beta == 0.04 and recipe.grpo.optimizer_steps == 2
    assert recipe.grpo.guard and recipe.grpo.num_steps == 10
    # The demo is the recipe made cheaper per iteration, run for more iterations with a stronger KL and evaluated
    # through a longer EMA, also on a subset of the prompts on the way (neither changes a training step).
    cpu = get_preset("shapes_grpo_cpu")
    assert set(config_differences(recipe, cpu)) == {
        "run_dir", "iterations", "save_every", "ema_decay", "model.compile", "grpo.num_steps", "grpo.kl_every",
        "grpo.kl_beta", "eval_every", "eval.subset_every",
    }  # fmt: skip
    assert cpu.grpo.num_steps == 6 and cpu.grpo.kl_every == 4 and cpu.model.compile and cpu.ema_decay == 0.97
    assert cpu.grpo.kl_beta == 0.2
    # The long preset is the demo run three times as long, evaluated on the way, on a GPU when there is one.
    long = get_preset("shapes_grpo")
    assert set(config_differences(cpu, long)) == {
        "run_dir", "iterations", "eval_every", "eval.subset_every", "model.device"
    }  # fmt: skip
    assert long.iterations == 3 * cpu.iterations and long.eval_every == 50 and long.model.device == "auto"
    # The GRPO family presets change only what defines the method (and use the published, plain ratio).
    fast, dance, mix = (get_preset(f"shapes_{m}_cpu") for m in ("grpo_fast", "dance", "mix"))
    assert set(config_differences(recipe, fast)) == {
        "run_dir", "grpo.sde_window", "grpo.sde_window_range", "grpo.guard"
    }  # fmt: skip
    assert set(config_differences(recipe, dance)) == {
        "run_dir", "grpo.sde_type", "grpo.noise_level", "grpo.same_initial_noise", "grpo.timestep_fraction",
        "grpo.guard",
    }  # fmt: skip
    assert set(config_differences(dance, mix)) == {
        "run_dir", "grpo.timestep_fraction", "grpo.sde_window", "grpo.window_schedule", "grpo.window_iters"
    }  # fmt: skip
    # Only the demo and the long run compile: the smoke preset and the other presets' measurements ran eagerly.
    compiled = {"shapes_grpo_cpu", "shapes_grpo"}
    assert not any(get_preset(name).model.compile for name in PRESETS if name not in compiled)
    nft = get_preset("shapes_nft_cpu")  # CFG-free in rollouts, training and evaluation
    assert nft.algorithm == "nft" and nft.nft.guidance_scale == 1.0 and nft.eval.guidance_scale == 1.0


def test_presets_command_lists_presets(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)


def test_unknown_preset_command_and_field(capsys, tmp_path):
    assert main(["train", "nope"]) == 2
    assert "available presets" in capsys.readouterr().err
    assert main(["train", "shapes_grpo_cpo"]) == 2
    assert "did you mean shapes_grpo_cpu" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    with pytest.raises(SystemExit):
        main(["train", "shapes_grpo_smoke", "--run-dir", str(tmp_path / "r"), "--grpo.nonsense", "1"])
    assert "grpo.nonsense" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "shapes_grpo_smoke", "--run-dir", str(tmp_path / "r"), "--grpo.num-step", "3"])
    assert "Perhaps you meant" in (err := capsys.readouterr().err) and "--grpo.num-steps" in err
    assert not (tmp_path / "r").exists()


def test_train_writes_a_complete_run_folder_and_resumes_exactly(tmp_path, tiny_run_args, capsys):
    full = tmp_path / "full"
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(full), *tiny_run_args]) == 0
    for rel in ("config.yaml", "meta.json", "metrics.jsonl", "reward_curve.png", "train.log",
                "checkpoints/iter_00002.safetensors", "samples/train_00001.png", "eval/iter_00000.json"):  # fmt: skip
        assert (full / rel).exists(), rel
    cfg = from_yaml((full / "config.yaml").read_text())
    assert cfg.iterations == 2 and cfg.eval.num_steps == 2
    metrics = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    train_rows = [m for m in metrics if "reward" in m]
    assert [m["iteration"] for m in train_rows] == [1, 2]
    assert {"reward", "kl", "clip_frac", "strict", "clean", "grad_norm"} <= set(train_rows[0])
    report = json.loads((full / "eval" / "iter_00002.json").read_text())
    assert set(report["categories"]) == {"single_object", "colors", "counting", "position", "two_object"}
    assert json.loads((full / "meta.json").read_text())["preset"] == "shapes_grpo_smoke"

    # Export is for the diffusers models, and of saved weights only; a refused export writes nothing.
    assert main(["export", str(full), "--out", str(tmp_path / "x")]) == 2
    assert "model.kind 'tiny-dit'" in capsys.readouterr().err and not (tmp_path / "x").exists()
    bare = tmp_path / "bare"
    bare.mkdir()
    as_sd3 = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kind="sd3", path="models/sd3"))
    (bare / "config.yaml").write_text(to_yaml(as_sd3))
    assert main(["export", str(bare), "--out", str(tmp_path / "x")]) == 2
    assert "has no saved weights yet" in capsys.readouterr().err and not (tmp_path / "x").exists()

    # The same run interrupted after one iteration and resumed ends with identical weights.
    part = tmp_path / "part"
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(part), "--iterations", "1", *tiny_run_args]) == 0
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(part), "--resume", *tiny_run_args]) == 0
    a, b = load_state(full / "checkpoints/state_00002.pt"), load_state(part / "checkpoints/state_00002.pt")
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in a["trainable"])
    assert all(torch.equal(x, y) for x, y in zip(a["ema"]["shadow"], b["ema"]["shadow"]))
    resumed = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in resumed if "reward" in m] == [1, 2]  # no duplicated training rows
    assert [m["reward"] for m in resumed if "reward" in m] == [m["reward"] for m in train_rows]

    # The EMA only feeds evaluation and checkpoints: another decay, with an evaluation swapping it in and out between
    # the two iterations, trains bit for bit the same weights (what shapes_grpo_cpu's EMA cap was measured on).
    other = tmp_path / "other_ema"
    args = ["--run-dir", str(other), "--ema-decay", "0.2", "--eval-every", "1", *tiny_run_args]
    assert main(["train", "shapes_grpo_smoke", *args]) == 0
    c = load_state(other / "checkpoints/state_00002.pt")
    assert all(torch.equal(a["trainable"][k], c["trainable"][k]) for k in a["trainable"])
    assert not all(torch.equal(x, y) for x, y in zip(a["ema"]["shadow"], c["ema"]["shadow"]))

    # A finished run folder is never overwritten; resuming with another configuration is refused.
    before = (full / "metrics.jsonl").read_text()
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(full), *tiny_run_args]) == 2
    assert (
        main(["train", "shapes_grpo_smoke", "--run-dir", str(full), "--resume", "--optim.lr", "1", *tiny_run_args])
        == 2
    )
    assert (full / "metrics.jsonl").read_text() == before


def test_eval_command_writes_the_report(tmp_path, tiny_run_args, capsys):
    run = tmp_path / "run"
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(run), "--iterations", "1", *tiny_run_args]) == 0
    out = tmp_path / "e.json"
    assert main(["eval", "--run-dir", str(run), "--out", str(out), "--grid", str(tmp_path / "g.png")]) == 0
    report = json.loads(out.read_text())
    assert {"overall", "categories", "clean_overall", "num_prompts", "samples_per_prompt"} <= set(report)
    assert report["num_prompts"] == 5 and report["samples_per_prompt"] == 2
    assert 0.0 <= report["overall"] <= 1.0
    ckpt = tiny_run_args[1]
    prompts = tiny_run_args[3]
    args = ["--prompts", prompts, "--num-steps", "2", "--rewards", "jpeg-compressibility", "--out", str(out)]
    assert main(["eval", "--checkpoint", ckpt, *args]) == 0
    report = json.loads(out.read_text())
    assert report["samples_per_prompt"] == 4 and report["rewards"]["jpeg-compressibility"] < 0  # minus kilobytes


def test_eval_bad_inputs(tmp_path, capsys):
    assert main(["eval"]) == 2
    assert "exactly one" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("a circle\na green dragon\n")
    assert main(["eval", "--base", "--prompts", str(bad), "--num-steps", "2"]) == 2
    assert "'dragon'" in capsys.readouterr().err
    assert main(["eval", "--base", "--prompts", str(tmp_path / "missing.txt")]) == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["eval", "--base", "--prompts", str(empty)]) == 2
    corrupt = tmp_path / "c.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    assert main(["eval", "--checkpoint", str(corrupt)]) == 2
    assert "not a readable safetensors" in capsys.readouterr().err
    assert main(["eval", "--run-dir", str(tmp_path)]) == 2


def test_bad_training_prompt_file_fails_before_creating_the_run(tmp_path, tiny_run_args):
    bad = tmp_path / "train.txt"
    bad.write_text("a circle\nthe cat\n")
    run = tmp_path / "run"
    assert (
        main(["train", "shapes_grpo_smoke", "--run-dir", str(run), "--train-prompts", str(bad), *tiny_run_args]) == 2
    )
    assert not run.exists()


def test_balancing_a_plain_text_prompt_file_fails_before_creating_the_run(tmp_path, tiny_run_args, capsys):
    plain = tmp_path / "train.txt"
    plain.write_text("a circle\ntwo squares\n")
    run = tmp_path / "run"
    args = ["--train-prompts", str(plain), "--balance-prompts-by", "category", *tiny_run_args]
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(run), *args]) == 2
    assert "balance_prompts_by='category'" in capsys.readouterr().err
    assert not run.exists()


def test_resume_needs_a_run_and_a_readable_state(tmp_path, tiny_run_args, capsys):
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(tmp_path / "none"), "--resume", *tiny_run_args]) == 2
    run = tmp_path / "run"
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(run), "--iterations", "1", *tiny_run_args]) == 0
    state = run / "checkpoints" / "state_00001.pt"
    state.write_bytes(b"garbage" * 10)
    before = sorted(p.name for p in run.rglob("*"))
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(run), "--resume", *tiny_run_args]) == 2
    assert "none of its resume states is complete" in capsys.readouterr().err
    assert sorted(p.name for p in run.rglob("*")) == before
    differ = ["--resume", "--optim.lr", "0.5", "--group-size", "8", *tiny_run_args]
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(run), *differ]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "group_size" in err


def test_bad_checkpoint_fails_before_the_run_folder_is_created(tmp_path, tiny_run_args, capsys):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a checkpoint")
    run = tmp_path / "run"
    args = [*tiny_run_args[2:], "--model.checkpoint", str(corrupt)]
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(run), *args]) == 2
    assert "not a readable safetensors" in capsys.readouterr().err
    assert not run.exists()


def test_mismatched_run_checkpoint_is_reported(tmp_path, tiny_run_args, tiny_config):
    run = tmp_path / "run"
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(run), "--iterations", "1", *tiny_run_args]) == 0
    # Replace the run's model by a different architecture: loading its checkpoint must fail clearly.
    other = Path(tiny_run_args[1])
    from rewardflow.shapes.tiny_dit import TinyDiTConfig

    save_tiny_dit(make_policy(TinyDiTConfig(dim=16, depth=1, heads=2, text_depth=1)).module, other)
    assert main(["eval", "--run-dir", str(run)]) == 2


def test_bad_device_fails_before_the_run_folder_is_created(tmp_path, tiny_run_args, capsys):
    run = tmp_path / "run"
    for bad in ("gpu", "mps", "cpu:1"):
        with pytest.raises(SystemExit):  # tyro reports the field's own check
            main(["train", "shapes_grpo_smoke", "--run-dir", str(run), "--model.device", bad, *tiny_run_args])
        assert "model.device must be" in capsys.readouterr().err
    assert not run.exists()
    if not torch.cuda.is_available():
        args = ["--run-dir", str(run), "--model.device", "cuda", *tiny_run_args]
        assert main(["train", "shapes_grpo_smoke", *args]) == 2
        assert "no CUDA device" in capsys.readouterr().err
        assert not run.exists()


NFT_SMOKE = ["--algorithm", "nft", "--nft.micro-batch", "4", "--nft.num-steps", "4", "--nft.optimizer-steps", "2"]


def test_nft_run_trains_and_resumes_exactly(tmp_path, tiny_run_args):
    # The shipped base, so that rewards vary within groups (a random tiny model draws nothing the judge sees).
    full, part = tmp_path / "full", tmp_path / "part"
    args = [*NFT_SMOKE, *tiny_run_args[2:], "--model.checkpoint", "base"]
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(full), *args]) == 0
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    train_rows = [m for m in rows if "reward" in m]
    assert {"policy_loss", "ref_loss", "old_eta", "r_mean", "grad_norm"} <= set(train_rows[0])
    # The old policy's schedule is driven by the optimizer steps so far: 2 per iteration here.
    assert [m["old_eta"] for m in train_rows] == [old_decay(2, NFTConfig()), old_decay(4, NFTConfig())]
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(part), "--iterations", "1", *args]) == 0
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(part), "--resume", *args]) == 0
    a, b = load_state(full / "checkpoints/state_00002.pt"), load_state(part / "checkpoints/state_00002.pt")
    for key in ("trainable", "old"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert any(not torch.equal(a["old"][k], a["trainable"][k]) for k in a["old"])  # the old policy lags


def test_bad_nft_config_fails_before_the_run_folder_is_created(tmp_path, tiny_run_args, capsys):
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(["train", "shapes_grpo_smoke", "--run-dir", str(run), *NFT_SMOKE, "--nft.beta", "-1", *tiny_run_args])
    assert "nft.beta must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the smoke preset's 8 rows do not fill NFT's default micro-batch of 32
        main(["train", "shapes_grpo_smoke", "--run-dir", str(run), "--algorithm", "nft", *tiny_run_args])
    assert "nft.micro_batch" in capsys.readouterr().err
    assert not run.exists()


def test_two_rewards_with_advantage_aggregation_and_best_worst_selection(tmp_path, tiny_run_args, capsys):
    run = tmp_path / "run"
    args = [
        "--reward.names", "shapes-judge", "jpeg-compressibility",
        "--reward.weights", "1", "0.5",
        "--reward.aggregate", "advantage",
        "--grpo.best-worst-k", "2",
        "--grpo.optimizer-steps", "1",
        "--grpo.sde-type", "dance",
        "--grpo.timestep-fraction", "0.5",
    ]  # fmt: skip
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(run), *args, *tiny_run_args]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [m for m in rows if "reward" in m]
    assert {"reward/shapes-judge", "reward/jpeg-compressibility", "jpeg_kb", "strict"} <= set(train_rows[0])
    first = train_rows[0]
    assert first["reward"] == pytest.approx(first["reward/shapes-judge"] + 0.5 * first["reward/jpeg-compressibility"])
    cfg = from_yaml((run / "config.yaml").read_text())
    assert cfg.reward.names == ("shapes-judge", "jpeg-compressibility") and cfg.grpo.best_worst_k == 2
    # 2 prompts x 2 kept rows = 4 rows: they must still fill the micro-batches and optimizer steps
    with pytest.raises(SystemExit):
        main(["train", "shapes_grpo_smoke", "--run-dir", str(tmp_path / "bad"), "--grpo.best-worst-k", "2"])
    assert "best_worst_k = 2, 4 rows are trained" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "shapes_grpo_smoke", "--run-dir", str(tmp_path / "bad"), "--grpo.best-worst-k", "6"])
    assert "at most group_size" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_dotted_overrides_rebuild_and_recheck_the_config():
    from rewardflow.config import apply_overrides
    from rewardflow.presets import get_preset

    cfg = apply_overrides(get_preset("shapes_draft_cpu"), ["draft.k=3", "optim.lr=1e-4", "eval.rewards=[]"])
    assert (cfg.draft.k, cfg.optim.lr, cfg.eval.rewards) == (3, 1e-4, ())
    with pytest.raises(ValueError, match=r"unknown field 'kk'; allowed: \["):
        apply_overrides(cfg, ["draft.kk=3"])
    with pytest.raises(ValueError, match="no config section 'drft'"):
        apply_overrides(cfg, ["drft.k=3"])
    with pytest.raises(ValueError, match="rows per rank"):  # the construction checks run again
        apply_overrides(cfg, ["draft.micro_batch=7"])


def test_non_finite_rewards_skip_the_update_and_too_many_in_a_row_stop_the_run(
    tmp_path, tiny_run_args, monkeypatch, capsys
):
    from rewardflow.rewards import REWARDS
    from rewardflow.shapes.reward import ShapesJudgeReward
    from rewardflow.types import RewardOutput

    calls = {"n": 0}
    nan_chunks: set[int] = {3, 4}  # the smoke preset scores 2 chunks per iteration: iteration 2 gets NaNs

    class SometimesNaN(ShapesJudgeReward):
        def __call__(self, images, prompts, metadata):
            calls["n"] += 1
            out = super().__call__(images, prompts, metadata)
            if calls["n"] in nan_chunks:
                return RewardOutput(torch.full_like(out.scores, float("nan")), out.details)
            return out

    monkeypatch.setitem(REWARDS, "shapes-judge", lambda cfg: SometimesNaN(cfg.extra_object_penalty))
    run = tmp_path / "run"
    args = ["train", "shapes_grpo_smoke", "--run-dir", str(run), "--iterations", "3", "--max-bad-iterations", "2"]
    assert main([*args, *tiny_run_args]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [m for m in rows if "reward" in m]
    assert [m.get("skipped_steps") for m in train_rows] == [0.0, 2.0, 0.0]
    assert "kl" not in train_rows[1]  # no update was made
    # NaN rewards every iteration: two in a row stop the run, the last checkpoint from before them.
    calls["n"], nan_chunks = 0, set(range(3, 100))
    run2 = tmp_path / "run2"
    args[args.index(str(run))] = str(run2)
    assert main([*args, *tiny_run_args]) == 1  # one message, no traceback
    assert "2 iterations in a row skipped their update" in capsys.readouterr().err
    assert load_state(run2 / "checkpoints" / "state_00001.pt")["iteration"] == 1


def test_drop_zero_advantage_trains_only_the_groups_that_told_their_samples_apart(
    tmp_path, tiny_run_args, monkeypatch
):
    """The smoke preset scores one group per chunk: a constant reward for the first group of each iteration leaves
    half the rows to train; a constant reward everywhere trains nothing and is no failure."""
    from rewardflow.rewards import REWARDS
    from rewardflow.shapes.reward import ShapesJudgeReward
    from rewardflow.types import RewardOutput

    calls = {"n": 0, "constant": lambda n: n % 2 == 1}

    class PartlyConstant(ShapesJudgeReward):
        def __call__(self, images, prompts, metadata):
            calls["n"] += 1
            out = super().__call__(images, prompts, metadata)
            if calls["constant"](calls["n"]):
                return RewardOutput(torch.full_like(out.scores, 0.5), out.details)
            return RewardOutput(torch.linspace(0, 1, len(out.scores)), out.details)

    monkeypatch.setitem(REWARDS, "shapes-judge", lambda cfg: PartlyConstant(cfg.extra_object_penalty))
    for name, constant, trained in (("half", calls["constant"], 0.5), ("none", lambda n: True, 0.0)):
        calls.update(n=0, constant=constant)
        run = tmp_path / name
        args = ["train", "shapes_grpo_smoke", "--run-dir", str(run), "--grpo.drop-zero-advantage"]
        assert main([*args, "--max-bad-iterations", "1", *tiny_run_args]) == 0
        train_rows = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "reward" in m]
        assert [m["trained_rows"] for m in train_rows] == [trained, trained]
        assert all(("kl" in m) == bool(trained) and not m.get("skipped_steps") for m in train_rows)


def test_retired_fields_load_at_their_value_and_are_refused_otherwise():
    """A config.yaml holding a field that is no longer a setting loads when it holds the value the field always had."""
    text = to_yaml(TrainConfig())
    old = text.replace("  weight_decay: 0.0001\n", "  weight_decay: 0.0001\n  beta1: 0.9\n  eps: 1.0e-08\n")
    assert old != text and from_yaml(old) == TrainConfig()
    with pytest.raises(ValueError, match="optim.beta1 is no longer a setting"):
        from_yaml(old.replace("beta1: 0.9", "beta1: 0.8"))


def test_presets_read_as_plain_text_and_train_help_starts_with_the_common_settings(capsys):
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert "shapes_grpo_cpu" in listing and not any(m in listing for m in ("``", ":func:", ":class:", ":mod:"))
    assert main(["train", "shapes_grpo_cpu", "--help"]) == 0
    short = capsys.readouterr().out.splitlines()
    first_screen = "\n".join(short[:24])
    for flag in ("--iterations", "--run-dir", "--optim.lr", "--reward.names", "--model.device"):
        assert flag in first_screen, flag
    assert "[150]" in first_screen and "--help-all" in short[-1]
    with pytest.raises(SystemExit):
        main(["train", "shapes_grpo_cpu", "--help-all"])
    assert "--grpo.clip-range" in capsys.readouterr().out
