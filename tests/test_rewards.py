import pytest
import torch

from rewardflow.algorithms.advantages import aggregate_advantages, group_advantages
from rewardflow.rewards import build_reward
from rewardflow.rewards.config import RewardConfig
from rewardflow.rewards.image import JpegSize
from rewardflow.rewards.multi import WeightedRewards
from rewardflow.types import RewardOutput


class Fixed:
    """A reward returning given scores and details."""

    def __init__(self, name, scores, details=None):
        self.name, self.scores, self.details = name, torch.tensor(scores), details or {}

    def __call__(self, images, prompts, metadata):
        return RewardOutput(scores=self.scores, details=self.details)


def test_jpeg_size_prefers_flat_images_and_its_sign_flips():
    flat = torch.full((1, 3, 32, 32), 0.3)
    busy = torch.rand((1, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, busy])
    small = JpegSize(sign=-1.0)(images, ["", ""], [{}, {}])
    kb = small.details["jpeg_kb"]
    assert kb[0] < kb[1] and torch.equal(small.scores, -kb)
    assert small.scores[0] > small.scores[1]  # compressibility rewards the flat image
    assert torch.equal(JpegSize(sign=1.0)(images, ["", ""], [{}, {}]).scores, kb)


def test_weighted_rewards_sum_keep_components_and_merge_details():
    a = Fixed("a", [1.0, 0.0], {"hits": torch.tensor([1.0, 0.0])})
    b = Fixed("b", [0.5, 2.0], {"hits": torch.tensor([0.0, 1.0]), "size": torch.tensor([3.0, 4.0])})
    out = WeightedRewards([a, b], [2.0, -1.0])(torch.zeros(2, 3, 4, 4), ["x", "y"], [{}, {}])
    assert torch.allclose(out.scores, torch.tensor([2.0 - 0.5, 0.0 - 2.0]))
    assert torch.equal(out.components["a"], a.scores) and torch.equal(out.components["b"], b.scores)
    assert set(out.details) == {"hits", "b/hits", "size"}  # a shared detail name is prefixed by its reward
    renamed = WeightedRewards([a, b], [1.0, 1.0], ["first", "second"])(torch.zeros(2, 3, 4, 4), ["x", "y"], [{}, {}])
    assert set(renamed.components) == {"first", "second"}  # keyed by the configured names
    with pytest.raises(ValueError, match="one weight per reward"):
        WeightedRewards([a, b], [1.0])
    bad = Fixed("bad", [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="'bad' returned scores of shape \\(3,\\), not one per image \\(2\\)"):
        WeightedRewards([bad], [1.0])(torch.zeros(2, 3, 4, 4), ["x", "y"], [{}, {}])
    # Non-finite scores pass through: the training loop skips that update and counts it.
    nan = WeightedRewards([Fixed("nan", [float("nan"), 1.0])], [1.0])(torch.zeros(2, 3, 4, 4), ["x", "y"], [{}, {}])
    assert torch.isnan(nan.scores[0]) and nan.scores[1] == 1.0


def test_advantage_aggregation_by_hand():
    """Two groups of two; per-group std so the numbers stay small."""
    r1, r2 = torch.tensor([1.0, 3.0, 0.0, 0.0]), torch.tensor([10.0, 0.0, 4.0, 2.0])
    groups = torch.tensor([0, 0, 1, 1])
    w = {"r1": 1.0, "r2": 0.5}
    kw = {"global_std": False, "eps": 0.0, "clip": 5.0}
    # reward aggregation: s = r1 + r2 / 2 = [6, 3, 2, 1] -> group 0: mean 4.5, std 1.5 -> [1, -1]; group 1: [1, -1]
    s = r1 + 0.5 * r2
    adv_r = aggregate_advantages(s, {"r1": r1, "r2": r2}, w, groups, "reward", global_std=False, clip=5.0)
    assert torch.allclose(adv_r, group_advantages(s, groups, **kw), atol=1e-3)
    assert torch.allclose(adv_r, torch.tensor([1.0, -1.0, 1.0, -1.0]), atol=1e-3)
    # advantage aggregation: A1 = [-1, 1, 0, 0], A2 = [1, -1, 1, -1] -> A1 + A2 / 2 = [-0.5, 0.5, 0.5, -0.5]
    adv_a = aggregate_advantages(s, {"r1": r1, "r2": r2}, w, groups, "advantage", global_std=False, clip=5.0)
    assert torch.allclose(adv_a, torch.tensor([-0.5, 0.5, 0.5, -0.5]), atol=1e-3)
    # the sum is clipped again
    big = aggregate_advantages(s, {"r1": r1, "r2": r2}, {"r1": 9.0, "r2": 0.0}, groups, "advantage", clip=5.0)
    assert big.abs().max() <= 5.0
    # one reward: both conventions agree (the weighted sum 2 r1 normalises to r1's advantages)
    by_reward = aggregate_advantages(2 * r1, {"r1": r1}, {"r1": 2.0}, groups, "reward", global_std=False)
    by_adv = aggregate_advantages(2 * r1, {"r1": r1}, {"r1": 2.0}, groups, "advantage", global_std=False)
    assert torch.allclose(by_reward, by_adv, atol=1e-3)
    assert torch.allclose(by_reward, torch.tensor([-1.0, 1.0, 0.0, 0.0]), atol=1e-3)


def test_reward_config_errors_name_the_field():
    with pytest.raises(ValueError, match="reward.weights"):
        RewardConfig(names=("shapes-judge", "jpeg-compressibility"), weights=(1.0,))
    with pytest.raises(ValueError, match="reward.aggregate"):
        RewardConfig(aggregate="max")
    with pytest.raises(ValueError, match="reward.names"):
        RewardConfig(names=())
    with pytest.raises(ValueError, match="reward.names"):
        RewardConfig(names=("shapes-judge", "shapes-judge"))
    with pytest.raises(ValueError, match="unknown rewards \\['clip'\\].*shapes-judge"):
        build_reward(RewardConfig(names=("clip",)))
    both = build_reward(RewardConfig(names=("shapes-judge", "jpeg-compressibility"), weights=(1.0, 0.1)))
    out = both(torch.zeros(2, 3, 32, 32), ["a circle", "two squares"], [{}, {}])
    assert set(out.components) == {"shapes-judge", "jpeg-compressibility"}
    assert torch.allclose(out.scores, out.components["shapes-judge"] + 0.1 * out.components["jpeg-compressibility"])


def test_run_configs_written_with_one_reward_name_still_load():
    from rewardflow.config import TrainConfig, from_yaml, to_yaml

    old = to_yaml(TrainConfig()).replace("  names:\n  - shapes-judge\n", "  name: shapes-judge\n")
    assert "name: shapes-judge" in old
    assert from_yaml(old).reward.names == ("shapes-judge",)
