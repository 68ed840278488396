"""Rewards: the protocol, the registry the CLI uses, and the built-in reward functions."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rewardflow.rewards.protocol import RewardFn
from rewardflow.rewards.shapes import ShapesJudgeReward

if TYPE_CHECKING:
    from rewardflow.config import RewardConfig

REWARDS: dict[str, type] = {"shapes-judge": ShapesJudgeReward}


def build_reward(cfg: RewardConfig) -> RewardFn:
    """Instantiate the configured reward."""
    if cfg.name not in REWARDS:
        raise ValueError(f"reward.name {cfg.name!r} is unknown; registered rewards: {', '.join(REWARDS)}")
    return ShapesJudgeReward(extra_object_penalty=cfg.extra_object_penalty)
