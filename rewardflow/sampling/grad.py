"""Sampling with gradients: which Euler steps carry the reward's gradient back to the model.

The direct-gradient methods (DRaFT, ReFL, AlignProp, LeapAlign) differ only in which part of the sampling
graph keeps its gradient and what the reward is computed on. These functions take a ``velocity(x, sigma)``
callable (the caller binds the model, prompts and guidance) and a sigma grid from 1 down to 0:

- :func:`truncated_euler`: steps before ``grad_from`` run without gradient, later ones with it, through the
  model and through the latent chain between them (DRaFT full = 0, DRaFT-K = T - K, AlignProp = random).
- :func:`stopped_euler`: ReFL's one-step clean prediction ``x - sigma v`` at a chosen step, with that one model
  call's gradient, and the real sample the trajectory goes on to (no gradient).
- :func:`renoised_last_step`: DRaFT-LV's extra gradient samples at the last grid level.
- :func:`leap_rollout`: LeapAlign's two-leap surrogate with connectors (forward value = the real trajectory,
  gradient = the leaps).

``checkpointed(velocity)`` recomputes a model call in the backward pass instead of storing its activations,
so memory grows with the number of grad-carrying steps only by one latent each. Notation: ``sg`` is
stop-gradient; ``a + sg(b - a)`` has the value of ``b`` and the gradient of ``a`` (a connector).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def checkpointed(velocity: Velocity) -> Velocity:
    """``velocity`` with activation checkpointing: its activations are recomputed during the backward pass."""

    def call(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return velocity(x, sigma)
        return checkpoint(velocity, x, sigma, use_reentrant=False)

    return call


def truncated_euler(
    velocity: Velocity,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    grad_from: int = 0,
) -> torch.Tensor:
    """Euler ODE sample whose steps ``grad_from ..`` carry gradient.

    Args:
        velocity: ``v(x, sigma)``.
        x: initial noise [B, ...] at ``sigmas[0]``.
        sigmas: the grid [T+1].
        grad_from: the first step with gradient (0: every step; T: none).

    Returns:
        The final sample [B, ...] in the dtype of ``x`` and ``v``.
    """
    steps = len(sigmas) - 1
    if not 0 <= grad_from <= steps:
        raise ValueError(f"need 0 <= grad_from <= {steps}, got {grad_from}")
    grad = torch.is_grad_enabled()
    for i in range(steps):
        s, sn = sigmas[i], sigmas[i + 1]
        with torch.set_grad_enabled(i >= grad_from and grad):
            x = x + (sn - s) * velocity(x, s)
    return x


def stopped_euler(
    velocity: Velocity, x: torch.Tensor, sigmas: torch.Tensor, stop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ReFL's sample: the clean prediction at step ``stop``, and the real sample.

    Returns ``x_m - sigma_m v(x_m)`` at ``m = stop`` (with the gradient of that model call only) and the sample
    the Euler trajectory reaches from there (no gradient).
    """
    steps = len(sigmas) - 1
    if not 0 <= stop < steps:
        raise ValueError(f"need 0 <= stop < {steps}, got {stop}")
    with torch.no_grad():
        for i in range(stop):
            x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, sigmas[i])
    v = velocity(x, sigmas[stop])
    prediction = x - sigmas[stop] * v
    final = (x + (sigmas[stop + 1] - sigmas[stop]) * v).detach()
    return prediction, truncated_euler(velocity, final, sigmas[stop + 1 :], grad_from=steps - stop - 1)


def renoised_last_step(
    velocity: Velocity,
    x0: torch.Tensor,
    sigma_last: float,
    n: int,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """DRaFT-LV's ``n`` gradient samples: the detached sample re-noised to ``sigma_last``, denoised in one step.

    ``x_i = (1 - s) sg(x0) + s eps_i`` and ``x0_i = x_i - s v(x_i, s)`` for ``i = 1..n`` with fresh ``eps_i``
    (drawn on the generator's device). Each ``x0_i`` carries the gradient of one model call.
    """
    base = x0.detach()
    gen_device = generator.device if generator is not None else base.device
    outs = []
    for _ in range(n):
        eps = torch.randn(base.shape, generator=generator, device=gen_device, dtype=base.dtype).to(base.device)
        xi = (1 - sigma_last) * base + sigma_last * eps
        outs.append(xi - sigma_last * velocity(xi, torch.tensor(sigma_last)))
    return outs


@dataclass
class LeapOutput:
    """LeapAlign's result for one batch.

    Attributes:
        x0: the sample to score [B, ...]: its value is the real ODE sample, its gradient that of the two leaps.
        weight: trajectory-consistency weight ``1 / (d_j + d_0)`` [B] (no gradient).
        d_j: ``max(tau, mean |leap-1 prediction - x_j|)`` [B].
        d_0: ``max(tau, mean |leap-2 prediction - x_0|)`` [B].
    """

    x0: torch.Tensor
    weight: torch.Tensor
    d_j: torch.Tensor
    d_0: torch.Tensor


def leap_distance(leap: torch.Tensor, real: torch.Tensor, tau: float) -> torch.Tensor:
    """``max(tau, mean |leap - real|)`` per sample [B] (float64 sums, no gradient)."""
    return (leap.detach().double() - real.detach().double()).abs().flatten(1).mean(dim=1).clamp(min=tau)


def consistency_weight(d_j: torch.Tensor, d_0: torch.Tensor) -> torch.Tensor:
    """LeapAlign's trajectory-consistency weight ``1 / (d_j + d_0)``: leaps that stay near the real path count more.

    The distances are floored at ``tau`` (:func:`leap_distance`), so the weight is at most ``1 / (2 tau)``.
    """
    return 1.0 / (d_j + d_0)


def leap_rollout(
    velocity: Velocity,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    k: int,
    j: int,
    *,
    alpha: float,
    tau: float,
) -> LeapOutput:
    """LeapAlign's two-leap trajectory inside an ordinary Euler rollout (``0 <= k < j < T``).

    The rollout runs without gradient except the model calls at steps ``k`` and ``j``. Leap 1 jumps from
    ``x_k`` to ``sigma_j`` with the velocity at ``k``; a connector gives it the value of the real ``x_j``.
    The model input at ``j`` passes ``alpha`` of its gradient (``alpha x + (1 - alpha) sg(x)``: 0 stops the
    nested cross-step term, 1 is exact backprop through the two leaps). Leap 2 jumps from ``x_j`` to 0 with
    the velocity at ``j``, and a last connector gives it the value of the real sample. With
    ``D = sigma_k - sigma_j`` the gradient of the returned sample is
    ``-D dv_k - sigma_j dv_j + alpha sigma_j D (d_x v_j) dv_k``.
    """
    steps = len(sigmas) - 1
    if not 0 <= k < j < steps:
        raise ValueError(f"LeapAlign needs steps 0 <= k < j < {steps}, got k={k}, j={j}")
    x = x.detach()
    leap_j = leap_0 = None
    for i in range(steps):
        s, sn = sigmas[i], sigmas[i + 1]
        if i == k:
            v = velocity(x, s)
            leap_j = x + (sigmas[j] - s) * v  # leap 1
            v = v.detach()
        elif i == j:
            d_j = leap_distance(leap_j, x, tau)
            x_tilde = leap_j + (x - leap_j).detach()  # value: the real x_j; gradient: leap 1
            x_in = alpha * x_tilde + (1 - alpha) * x_tilde.detach()
            v = velocity(x_in, s)
            leap_0 = x_tilde - s * v  # leap 2
            v = v.detach()
        else:
            with torch.no_grad():
                v = velocity(x, s)
        x = (x + (sn - s) * v).detach()
    d_0 = leap_distance(leap_0, x, tau)
    weight = consistency_weight(d_j, d_0).to(x.dtype)
    return LeapOutput(x0=leap_0 + (x - leap_0).detach(), weight=weight, d_j=d_j, d_0=d_0)
