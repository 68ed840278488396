"""NaN and infinity: refused in every config field before anything is written, and in training a non-finite loss or
gradient skips its optimizer step (counted in ``skipped_steps``) instead of moving the weights."""

import pytest
import torch

from rewardflow.algorithms import grpo
from rewardflow.algorithms.grpo import GRPOConfig
from rewardflow.cli import main
from tests.conftest import make_policy

PROMPTS = ["a red circle", "two squares"]


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        ("--grpo.clip-range", "nan", "grpo.clip_range must be a finite number"),
        ("--optim.lr", "inf", "optim.lr must be a finite number"),
        ("--reward.weights", "nan", "reward.weights must be a finite number"),
        ("--nft.beta", "inf", "nft.beta must be a finite number"),
        ("--grpo.grad-clip", "-1", "grpo.grad_clip must be > 0"),
        ("--ema-decay", "1.5", "ema_decay must be in [0, 1)"),
        ("--eval-every", "-1", "eval_every must be >= 0"),
        ("--model.lora-alpha", "-8", "model.lora_alpha must be >= 0"),
        ("--threads", "-1", "threads must be >= 0"),
    ],
)
def test_bad_numbers_stop_the_command_before_anything_is_written(flag, value, named, tmp_path, capsys):
    run = tmp_path / "run"
    try:  # tyro reports a field its dataclass refuses itself (exit 2); the cross-field checks come back from main
        code = main(["train", "shapes_grpo_smoke", "--run-dir", str(run), flag, value])
    except SystemExit as stop:
        code = stop.code
    assert code == 2
    assert named in capsys.readouterr().err.replace("model.lora_rank and model.lora_alpha", "model.lora_alpha")
    assert not run.exists()


def _step(policy, cfg, hook=None):
    cond = policy.encode_prompts([p for p in PROMPTS for _ in range(2)])
    batch = grpo.collect(policy, cond, cfg, torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    handle = policy.trainable_parameters()[0].register_hook(hook) if hook else None
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=1e-2)
    metrics = grpo.train_step(policy, opt, batch, torch.tensor([1.0, -1.0, 0.5, -0.5]), cfg)
    if handle:
        handle.remove()
    moved = any(not torch.equal(a, p) for a, p in zip(before, policy.trainable_parameters()))
    return metrics, moved


def test_a_non_finite_loss_skips_the_step_even_when_its_gradients_are_finite(tiny_config):
    """A NaN clip range makes the policy loss NaN while its gradient through the clamp is finite, and the KL term
    still pulls: the step must be skipped all the same, and counted."""
    policy = make_policy(tiny_config)
    cfg = GRPOConfig(num_steps=3, micro_batch=2, optimizer_steps=2, kl_beta=0.04)
    metrics, moved = _step(policy, cfg)
    assert moved and metrics["skipped_steps"] == 0.0
    cfg.clip_range = float("nan")  # past the config's own checks, as a bug elsewhere could make it
    metrics, moved = _step(policy, cfg)
    assert not moved and metrics["skipped_steps"] == 2.0


def test_a_non_finite_gradient_skips_the_step_even_when_the_loss_is_finite(tiny_config):
    policy = make_policy(tiny_config)
    cfg = GRPOConfig(num_steps=3, micro_batch=2, optimizer_steps=2, kl_beta=0.0)
    metrics, moved = _step(policy, cfg, hook=lambda g: g * float("inf"))
    assert not moved and metrics["skipped_steps"] == 2.0 and metrics["policy_loss"] == metrics["policy_loss"]


def test_serve_reward_refuses_a_port_out_of_range(capsys):
    assert main(["serve-reward", "jpeg-compressibility", "--port", "70000"]) == 2
    assert "--port must be in 0..65535" in capsys.readouterr().err


def test_damaged_inputs_end_in_one_message_naming_the_file(tmp_path, capsys):
    """A run folder that is a file, a run whose config.yaml is not YAML, a binary prompt file: exit 2, the path named,
    nothing written."""
    not_a_folder = tmp_path / "run"
    not_a_folder.write_text("x")
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(not_a_folder)]) == 2
    assert f"run folder {not_a_folder} is a file" in capsys.readouterr().err and not_a_folder.read_text() == "x"

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text("iterations: [unclosed\n")
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(broken), "--resume"]) == 2
    assert f"{broken / 'config.yaml'} is not a valid run config" in capsys.readouterr().err
    assert main(["eval", "--run-dir", str(broken)]) == 2
    assert f"{broken / 'config.yaml'} is not a valid run config" in capsys.readouterr().err
    assert sorted(p.name for p in broken.iterdir()) == ["config.yaml"]

    binary = tmp_path / "prompts.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    run = tmp_path / "fresh"
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(run), "--train-prompts", str(binary)]) == 2
    assert f"prompt file {binary} is not UTF-8 text" in capsys.readouterr().err and not run.exists()


def test_non_finite_metrics_are_written_as_json_null(tmp_path):
    import json

    from rewardflow.utils.logging import append_jsonl, read_jsonl

    path = tmp_path / "metrics.jsonl"
    append_jsonl(
        path, {"iteration": 1, "grad_norm": float("nan"), "kl": float("inf"), "eval/rewards": {"a": -float("inf")}}
    )
    line = path.read_text().strip()
    json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))  # strict JSON
    assert read_jsonl(path) == [{"iteration": 1, "grad_norm": None, "kl": None, "eval/rewards": {"a": None}}]
