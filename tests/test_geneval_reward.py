"""GenEval's rules over detections: hand-made detections, the Shapes detector on rendered scenes, the server."""

import numpy as np
import pytest
import torch

from rewardflow.rewards import build_reward
from rewardflow.rewards.config import RewardConfig
from rewardflow.rewards.geneval import (
    DetectedObject,
    GenEvalReward,
    ShapesDetector,
    geneval_verdict,
    load_detector,
    shapes_metadata,
)
from rewardflow.rewards.remote import RemoteReward
from rewardflow.rewards.server import RewardServer
from rewardflow.shapes.grammar import parse_prompt
from rewardflow.shapes.prompts import eval_prompts
from rewardflow.shapes.render import render
from rewardflow.shapes.reward import ShapesJudgeReward


def obj(label, x, y, color=None, score=1.0, size=4.0):
    return DetectedObject(label, (x - size, y - size, x + size, y + size), score, color)


def test_counting_needs_the_exact_number_above_the_counting_threshold_with_partial_credit():
    meta = shapes_metadata("three squares")
    assert meta == {"tag": "counting", "include": [{"class": "square", "count": 3}],
                    "exclude": [{"class": "square", "count": 4}]}  # fmt: skip
    three = [obj("square", 5 + 8 * i, 10) for i in range(3)]
    assert geneval_verdict(meta, three) == (True, 1.0)
    assert geneval_verdict(meta, three[:2]) == (False, pytest.approx(2 / 3))
    assert geneval_verdict(meta, [*three, obj("square", 20, 25)]) == (False, pytest.approx(2 / 3))
    # Confidence 0.5 passes GenEval's general threshold (0.3) but not the counting one (0.9).
    assert geneval_verdict(meta, [*three[:2], obj("square", 20, 25, score=0.5)])[0] is False
    assert geneval_verdict(shapes_metadata("a square"), [obj("square", 9, 9, score=0.5)]) == (True, 1.0)
    assert geneval_verdict(shapes_metadata("a square"), [obj("square", 9, 9, score=0.2)]) == (False, 0.0)


def test_colour_and_position_earn_partial_credit_once_the_count_is_met():
    meta = shapes_metadata("a red circle")
    assert geneval_verdict(meta, [obj("circle", 9, 9, "red")]) == (True, 1.0)
    assert geneval_verdict(meta, [obj("circle", 9, 9, "blue")]) == (False, 0.5)
    assert geneval_verdict(meta, []) == (False, 0.0)  # count unmet: 0 of 2 parts

    meta = shapes_metadata("a circle left of a square")
    assert meta["include"] == [{"class": "square", "count": 1}, {"class": "circle", "count": 1,
                                                                  "position": ["left of", 0]}]  # fmt: skip
    assert geneval_verdict(meta, [obj("circle", 6, 16), obj("square", 26, 16)]) == (True, 1.0)
    assert geneval_verdict(meta, [obj("circle", 26, 16), obj("square", 6, 16)]) == (False, 0.75)
    assert geneval_verdict(meta, [obj("circle", 16, 17), obj("square", 17, 16)]) == (False, 0.75)  # too close
    assert geneval_verdict(meta, [obj("circle", 6, 16)]) == (False, pytest.approx(0.25))  # no target: 0 + 1/2

    meta = shapes_metadata("a red circle and a blue square")
    good = [obj("circle", 6, 6, "red"), obj("square", 20, 20, "blue")]
    assert geneval_verdict(meta, good) == (True, 1.0)
    assert geneval_verdict(meta, [obj("circle", 6, 6, "blue"), obj("square", 20, 20, "red")]) == (False, 0.5)


def test_the_shapes_detector_passes_every_clean_scene_and_agrees_with_the_judge_on_mismatched_pairs():
    rng = np.random.default_rng(0)
    specs = eval_prompts()[::3]
    images = torch.from_numpy(np.stack([render(s, rng)[0] for s in specs])).permute(0, 3, 1, 2).float() / 255
    prompts = [s.text for s in specs]
    reward = build_reward(RewardConfig(names=("geneval",)))  # the registry's default detector: "shapes"
    out = reward(images, prompts, [{} for _ in prompts])
    assert out.details["strict"].tolist() == [1.0] * len(prompts)
    assert out.scores.tolist() == [1.0] * len(prompts)
    # The same images under other prompts: GenEval's verdict and the Shapes judge's strict one mostly agree.
    shuffled = prompts[1:] + prompts[:1]
    ge = reward(images, shuffled, [{} for _ in prompts]).details["strict"]
    judge = ShapesJudgeReward()(images, shuffled, [{"category": parse_prompt(p).category} for p in shuffled])
    assert ge.mean() < 0.3
    assert (ge == judge.details["strict"]).float().mean() > 0.9


def test_bad_metadata_and_detectors_are_named():
    reward = GenEvalReward(lambda images: [[] for _ in images])
    image = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="'include' must be a non-empty list"):
        reward(image, ["a cat"], [{"include": []}])
    with pytest.raises(ValueError, match="'position' must be \\[relation, earlier entry index\\]"):
        reward(image, ["x"], [{"include": [{"class": "cat", "count": 1, "position": ["near", 0]}]}])
    with pytest.raises(ValueError, match="'count' must be a positive integer"):
        reward(image, ["x"], [{"include": [{"class": "cat", "count": 0}]}])
    with pytest.raises(ValueError, match="'nope'"):  # no metadata, not a Shapes prompt
        reward(image, ["a nope"], [{}])
    with pytest.raises(ValueError, match="returned 0 detection lists for 1 images"):
        GenEvalReward(lambda images: [])(image, ["a circle"], [{}])
    with pytest.raises(ValueError, match="'shapes' or 'module:factory'"):
        load_detector("mask2former")
    with pytest.raises(ValueError, match="cannot be imported"):
        load_detector("no_such_module_here:make")
    assert isinstance(load_detector("rewardflow.rewards.geneval:ShapesDetector"), ShapesDetector)


def test_geneval_metadata_travels_to_a_server_and_scores_match():
    rng = np.random.default_rng(1)
    specs = eval_prompts()[::20]
    images = torch.from_numpy(np.stack([render(s, rng)[0] for s in specs])).permute(0, 3, 1, 2).float() / 255
    prompts = [s.text for s in specs][::-1]  # mismatched on purpose: a spread of scores
    metadata = [shapes_metadata(p) for p in prompts]
    reward = GenEvalReward(ShapesDetector())
    server = RewardServer(reward).start()
    try:
        remote = RemoteReward(server.url)(images, prompts, metadata)
    finally:
        server.stop()
    local = reward(images, prompts, metadata)
    assert remote.scores.tolist() == local.scores.tolist()
    assert remote.details["strict"].tolist() == local.details["strict"].tolist()
