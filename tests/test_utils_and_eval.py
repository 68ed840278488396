import numpy as np
import pytest
import torch

from rewardflow.data.prompts import PromptRecord
from rewardflow.shapes.judge import Detection, Verdict
from rewardflow.shapes.render import PlacedObject, draw
from rewardflow.shapes.reward import ShapesJudgeReward, summarize
from rewardflow.utils.ema import EMA, warmup_decay


def test_ema_schedule_update_and_swap():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], warmup_decay(0.9), every=2)
    with torch.no_grad():
        p.fill_(1.0)
    ema.step()  # call 1 of 2: no update yet
    assert torch.equal(ema.shadow[0], torch.zeros(3))
    ema.step()  # optimizer step k = 1: decay (1 + 1) / (10 + 1), as in Flow-GRPO (k counts optimizer steps)
    assert torch.allclose(ema.shadow[0], torch.full((3,), 9 / 11))
    with ema.swapped():
        assert torch.allclose(p, torch.full((3,), 9 / 11))
    assert torch.equal(p.detach(), torch.ones(3))
    assert warmup_decay(0.9)(1000) == 0.9
    state = ema.state_dict()
    other = EMA([torch.nn.Parameter(torch.zeros(3))], warmup_decay(0.9))
    other.load_state_dict(state)
    assert torch.equal(other.shadow[0], ema.shadow[0]) and other.updates == 1
    with pytest.raises(ValueError, match="shape"):
        EMA([torch.nn.Parameter(torch.zeros(4))], warmup_decay(0.9)).load_state_dict(state)


def _v(strict, clean, n_det=1, shape="circle", color="red"):
    det = Detection(shape, color, 10.0, 10.0, 50.0, 0.01)
    return Verdict(strict, clean, float(strict), 0, tuple([det] * n_det))


def test_summary_is_mean_of_category_accuracies():
    recs = [
        PromptRecord("a circle", {"category": "single_object"}),
        PromptRecord("two circles", {"category": "counting", "held_out": True}),
        PromptRecord("three circles", {"category": "counting"}),
    ]
    verdicts = [
        _v(True, True),
        _v(True, False),
        _v(False, False),
        _v(False, False),
        _v(True, True, 2),
        _v(True, False),
    ]
    rep = summarize(recs, verdicts, samples_per_prompt=2)
    assert rep["categories"] == {"single_object": 1.0, "counting": 0.5}
    assert rep["overall"] == pytest.approx(0.75)
    assert rep["clean_categories"] == {"single_object": 0.5, "counting": 0.25}
    assert rep["held_out_strict"] == 0.0 and rep["seen_strict"] == 1.0
    assert rep["histogram"]["colors"]["red"] == 7 and rep["histogram"]["shapes"]["circle"] == 7
    assert rep["detections_per_image"]["counting"] == pytest.approx(1.25)
    assert rep["shape_pairs"] == {}


def test_summary_splits_two_object_prompts_by_shape_pair():
    recs = [
        PromptRecord("a circle and a square", {"category": "two_object"}),
        PromptRecord("a square and a circle", {"category": "two_object"}),
        PromptRecord("a triangle and a circle", {"category": "two_object"}),
        PromptRecord("a red circle and a blue circle", {"category": "color_attr"}),
        PromptRecord("a square left of a triangle", {}),  # category from the grammar
        PromptRecord("three squares", {"category": "counting"}),
    ]
    strict = [True, False, False, False, True, True, False, True, True, True, True, True]
    rep = summarize(recs, [_v(s, s) for s in strict], samples_per_prompt=2)
    assert rep["shape_pairs"] == {
        "two_object": {"circle/square": 0.25, "circle/triangle": 1.0},
        "position": {"square/triangle": 1.0},
        "color_attr": {"circle/circle": 0.5},
    }
    with pytest.raises(ValueError, match="7 verdicts for 6 prompts x 1"):
        summarize(recs, [_v(True, True)] * 7, samples_per_prompt=1)


def test_shapes_reward_penalises_extra_objects():
    rng = np.random.default_rng(0)
    one = draw([PlacedObject("circle", "red", 16, 16, 9)], rng)
    three = draw([PlacedObject("circle", "red", 8, 8, 8), PlacedObject("square", "blue", 24, 8, 8),
                  PlacedObject("triangle", "white", 16, 24, 8)], rng)  # fmt: skip
    images = torch.from_numpy(np.stack([one, three])).permute(0, 3, 1, 2).float() / 255
    out = ShapesJudgeReward(0.25)(images, ["a red circle", "a red circle"], [{}, {}])
    assert out.details["strict"].tolist() == [1.0, 1.0]
    assert out.details["clean"].tolist() == [1.0, 0.0]
    assert out.scores.tolist() == pytest.approx([1.0, 0.5])
    plain = ShapesJudgeReward(0.0)(images, ["a red circle", "a red circle"], [{}, {}])
    assert plain.scores.tolist() == [1.0, 1.0]
    # "two circles" fails strictly on one circle: partial credit 0.5, minus 0.25 for 3 detections of 2 asked.
    two = ShapesJudgeReward(0.25)(images, ["a red circle", "two circles"], [{}, {}])
    assert two.details["strict"].tolist() == [1.0, 0.0]
    assert two.scores.tolist() == pytest.approx([1.0, 0.5 - 0.25 * 1])
    with pytest.raises(ValueError, match="extra_object_penalty"):
        ShapesJudgeReward(-1.0)


def test_evaluation_scores_extra_rewards_on_its_images(tiny_policy, tmp_path, monkeypatch):
    from rewardflow.evaluate import EvalConfig, evaluate
    from rewardflow.rewards import REWARDS
    from rewardflow.rewards.config import RewardConfig
    from rewardflow.types import RewardOutput

    seen = {}

    class Brightness:
        name = "brightness"

        def __init__(self, cfg):
            seen["penalty"] = cfg.extra_object_penalty  # built with the run's reward settings

        def __call__(self, images, prompts, metadata):
            seen["prompts"], seen["metadata"] = prompts, metadata
            return RewardOutput(scores=images.float().mean(dim=(1, 2, 3)))

    monkeypatch.setitem(REWARDS, "brightness", Brightness)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a circle", "category": "single_object"}\n{"prompt": "a red square"}\n')
    cfg = EvalConfig(prompts=str(prompts), samples_per_prompt=2, num_steps=2, rewards=("brightness",))
    report, images = evaluate(tiny_policy, cfg, RewardConfig(extra_object_penalty=0.5))
    assert report["rewards"]["brightness"] == pytest.approx(images.pooled.mean().item(), rel=1e-6)
    assert seen["penalty"] == 0.5 and seen["prompts"] == ["a circle"] * 2 + ["a red square"] * 2
    assert seen["metadata"][0]["category"] == "single_object"
    assert "rewards" not in evaluate(tiny_policy, EvalConfig(prompts=str(prompts), num_steps=2))[0]
    with pytest.raises(ValueError, match=r"eval.rewards has unknown rewards \['nope'\]; registered rewards: "):
        EvalConfig(rewards=("nope",))
