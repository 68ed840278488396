"""Text rendering reward (Flow-GRPO's OCR task): how well the image spells the text quoted in its prompt.

The prompt carries its target in double quotes (``A sign that says "OPEN 24 HOURS"``). The image is read by
rapidocr (PP-OCR models that ship inside its wheel, so it runs offline), the recognised lines are joined, both
strings are lowercased and stripped of spaces, and the reward is ``max(0, 1 - Levenshtein(read, target) /
len(target))``, Flow-GRPO's formula (it used PaddleOCR). Not differentiable. Needs the ``ocr`` extra
(``pip install rewardflow[ocr]``: rapidocr, onnxruntime, rapidfuzz).
"""

from __future__ import annotations

import logging
import re

import numpy as np
import torch

from rewardflow.types import RewardOutput

QUOTED = re.compile(r'"([^"]+)"')


def target_text(prompt: str) -> str:
    """The first double-quoted span of ``prompt``; a ValueError naming the prompt when there is none."""
    found = QUOTED.search(prompt)
    if found is None:
        raise ValueError(f"the ocr reward needs the target text in double quotes in the prompt, got {prompt!r}")
    return found.group(1)


def normalise(text: str) -> str:
    """Lowercased, every space removed (Flow-GRPO's comparison)."""
    return "".join(text.lower().split())


def ocr_score(read: str, target: str) -> float:
    """``max(0, 1 - Levenshtein(read, target) / len(target))`` on lowercased, space-free strings."""
    from rapidfuzz.distance import Levenshtein

    read, target = normalise(read), normalise(target)
    return max(0.0, 1.0 - Levenshtein.distance(read, target) / max(1, len(target)))


class OCRReward:
    """1 minus the normalised edit distance between the text rapidocr reads and the prompt's quoted text."""

    name = "ocr"
    differentiable = False

    def __init__(self) -> None:
        try:
            from rapidocr import RapidOCR
        except ImportError as e:
            raise ImportError("the ocr reward needs the ocr extra: pip install 'rewardflow[ocr]'") from e
        logging.getLogger("RapidOCR").setLevel(logging.WARNING)
        self.engine = RapidOCR()

    def read(self, image: np.ndarray) -> str:
        """The text rapidocr finds in one [H, W, 3] uint8 image, its lines joined by spaces."""
        texts = self.engine(image).txts or ()
        return " ".join(texts)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        targets = [target_text(p) for p in prompts]  # a prompt without a target fails before any OCR runs
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        scores = [ocr_score(self.read(np.ascontiguousarray(img)), t) for img, t in zip(pixels, targets)]
        return RewardOutput(scores=torch.tensor(scores, dtype=torch.float32))
