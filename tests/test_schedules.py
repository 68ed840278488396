import math

import pytest
import torch

from rewardflow.sampling import schedules


def test_uniform_grid_endpoints_and_spacing():
    s = schedules.uniform(10)
    assert s.shape == (11,) and s.dtype == torch.float32
    assert s[0] == 1.0 and s[-1] == 0.0
    assert torch.allclose(s[:-1] - s[1:], torch.full((10,), 0.1), atol=1e-7)


def test_sd3_shift_matches_formula():
    s = schedules.sd3_schedule(10, 3.0)
    for u, got in zip(schedules.uniform(10).tolist(), s.tolist()):
        assert got == pytest.approx(3 * u / (1 + 2 * u), abs=1e-7)
    assert s[0] == 1.0 and s[-1] == 0.0
    # shift 1 is the identity
    assert torch.equal(schedules.shift(schedules.uniform(7), 1.0), schedules.uniform(7))


def test_flux_mu_is_linear_between_anchors():
    assert schedules.flux_mu(256) == pytest.approx(0.5)
    assert schedules.flux_mu(4096) == pytest.approx(1.15)
    assert schedules.flux_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)


def test_flux_schedule_matches_formula():
    t, seq = 6, 1024
    mu = schedules.flux_mu(seq)
    s = schedules.flux_schedule(t, seq)
    base = [1 - i / t for i in range(t)]  # linspace(1, 1/T, T)
    for u, got in zip(base, s[:-1].tolist()):
        assert got == pytest.approx(math.exp(mu) / (math.exp(mu) + (1 / u - 1)), abs=1e-6)
    assert s[-1] == 0.0 and s[0] == 1.0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_steps"):
        schedules.uniform(0)
    with pytest.raises(ValueError, match="shift"):
        schedules.shift(schedules.uniform(3), 0.0)
