"""The learned ``shapes-score`` and ``shapes-count`` rewards: the summary target, agreement, loading, training."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from rewardflow.shapes.grammar import COLORS, SHAPES, parse_prompt
from rewardflow.shapes.judge import detect, judge
from rewardflow.shapes.prompts import random_prompt
from rewardflow.shapes.render import render
from rewardflow.shapes.scorer import (
    FORMAT,
    KINDS,
    SUMMARY,
    ShapesCountReward,
    ShapesScoreReward,
    count_credit,
    detection_summary,
    load_scorer,
    save_scorer,
)
from rewardflow.shapes.scorer_training import ScoreTrainConfig, agreement, train_scorer
from rewardflow.utils.checkpoint import save_safetensors_atomic


def test_detection_summary_counts_rendered_objects():
    rng = np.random.default_rng(3)
    img, objects = render(parse_prompt("a red circle left of a blue square"), rng)
    summary = detection_summary([detect(img)])
    assert summary.shape == (1, SUMMARY)
    expected = torch.zeros(KINDS)
    for obj in objects:
        k = COLORS.index(obj.color) * len(SHAPES) + SHAPES.index(obj.shape)
        expected[k] += 1
    assert torch.equal(summary[0, :KINDS], expected)
    assert summary[0, KINDS] == 0 and summary[0, KINDS + 1] == len(objects)  # no blobs; all detections


def test_agreement_by_hand():
    labels = torch.tensor([0.0, 1.0, 0.5, 0.5, 1.0])
    scores = torch.tensor([0.1, 0.9, 0.8, 0.2, 0.1])
    prompts = ["a", "a", "a", "b", "b"]
    out = agreement(scores, labels, prompts)
    # pairs with different labels: (0,1) agree, (0,2) agree, (1,2) agree, (3,4) disagree -> 3 of 4
    assert out["pairs"] == 4 and out["pair_agreement"] == 0.75


def test_shipped_scorer_is_differentiable_and_loads_without_its_training_head(tmp_path):
    reward = ShapesScoreReward()
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = reward(images, ["a circle", "two squares"], [{}, {}])
    assert ((out.scores > 0) & (out.scores < 1)).all()
    out.scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0

    model = load_scorer()
    model.summary_head = None  # a scorer trained before the summary head existed
    path = tmp_path / "old.safetensors"
    save_scorer(model, path)
    old = load_scorer(path)
    tokens = reward.tokenizer(["a circle"])
    assert torch.equal(old(images[:1].detach(), tokens), load_scorer()(images[:1].detach(), tokens))

    state = {k: v.detach() for k, v in model.state_dict().items()}
    state["stray.weight"] = torch.zeros(1)
    meta = {"format": FORMAT, "config": json.dumps(dataclasses.asdict(model.config))}
    save_safetensors_atomic(state, tmp_path / "stray.safetensors", meta)
    with pytest.raises(ValueError, match="does not fit"):
        load_scorer(tmp_path / "stray.safetensors")


def test_train_scorer_writes_a_loadable_checkpoint_and_report(tmp_path):
    out = tmp_path / "score.safetensors"
    cfg = ScoreTrainConfig(out=str(out), base_samples=8, held_out_samples=12, rendered=16, sample_steps=2,
                           steps=3, batch_size=8)  # fmt: skip
    report = train_scorer(cfg)
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text())["pairs"] == report["pairs"]
    assert 0.0 <= report["mean_score"] <= 1.0
    assert load_scorer(out)(torch.rand(1, 3, 32, 32), ShapesScoreReward(out).tokenizer(["a circle"])).shape == (1,)


def test_count_credit_on_real_detections_is_the_judges_score():
    """Fed the summary of what the detector found, the count rule gives the judge's score and extra exactly."""
    rng = np.random.default_rng(0)
    prompts, summaries, verdicts = [], [], []
    while len(prompts) < 120:
        spec = random_prompt(rng)
        if spec.relation is not None:
            continue  # the count head has no positions: relation prompts score on their objects only
        drawn = random_prompt(rng) if len(prompts) % 2 else spec  # half the scenes are of another prompt
        found = detect(render(drawn, rng)[0])
        prompts.append(spec.text)
        summaries.append(detection_summary([found]))
        verdicts.append(judge(spec, found))
    score, extra = count_credit(torch.cat(summaries), prompts)
    expected = torch.tensor([v.score for v in verdicts])
    assert torch.allclose(score, expected, atol=1e-6), (score - expected).abs().max()
    assert torch.equal(extra, torch.tensor([float(v.extra) for v in verdicts]))
    assert 0.2 < (expected == 1.0).float().mean() < 0.9  # both right and partly wrong scenes were checked


def test_count_credit_by_hand_on_real_valued_counts():
    summary = torch.zeros(3, SUMMARY)
    red_circle = COLORS.index("red") * len(SHAPES) + SHAPES.index("circle")
    blue_circle = COLORS.index("blue") * len(SHAPES) + SHAPES.index("circle")
    summary[0, red_circle] = 2.5  # "three red circles": 1 - 0.5 / 3
    summary[1, blue_circle], summary[1, KINDS + 1] = 2.0, 4.0  # wrong colour: half of 1 - 1/3; 1 extra
    summary[2, blue_circle] = 0.25  # "a circle": min(m, 1)
    score, extra = count_credit(summary, ["three red circles", "three red circles", "a circle"])
    assert torch.allclose(score, torch.tensor([1 - 0.5 / 3, 0.5 * (1 - 1 / 3), 0.25]))
    assert torch.equal(extra, torch.tensor([0.0, 1.0, 0.0]))


def test_shapes_count_reward_is_differentiable_and_needs_the_count_head(tmp_path):
    reward = ShapesCountReward(extra_object_penalty=0.5)
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = reward(images, ["three squares", "a red circle"], [{}, {}])
    assert torch.allclose(out.scores, out.details["count_score"] - 0.5 * out.details["extra"])
    out.scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0

    model = load_scorer()
    model.summary_head = None
    save_scorer(model, tmp_path / "no_head.safetensors")
    with pytest.raises(ValueError, match="no count head"):
        ShapesCountReward(tmp_path / "no_head.safetensors")
    with pytest.raises(ValueError, match="extra_object_penalty"):
        ShapesCountReward(extra_object_penalty=-1.0)
