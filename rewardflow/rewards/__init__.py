"""Rewards: the protocol, the registry the CLI uses, and the built-in reward functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rewardflow.rewards.protocol import RewardFn
from rewardflow.rewards.shapes import ShapesJudgeReward

if TYPE_CHECKING:
    from rewardflow.config import RewardConfig

REWARDS: dict[str, Callable[[RewardConfig], RewardFn]] = {
    "shapes-judge": lambda cfg: ShapesJudgeReward(cfg.extra_object_penalty),
}


def build_reward(cfg: RewardConfig) -> RewardFn:
    """Instantiate the configured reward from the registry."""
    if cfg.name not in REWARDS:
        raise ValueError(f"reward.name {cfg.name!r} is unknown; registered rewards: {', '.join(REWARDS)}")
    return REWARDS[cfg.name](cfg)
