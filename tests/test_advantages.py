import numpy as np
import pytest
import torch

from rewardflow.algorithms.advantages import group_advantages, zero_std_fraction


def test_per_group_std_hand_computed():
    r = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 4.0])
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    adv = group_advantages(r, ids, global_std=False, eps=0.0, clip=100)
    # group 0: mean 2, population std 1 -> [-1, 1]; group 1: all equal -> 0 (std 0, centred 0); group 2: [-1, 1]
    expected = torch.tensor([-1.0, 1.0, 0.0, 0.0, -1.0, 1.0])
    assert torch.allclose(adv[[0, 1, 4, 5]], expected[[0, 1, 4, 5]])
    assert torch.equal(adv[2:4], torch.zeros(2))


def test_zero_variance_group_gets_zero_advantage_with_eps():
    r = torch.tensor([0.5, 0.5, 0.5, 0.5])
    ids = torch.tensor([0, 0, 1, 1])
    for global_std in (True, False):
        adv = group_advantages(r, ids, global_std=global_std)
        assert torch.equal(adv, torch.zeros(4))


def test_global_std_uses_all_rewards():
    r = torch.tensor([1.0, 3.0, 10.0, 14.0])
    ids = torch.tensor([0, 0, 1, 1])
    adv = group_advantages(r, ids, global_std=True, eps=1e-4, clip=100)
    std = float(np.std(r.numpy()))  # population std, like numpy in the official code
    expected = torch.tensor([-1.0, 1.0, -2.0, 2.0]) / (std + 1e-4)
    assert torch.allclose(adv, expected, atol=1e-6)


def test_unbiased_std_option():
    r = torch.tensor([1.0, 3.0])
    adv = group_advantages(r, torch.tensor([0, 0]), global_std=False, eps=0.0, unbiased=True)
    assert torch.allclose(adv, torch.tensor([-1.0, 1.0]) / np.sqrt(2.0))


def test_clipping():
    r = torch.tensor([0.0] * 99 + [1.0])
    adv = group_advantages(r, torch.zeros(100, dtype=torch.long), global_std=False, clip=5.0)
    assert adv.max() == pytest.approx(5.0)
    assert adv.min() > -5.0


def test_groups_need_not_be_contiguous():
    r = torch.tensor([1.0, 10.0, 3.0, 14.0])
    ids = torch.tensor([0, 1, 0, 1])
    adv = group_advantages(r, ids, global_std=False, eps=0.0)
    assert torch.allclose(adv, torch.tensor([-1.0, -1.0, 1.0, 1.0]))


def test_zero_std_fraction():
    r = torch.tensor([1.0, 1.0, 0.0, 2.0])
    assert zero_std_fraction(r, torch.tensor([0, 0, 1, 1])) == 0.5


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.zeros(4), torch.zeros(3, dtype=torch.long))
