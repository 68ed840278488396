"""The reward protocol (a synchronous callable from images and prompts to scores) and the evaluation judge's."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from rewardflow.data.prompts import PromptRecord
from rewardflow.types import RewardOutput


@runtime_checkable
class RewardFn(Protocol):
    """Scores images against their prompts.

    Args:
        images: [B, 3, H, W] float in [0, 1].
        prompts: B prompt strings.
        metadata: B dicts of per-prompt metadata (from a jsonl prompt file; empty dicts otherwise).

    Returns:
        :class:`~rewardflow.types.RewardOutput` with ``scores`` [B] (float32; higher is better) and
        per-image ``details``.
    """

    name: str

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput: ...


@runtime_checkable
class Judge(RewardFn, Protocol):
    """A reward that also grades a whole evaluation: the truth a run is measured against (the Shapes judge).

    Its prompts follow a grammar it can check before a run writes anything; :meth:`report` turns the images of an
    evaluation (each prompt's samples in a row) into the report's accuracy fields.
    """

    def check_prompts(self, records: list[PromptRecord], source: str) -> None:
        """Raise ValueError naming ``source`` and the position of the first prompt the judge cannot read."""
        ...

    def report(self, records: list[PromptRecord], images: torch.Tensor, samples_per_prompt: int) -> dict[str, Any]:
        """The report's fields for ``images`` [N, 3, H, W], ``samples_per_prompt`` of each record in a row."""
        ...
