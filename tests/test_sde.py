import math

import pytest
import torch

from rewardflow.sampling.ode import euler_step
from rewardflow.sampling.schedules import sd3_schedule, uniform
from rewardflow.sampling.sde import (
    cps_step,
    dance_sde_step,
    flow_grpo_g,
    gaussian_log_prob,
    kl_code,
    kl_paper,
    sde_step,
)


def _inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 4, 4, generator=g), torch.randn(b, 3, 4, 4, generator=g)


def test_log_prob_equals_torch_normal_mean_reduced():
    x, v = _inputs()
    out = sde_step(x, v, 0.6, 0.45, 0.7, generator=torch.Generator().manual_seed(1))
    normal = torch.distributions.Normal(out.mean, out.std.view(-1, 1, 1, 1).expand_as(out.mean))
    expected = normal.log_prob(out.x_next).mean(dim=(1, 2, 3))
    assert torch.allclose(out.log_prob, expected, atol=1e-5)
    summed = sde_step(x, v, 0.6, 0.45, 0.7, x_next=out.x_next, reduction="sum").log_prob
    assert torch.allclose(summed, normal.log_prob(out.x_next).sum(dim=(1, 2, 3)), atol=1e-3)


def test_mean_and_std_match_reference_formulas():
    x, v = _inputs()
    s, sn, a = 0.8, 0.6, 0.7
    out = sde_step(x, v, s, sn, a, generator=torch.Generator().manual_seed(0))
    g = a * math.sqrt(s / (1 - s))
    dt = s - sn
    mean = x * (1 - g**2 * dt / (2 * s)) - dt * v * (1 + g**2 * (1 - s) / (2 * s))
    assert torch.allclose(out.mean, mean, atol=1e-6)
    assert torch.allclose(out.std, torch.full((3,), g * math.sqrt(dt)), atol=1e-6)
    # the same mean written as x - dt [v - g^2/2 * score] with score = -(x + (1 - s) v) / s
    score = -(x + (1 - s) * v) / s
    assert torch.allclose(out.mean, x - dt * (v - 0.5 * g**2 * score), atol=1e-6)


def test_sigma_one_uses_next_sigma_in_denominator():
    s, sn = torch.tensor([1.0, 0.5]), torch.tensor([0.9, 0.4])
    g = flow_grpo_g(s, sn, 0.7)
    assert g[0] == pytest.approx(0.7 * math.sqrt(1.0 / 0.1), rel=1e-6)
    assert g[1] == pytest.approx(0.7 * math.sqrt(0.5 / 0.5), rel=1e-6)
    x, v = _inputs(2)
    out = sde_step(x, v, s, sn, 0.7, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.log_prob).all() and torch.isfinite(out.x_next).all()


def test_noise_level_zero_is_euler():
    x, v = _inputs()
    sde = sde_step(x, v, 0.7, 0.5, 0.0, generator=torch.Generator().manual_seed(0))
    ode = euler_step(x, v, 0.7, 0.5)
    assert torch.equal(sde.x_next, ode.x_next)
    assert torch.equal(sde.log_prob, torch.zeros(3))


def test_per_sample_sigmas_match_scalar_calls():
    x, v = _inputs()
    s, sn = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.3, 0.0])
    batched = sde_step(x, v, s, sn, 0.7, generator=torch.Generator().manual_seed(0))
    for i in range(3):
        single = sde_step(x[i : i + 1], v[i : i + 1], float(s[i]), float(sn[i]), 0.7, x_next=batched.x_next[i : i + 1])
        assert torch.allclose(single.mean, batched.mean[i : i + 1])
        assert torch.allclose(single.log_prob, batched.log_prob[i : i + 1])


def test_float32_math_for_low_precision_inputs():
    x, v = _inputs()
    out = sde_step(x.bfloat16(), v.bfloat16(), 0.5, 0.4, 0.7, generator=torch.Generator().manual_seed(0))
    assert out.mean.dtype == out.log_prob.dtype == out.x_next.dtype == torch.float32


def test_given_x_next_is_scored_not_resampled():
    x, v = _inputs()
    target = torch.randn_like(x)
    out = sde_step(x, v, 0.5, 0.4, 0.7, x_next=target)
    assert torch.equal(out.x_next, target)
    assert torch.allclose(out.log_prob, gaussian_log_prob(target, out.mean, out.std))


def test_kl_forms_against_torch_distributions():
    x, v = _inputs()
    a = sde_step(x, v, 0.5, 0.4, 0.7, generator=torch.Generator().manual_seed(0))
    b = sde_step(x, v + 0.1 * torch.randn_like(v), 0.5, 0.4, 0.7, x_next=a.x_next)
    std = a.std.view(-1, 1, 1, 1).expand_as(a.mean)
    exact = torch.distributions.kl_divergence(
        torch.distributions.Normal(a.mean, std), torch.distributions.Normal(b.mean, std)
    )
    assert torch.allclose(kl_paper(a.mean, b.mean, a.std), exact.sum(dim=(1, 2, 3)), rtol=1e-4)
    # code form: mean over elements, g^2 = std^2 / dt in the denominator (no dt)
    assert torch.allclose(kl_code(a.mean, b.mean, a.std, 0.1), exact.mean(dim=(1, 2, 3)) * 0.1, rtol=1e-4)
    # paper's velocity form: (dt/2) (g (1 - t) / (2 t) + 1 / g)^2 |v - v_ref|^2
    g, dt, t = float(a.std[0]) / math.sqrt(0.1), 0.1, 0.5
    coef = dt / 2 * (g * (1 - t) / (2 * t) + 1 / g) ** 2
    dvv = ((b.mean - a.mean) / (dt * (1 + g**2 * (1 - t) / (2 * t)))) ** 2
    assert torch.allclose(kl_paper(a.mean, b.mean, a.std), coef * dvv.sum(dim=(1, 2, 3)), rtol=1e-4)


M, S0 = 0.7, 0.5


def _exact_velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Exact velocity E[eps - x0 | x_sigma = x] for x0 ~ N(M, S0^2 I)."""
    a = 1 - sigma
    var = a * a * S0 * S0 + sigma * sigma
    return (sigma - a * S0 * S0) / var * (x - a * M) - M


@pytest.mark.parametrize("shifted", [False, True])
def test_sde_marginals_match_ode_marginals_on_gaussian_flow(shifted):
    """With the exact velocity, SDE samples have the flow's Gaussian marginals at every sigma."""
    steps = 200
    sigmas = sd3_schedule(steps, 3.0) if shifted else uniform(steps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 4, generator=gen)
    checked = 0
    for i in range(steps):
        x = sde_step(x, _exact_velocity(x, float(sigmas[i])), sigmas[i], sigmas[i + 1], 0.7, generator=gen).x_next
        if (i + 1) % 50 == 0:
            s = float(sigmas[i + 1])
            mean, std = (1 - s) * M, math.sqrt((1 - s) ** 2 * S0**2 + s**2)
            assert float(x.mean()) == pytest.approx(mean, abs=0.01)
            assert float(x.std()) == pytest.approx(std, rel=0.03)
            checked += 1
    assert checked == 4


def test_noise_without_score_correction_would_fail_the_marginal_test():
    """Guard that the statistical test can fail: plain Euler plus the same noise inflates the variance."""
    steps, sigmas = 200, uniform(200)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 4, generator=gen)
    for i in range(steps):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        out = sde_step(x, _exact_velocity(x, s), s, sn, 0.7, generator=gen)
        x = euler_step(x, _exact_velocity(x, s), s, sn).x_next + out.std.view(-1, 1) * torch.randn(
            x.shape, generator=gen
        )
    assert float(x.std()) > 1.2 * S0


def test_dance_step_against_its_own_formula_and_torch_normal():
    """DanceGRPO's form: mean = x - dt v + (eta^2 / 2) dt score, score = -(x - (1 - s) x0_pred) / s^2."""
    x, v = _inputs()
    s, sn, eta = 0.6, 0.45, 0.3
    out = dance_sde_step(x, v, s, sn, eta, generator=torch.Generator().manual_seed(1))
    dt = s - sn
    x0_pred = x - s * v
    score = -(x - (1 - s) * x0_pred) / s**2
    assert torch.allclose(out.mean, x - dt * v + 0.5 * eta**2 * dt * score, atol=1e-6)
    assert torch.allclose(out.std, torch.full((3,), eta * math.sqrt(dt)))
    normal = torch.distributions.Normal(out.mean, out.std.view(-1, 1, 1, 1).expand_as(out.mean))
    assert torch.allclose(out.log_prob, normal.log_prob(out.x_next).mean(dim=(1, 2, 3)), atol=1e-5)
    # eta 0 is the Euler step; at a sigma where both coefficients agree it equals Flow-GRPO's step.
    assert torch.allclose(dance_sde_step(x, v, s, sn, 0.0).x_next, euler_step(x, v, s, sn).x_next, atol=1e-6)
    a = 0.5
    g = a * math.sqrt(s / (1 - s))
    flow = sde_step(x, v, s, sn, a, x_next=out.x_next)
    dance = dance_sde_step(x, v, s, sn, g, x_next=out.x_next)
    assert torch.allclose(flow.mean, dance.mean, atol=1e-6) and torch.allclose(
        flow.log_prob, dance.log_prob, atol=1e-5
    )


def test_dance_sde_marginals_match_ode_marginals_on_gaussian_flow():
    """A constant diffusion coefficient keeps the flow's marginals too (it only rescales the score term)."""
    steps = 200
    sigmas = uniform(steps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 4, generator=gen)
    for i in range(steps - 1):  # the last step (to sigma 0) is deterministic in rollouts
        x = dance_sde_step(
            x, _exact_velocity(x, float(sigmas[i])), sigmas[i], sigmas[i + 1], 0.3, generator=gen
        ).x_next
        if (i + 1) % 66 == 0:
            s = float(sigmas[i + 1])
            assert float(x.mean()) == pytest.approx((1 - s) * M, abs=0.01)
            assert float(x.std()) == pytest.approx(math.sqrt((1 - s) ** 2 * S0**2 + s**2), rel=0.03)


def test_cps_step_against_its_formula_and_torch_normal():
    """CPS: mean = (1 - sn) x0 + sqrt(sn^2 - s^2) eps with s = sn sin(a pi / 2); a = 0 is the Euler step."""
    x, v = _inputs()
    sig, sn, a = 0.6, 0.45, 0.8
    out = cps_step(x, v, sig, sn, a, generator=torch.Generator().manual_seed(1))
    std = sn * math.sin(a * math.pi / 2)
    x0, eps = x - sig * v, x + (1 - sig) * v
    assert torch.allclose(out.mean, (1 - sn) * x0 + math.sqrt(sn**2 - std**2) * eps, atol=1e-6)
    assert torch.allclose(out.std, torch.full((3,), std))
    normal = torch.distributions.Normal(out.mean, out.std.view(-1, 1, 1, 1).expand_as(out.mean))
    assert torch.allclose(out.log_prob, normal.log_prob(out.x_next).mean(dim=(1, 2, 3)), atol=1e-5)
    assert torch.equal(cps_step(x, v, sig, sn, 0.8, x_next=out.x_next).log_prob, out.log_prob)
    assert torch.allclose(cps_step(x, v, sig, sn, 0.0).x_next, euler_step(x, v, sig, sn).x_next, atol=1e-6)
    last = cps_step(x, v, sig, 0.0, a)  # into sigma 0 the step is deterministic: x0
    assert torch.allclose(last.x_next, x0, atol=1e-6) and torch.equal(last.log_prob, torch.zeros(3))


def test_cps_step_is_exact_for_a_point_mass():
    """With data at one point c the predictions are exact, and one CPS step of any size lands exactly on the
    flow's marginal (1 - sn) c + sn N(0, I): the noise coefficients are preserved."""
    c, sig, sn = 0.4, 0.9, 0.3
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(200000, 1, generator=gen)
    x = (1 - sig) * c + sig * eps
    v = eps - c  # the exact velocity: every x has one (x0, eps)
    nxt = cps_step(x, v, sig, sn, 0.8, generator=gen).x_next
    assert float(nxt.mean()) == pytest.approx((1 - sn) * c, abs=3e-3)
    assert float(nxt.std()) == pytest.approx(sn, rel=5e-3)
    euler = euler_step(x, v, sig, sn).x_next  # the deterministic step is exact too; the SDE steps are not
    assert float(euler.std()) == pytest.approx(sn, rel=5e-3)
