"""The reward protocol: a synchronous callable from images and prompts to scores."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

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
