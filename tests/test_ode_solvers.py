"""Oracle tests of the deterministic solvers on an analytic Gaussian flow (exact velocity, exact flow map)."""

import math

import pytest
import torch

from rewardflow.sampling.ode import dpm_solver2_step, euler_step, solve_ode
from rewardflow.sampling.schedules import sd3_schedule, uniform

M, S0 = 0.7, 0.5


def _velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact E[eps - x0 | x_sigma = x] for x0 ~ N(M, S0^2), in float64."""
    s = float(sigma)
    a = 1 - s
    var = a * a * S0 * S0 + s * s
    return (s - a * S0 * S0) / var * (x - a * M) - M


def _std(sigma: float) -> float:
    return math.sqrt((1 - sigma) ** 2 * S0 * S0 + sigma * sigma)


def _error(solver: str, sigmas: torch.Tensor) -> float:
    """Max error against the exact flow map, which keeps z = (x - (1-sigma) M) / std(sigma) fixed."""
    z = torch.linspace(-2.0, 2.0, 9, dtype=torch.float64)
    a, b = float(sigmas[0]), float(sigmas[-1])
    out = solve_ode(_velocity, (1 - a) * M + _std(a) * z, sigmas, solver).double()
    return float((out - ((1 - b) * M + _std(b) * z)).abs().max())


@pytest.mark.parametrize(("solver", "order"), [("euler", 1), ("heun", 2), ("dpm2", 2)])
def test_convergence_order_on_gaussian_flow(solver, order):
    """Doubling the steps divides the error by 2^order (on [0.95, 0.05], away from the log-SNR's infinities)."""
    errors = [_error(solver, torch.linspace(0.95, 0.05, n + 1, dtype=torch.float64)) for n in (20, 40, 80)]
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    for rate in rates:
        assert rate == pytest.approx(order, abs=0.25), (solver, errors, rates)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_second_order_solvers_win_over_the_whole_sampling_interval(shift):
    """From noise (sigma 1) to data (sigma 0), as sampling runs: both 2nd-order solvers beat Euler by far."""
    grid = (lambda n: uniform(n).double()) if shift == 1.0 else (lambda n: sd3_schedule(n, shift).double())
    euler = _error("euler", grid(40))
    for solver in ("heun", "dpm2"):
        errors = [_error(solver, grid(n)) for n in (20, 40, 80)]
        assert errors[2] < errors[1] < errors[0]
        assert errors[1] < euler / 4, (solver, errors, euler)


def test_unknown_solver_is_named():
    with pytest.raises(ValueError, match="unknown solver 'rk4'.*euler, heun, dpm2"):
        solve_ode(_velocity, torch.zeros(2), uniform(4), "rk4")


def test_first_order_dpm_step_from_noise_is_euler():
    x, v = torch.randn(3, 4), torch.randn(3, 4)
    s, sn = torch.tensor(1.0), torch.tensor(0.8)
    dpm = dpm_solver2_step(x, x - s * v, s, sn)
    assert torch.allclose(dpm, euler_step(x, v, s, sn).x_next, atol=1e-6)
    s = torch.tensor(0.6)  # away from sigma = 1 too: DDIM equals Euler for a rectified flow
    assert torch.allclose(dpm_solver2_step(x, x - s * v, s, sn * 0.5), euler_step(x, v, s, sn * 0.5).x_next, atol=1e-6)


def test_solvers_are_differentiable():
    w = torch.tensor(0.3, requires_grad=True)
    x = torch.randn(4, 3)
    for solver in ("euler", "heun", "dpm2"):
        out = solve_ode(lambda x, s: w * x - s, x, uniform(5), solver)
        (grad,) = torch.autograd.grad(out.sum(), w)
        assert torch.isfinite(grad) and grad != 0
