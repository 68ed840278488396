"""Sigma grids that do not come from a model's scheduler: the uniform grid and SD3's fixed shift of it.

A model's own grid is :meth:`rewardflow.models.protocol.FlowPolicy.schedule`: the Shapes world's tiny DiT samples
on :func:`sd3_schedule` with shift 3, the diffusers models on the sigmas their pipelines use, built from the
scheduler config in the model folder. :func:`sd3_schedule` with another shift is what a config's ``shift > 0``
asks for (DanceGRPO's grid: ``linspace(1, 0, T + 1)`` shifted by 3 for every model).

All grids are float32 tensors of shape [T+1], decreasing to exactly 0.
"""

from __future__ import annotations

import torch

SHAPES_SHIFT = 3.0
"""The shift of the Shapes world's grid (the tiny DiT was pretrained and is evaluated on it)."""


def uniform(num_steps: int) -> torch.Tensor:
    """``linspace(1, 0, T+1)``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).float()


def shift(sigmas: torch.Tensor, s: float) -> torch.Tensor:
    """SD3's fixed shift ``s * sigma / (1 + (s - 1) * sigma)``; keeps 0 and 1 fixed."""
    if s <= 0:
        raise ValueError(f"shift must be positive, got {s}")
    sig = sigmas.double()
    return (s * sig / (1.0 + (s - 1.0) * sig)).float()


def sd3_schedule(num_steps: int, s: float = SHAPES_SHIFT) -> torch.Tensor:
    """A uniform grid with SD3's fixed shift."""
    return shift(uniform(num_steps), s)
