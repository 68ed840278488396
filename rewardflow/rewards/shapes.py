"""The Shapes-world judge as a reward."""

from __future__ import annotations

from typing import Any

import torch

from rewardflow.shapes.grammar import parse_prompt
from rewardflow.shapes.judge import judge_images
from rewardflow.types import RewardOutput


class ShapesJudgeReward:
    """Partial-credit judge score minus a penalty per unrequested object.

    GenEval's semantics never penalise objects the prompt did not ask for, and a tuned model learns to
    scatter extra shapes (the prototype's single-object prompts went from 0.9 to ~2 detections per image).
    ``extra_object_penalty`` per extra detection (blobs included) removes that incentive; 0 gives the
    plain GenEval-style partial credit. The score can fall below 0.

    Details: ``partial`` (judge score in [0, 1]), ``strict`` and ``clean`` (0/1), ``extra`` (count).
    """

    name = "shapes-judge"

    def __init__(self, extra_object_penalty: float = 0.25) -> None:
        if extra_object_penalty < 0:
            raise ValueError(f"reward.extra_object_penalty must be >= 0, got {extra_object_penalty}")
        self.extra_object_penalty = extra_object_penalty

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        specs = [parse_prompt(p) for p in prompts]
        verdicts = judge_images(specs, images.detach().float().cpu().numpy())
        partial = torch.tensor([v.score for v in verdicts], dtype=torch.float32)
        extra = torch.tensor([v.extra for v in verdicts], dtype=torch.float32)
        return RewardOutput(
            scores=partial - self.extra_object_penalty * extra,
            details={
                "partial": partial,
                "strict": torch.tensor([v.strict for v in verdicts], dtype=torch.float32),
                "clean": torch.tensor([v.clean for v in verdicts], dtype=torch.float32),
                "extra": extra,
            },
        )
