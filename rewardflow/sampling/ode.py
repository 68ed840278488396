"""Deterministic steps (differentiable; no log-probability)."""

from __future__ import annotations

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
