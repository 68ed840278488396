"""Deterministic steps and ODE solvers (differentiable; no log-probability)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rewardflow.types import StepOutput


def as_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A noise level (float, 0-d or [B] tensor) as a float32 tensor broadcastable against ``x`` [B, ...]."""
    sig = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sig.ndim == 0:
        sig = sig.expand(x.shape[0])
    if sig.ndim != 1 or sig.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must be a float or a tensor of shape [{x.shape[0]}], got shape {tuple(sig.shape)}")
    return sig.view(-1, *([1] * (x.ndim - 1)))


def euler_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    *,
    x_next: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """Euler step of the probability-flow ODE ``dx/dsigma = v``: ``x + (sigma_next - sigma) v`` in float32.

    ``x_next`` and ``generator`` exist for a common step signature; a deterministic step ignores them
    (its log-probability is 0).
    """
    s, sn = as_sigma(sigma, x), as_sigma(sigma_next, x)
    mean = x.float() + (sn - s) * v.float()
    zeros = torch.zeros(x.shape[0], device=x.device)
    return StepOutput(x_next=mean, mean=mean, std=zeros, log_prob=zeros)


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``v(x, sigma)`` with ``sigma`` a 0-d tensor; returns a velocity shaped like ``x``."""

SOLVERS = ("euler", "heun", "dpm2")


def heun_step(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, velocity: VelocityFn) -> torch.Tensor:
    """Heun's method (explicit trapezoid, 2nd order): an Euler predictor, then the mean of the two slopes.

    Two velocity evaluations per step, the second at ``sigma_next`` (0 on the last step is allowed: the flow's
    velocity is defined at the data end).
    """
    v = velocity(x, sigma).float()
    pred = x.float() + (sigma_next - sigma) * v
    v_next = velocity(pred, sigma_next).float()
    return x.float() + (sigma_next - sigma) * 0.5 * (v + v_next)


def _log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """``lambda = log(alpha / sigma)`` with ``alpha = 1 - sigma`` (-inf at sigma = 1, +inf at sigma = 0)."""
    return torch.log1p(-sigma) - torch.log(sigma)


def dpm_solver2_step(
    x: torch.Tensor,
    x0_pred: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    prev_x0_pred: torch.Tensor | None = None,
    prev_sigma: torch.Tensor | None = None,
) -> torch.Tensor:
    """One step of the multistep DPM-Solver++(2M) in data-prediction form, for ``x = (1-sigma) x0 + sigma eps``.

    With ``h = lambda_next - lambda`` (log-SNR, ``lambda = log((1-sigma)/sigma)``)::

        x_next = (sigma_next / sigma) x - alpha_next (exp(-h) - 1) D
        D      = (1 + 1/(2 r)) x0_pred - 1/(2 r) prev_x0_pred,   r = h_prev / h     (2nd order)
        D      = x0_pred                                                           (1st order)

    First order (DDIM, which for a rectified flow is exactly Euler) when there is no usable previous step
    (the first step, or one whose previous step started at sigma = 1, where lambda is -inf); the last step
    (``sigma_next == 0``) returns ``D`` = ``x0_pred`` as DPM-Solver++ does ("lower order final").
    """
    x, x0_pred = x.float(), x0_pred.float()
    if float(sigma_next) == 0.0:
        return x0_pred
    lam, lam_next = _log_snr(sigma), _log_snr(sigma_next)
    h = lam_next - lam
    d = x0_pred
    if prev_x0_pred is not None and prev_sigma is not None and float(prev_sigma) < 1.0:
        r = (lam - _log_snr(prev_sigma)) / h
        d = (1 + 1 / (2 * r)) * x0_pred - (1 / (2 * r)) * prev_x0_pred.float()
    # At sigma = 1, h = +inf and expm1(-h) = -1: x_next = sigma_next x + alpha_next D.
    return (sigma_next / sigma) * x - (1 - sigma_next) * torch.expm1(-h) * d


def solve_ode(velocity: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor, solver: str = "euler") -> torch.Tensor:
    """Integrate the probability-flow ODE from ``sigmas[0]`` to ``sigmas[-1]`` with a deterministic solver.

    Args:
        velocity: ``v(x, sigma)``.
        x: the start [B, ...] at ``sigmas[0]`` (noise when that is 1).
        sigmas: the grid [T+1], decreasing.
        solver: "euler" (1 evaluation per step), "heun" (2 per step, 2nd order) or "dpm2" (multistep
            DPM-Solver++(2M), 1 evaluation per step, 2nd order).

    Returns:
        The end point [B, ...] in float32. Differentiable: gradients flow to ``x`` and through ``velocity``.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    x = x.float()
    prev = None
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i].float(), sigmas[i + 1].float()
        if solver == "heun":
            x = heun_step(x, s, sn, velocity)
            continue
        v = velocity(x, s).float()
        if solver == "euler":
            x = euler_step(x, v, s, sn).x_next
            continue
        x0_pred = x - s * v
        x = dpm_solver2_step(x, x0_pred, s, sn, *(prev or (None, None)))
        prev = (x0_pred, s)
    return x
