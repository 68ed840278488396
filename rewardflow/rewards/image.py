"""Rewards on the pixels alone, with no prompt: JPEG (in)compressibility (DDPO's toy rewards)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from rewardflow.types import RewardOutput


class JpegSize:
    """Size of each image encoded as JPEG (quality 95), in kilobytes; ``sign=-1`` rewards small files.

    Black et al. (DDPO, arXiv 2305.13301) use ``-size`` ("compressibility": flat, simple images) and ``+size``
    ("incompressibility": busy, textured images) as rewards without a learned model. Details: ``jpeg_kb``.
    """

    def __init__(self, sign: float = -1.0, quality: int = 95) -> None:
        self.sign, self.quality = sign, quality
        self.name = "jpeg-compressibility" if sign < 0 else "jpeg-incompressibility"

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for img in pixels:
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        kb = torch.tensor(sizes, dtype=torch.float32)
        return RewardOutput(scores=self.sign * kb, details={"jpeg_kb": kb})
