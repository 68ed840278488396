"""Diversity and drift (judge-free measures), the eval solver choice, and the readable table."""

import json

import pytest
import torch

from rewardflow.cli import main
from rewardflow.evaluate import EvalConfig, diversity, drift, format_table, generate, pooled


def test_diversity_and_drift_on_hand_made_images():
    a = torch.zeros(2, 3, 8, 8)
    b = torch.full((2, 3, 8, 8), 0.25)
    # Two prompts, two samples each: prompt 0's samples differ by 0.25 everywhere, prompt 1's are identical.
    images = torch.stack([a[0], b[0], a[1], a[1]])
    assert diversity(pooled(images), 2) == pytest.approx(0.125)
    assert diversity(pooled(images), 1) is None
    assert drift(pooled(images), pooled(images)) == 0.0
    assert drift(pooled(images), pooled(images + 0.1)) == pytest.approx(0.1, abs=1e-6)
    big = torch.rand(2, 3, 256, 200)
    assert pooled(big).shape == (2, 3 * 64 * 50)  # pooled by 4 to at most 64 a side
    with pytest.raises(ValueError, match="same settings"):
        drift(pooled(images), pooled(images[:2]))


def test_the_eval_solver_is_a_choice_and_is_checked(tiny_policy):
    prompts = ["a circle", "two squares"]
    euler = generate(tiny_policy, prompts, EvalConfig(num_steps=4, guidance_scale=1.0))
    heun = generate(tiny_policy, prompts, EvalConfig(num_steps=4, guidance_scale=1.0, solver="heun"))
    assert euler.shape == heun.shape and not torch.equal(euler, heun)
    with pytest.raises(ValueError, match="eval.solver must be one of euler, heun, dpm2"):
        EvalConfig(solver="rk4")


def test_a_run_keeps_its_base_images_and_reports_drift_and_diversity(tmp_path, tiny_run_args, capsys):
    run = tmp_path / "run"
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(run), *tiny_run_args]) == 0
    assert (run / "eval" / "base_pooled.safetensors").is_file()
    base = json.loads((run / "eval" / "iter_00000.json").read_text())
    last = json.loads((run / "eval" / "iter_00002.json").read_text())
    assert "drift" not in base and base["diversity"] > 0
    assert last["drift"] > 0 and last["diversity"] > 0
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(run)]) == 0
    table = capsys.readouterr().out
    assert "category" in table and "drift" in table and "diversity" in table
    final = json.loads((run / "eval" / "final.json").read_text())
    assert final["drift"] == pytest.approx(last["drift"], abs=1e-3)  # the same weights, settings and noise
    # Other settings make other images: no base to compare with, so no drift (rather than a wrong one).
    assert main(["eval", "--run-dir", str(run), "--num-steps", "3", "--out", str(tmp_path / "x.json")]) == 0
    assert "drift" not in json.loads((tmp_path / "x.json").read_text())


def test_format_table_lists_categories_and_rewards():
    report = {"categories": {"counting": 0.5}, "clean_categories": {"counting": 0.25}, "overall": 0.5,
              "clean_overall": 0.25, "rewards": {"jpeg": 1.5}, "diversity": 0.1, "drift": None}  # fmt: skip
    text = format_table(report)
    assert "counting" in text and "0.500" in text and "0.250" in text and "reward jpeg" in text
    assert "drift" not in text
