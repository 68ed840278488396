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


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_steps"):
        schedules.uniform(0)
    with pytest.raises(ValueError, match="shift"):
        schedules.shift(schedules.uniform(3), 0.0)


# The published scheduler configs (scheduler/scheduler_config.json of each Hub folder), as data: no download.
SD35_MEDIUM = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
    "invert_sigmas": False, "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000,
    "shift": 3.0, "shift_terminal": None, "use_beta_sigmas": False, "use_dynamic_shifting": False,
    "use_exponential_sigmas": False, "use_karras_sigmas": False,
}  # fmt: skip
FLUX1_DEV = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
    "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True,
}  # fmt: skip


def _sd3_oracle(steps: int, s: float) -> list[float]:
    """SD3's pipeline grid by hand: timesteps from 1000 down to the shifted 1/1000, as sigmas, shifted again."""
    shifted = lambda u: s * u / (1 + (s - 1) * u)  # noqa: E731
    lo = shifted(1 / 1000)
    return [shifted(1 + (lo - 1) * i / (steps - 1)) for i in range(steps)] + [0.0]


def _flux_oracle(steps: int, tokens: int) -> list[float]:
    """FLUX's pipeline grid by hand: ``linspace(1, 1/T, T)`` through ``e^mu / (e^mu + 1/u - 1)``, then 0."""
    mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
    base = [1 + (1 / steps - 1) * i / (steps - 1) for i in range(steps)]
    return [math.exp(mu) / (math.exp(mu) + 1 / u - 1) for u in base] + [0.0]


@pytest.mark.parametrize("steps", [6, 10, 28, 40])
def test_published_sd35_medium_and_flux1_dev_grids(steps):
    pytest.importorskip("diffusers")
    from rewardflow.models.flux import flux_sigmas
    from rewardflow.models.sd3 import sd3_sigmas

    for latent in (64, 128):  # 512 and 1024 px: SD3.5's grid does not depend on the size
        got = sd3_sigmas(SD35_MEDIUM, steps, latent)
        assert got.dtype == torch.float32 and got.shape == (steps + 1,)
        assert torch.allclose(got, torch.tensor(_sd3_oracle(steps, 3.0)), atol=1e-6)
    for latent, tokens in ((64, 1024), (90, 2025), (128, 4096)):  # 512, 720 and 1024 px
        got = flux_sigmas(FLUX1_DEV, steps, latent)
        assert torch.allclose(got, torch.tensor(_flux_oracle(steps, tokens)), atol=1e-6)
    if steps == 10:  # the grid the issue names: the last non-zero sigma is about 0.009, not 0.25
        assert sd3_sigmas(SD35_MEDIUM, 10, 64)[-2] == pytest.approx(0.00893, abs=1e-4)


def test_another_scheduler_config_gets_its_own_grid():
    """The grid is the scheduler's, not a copy of one formula: ``shift_terminal`` and dynamic shifting apply."""
    pytest.importorskip("diffusers")
    from rewardflow.models.sd3 import sd3_sigmas

    terminal = sd3_sigmas({**SD35_MEDIUM, "shift_terminal": 0.1}, 8, 64)
    assert terminal[-2] == pytest.approx(0.1, abs=1e-6) and terminal[0] == pytest.approx(1.0)
    dynamic = sd3_sigmas({**SD35_MEDIUM, "use_dynamic_shifting": True}, 8, 128)  # 64 x 64 tokens: mu = max_shift
    assert not torch.allclose(dynamic, sd3_sigmas(SD35_MEDIUM, 8, 128))
    mu = 1.15
    u = 1 + (1 / 1000 - 1) * 3 / 7  # the 4th of 8 timesteps from 1000 to 1 (unshifted with dynamic shifting)
    assert float(dynamic[3]) == pytest.approx(math.exp(mu) / (math.exp(mu) + 1 / u - 1), abs=1e-6)
