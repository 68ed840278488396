"""Sigma grids: uniform, SD3's fixed shift, FLUX's resolution-dependent shift.

All grids are float32 tensors of shape [T+1], decreasing from 1 to exactly 0.
"""

from __future__ import annotations

import math

import torch


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


def sd3_schedule(num_steps: int, s: float = 3.0) -> torch.Tensor:
    """A uniform grid with SD3's fixed shift (3.0 for SD3.5)."""
    return shift(uniform(num_steps), s)


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's shift exponent: linear in the number of image tokens between two anchor points."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def time_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """FLUX's exponential shift ``e^mu / (e^mu + (1/sigma - 1))``; sigma = 0 stays 0."""
    sig = sigmas.double()
    out = torch.zeros_like(sig)
    pos = sig > 0
    out[pos] = math.exp(mu) / (math.exp(mu) + (1.0 / sig[pos] - 1.0))
    return out.float()


def flux_schedule(num_steps: int, image_seq_len: int) -> torch.Tensor:
    """FLUX's grid: ``linspace(1, 1/T, T)`` shifted by ``mu(image_seq_len)``, then a final 0."""
    return time_shift(uniform(num_steps), flux_mu(image_seq_len))
