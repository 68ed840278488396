"""Rewards: the protocol, the registry the CLI uses, and the built-in reward functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rewardflow.rewards.image import JpegSize
from rewardflow.rewards.multi import WeightedRewards
from rewardflow.rewards.protocol import RewardFn
from rewardflow.rewards.shapes import ShapesJudgeReward

if TYPE_CHECKING:
    from rewardflow.config import RewardConfig

REWARDS: dict[str, Callable[[RewardConfig], RewardFn]] = {
    "shapes-judge": lambda cfg: ShapesJudgeReward(cfg.extra_object_penalty),
    "jpeg-compressibility": lambda cfg: JpegSize(sign=-1.0),
    "jpeg-incompressibility": lambda cfg: JpegSize(sign=1.0),
    "shapes-score": lambda cfg: _shapes_score(cfg.score_checkpoint),
    "pickscore": lambda cfg: _clip("PickScoreReward", cfg.pickscore_model, cfg.device),
    "clipscore": lambda cfg: _clip("ClipScoreReward", cfg.clip_model, cfg.device),
    "aesthetic": lambda cfg: _clip("AestheticReward", cfg.aesthetic_model, cfg.device),
    "ocr": lambda cfg: _ocr(),
    "remote": lambda cfg: _remote(cfg.remote_url, cfg.remote_token_env),
}


def _remote(url: str, token_env: str) -> RewardFn:
    import os

    from rewardflow.rewards.remote import RemoteReward

    if token_env and not os.environ.get(token_env):
        raise ValueError(f"reward.remote_token_env names {token_env!r}, but that environment variable is not set")
    return RemoteReward(url, token=os.environ.get(token_env) if token_env else None)


def _ocr() -> RewardFn:
    from rewardflow.rewards.ocr import OCRReward  # rapidocr (the ocr extra): imported only when asked for

    return OCRReward()


def _clip(cls: str, path: str, device: str) -> RewardFn:
    from rewardflow.rewards import clip  # transformers models: built only when asked for

    return getattr(clip, cls)(path, device)


def _shapes_score(checkpoint: str) -> RewardFn:
    from rewardflow.rewards.shapes_score import ShapesScoreReward  # torch model: built only when asked for

    return ShapesScoreReward(checkpoint)


def differentiable_rewards() -> list[str]:
    """Names of the registered rewards whose scores carry gradient to the images."""
    return ["shapes-score", "pickscore", "clipscore", "aesthetic"]


def build_reward(cfg: RewardConfig) -> WeightedRewards:
    """The configured rewards from the registry, combined with their weights."""
    unknown = [n for n in cfg.names if n not in REWARDS]
    if unknown:
        raise ValueError(f"reward.names has unknown rewards {unknown}; registered rewards: {', '.join(REWARDS)}")
    return WeightedRewards([REWARDS[n](cfg) for n in cfg.names], list(cfg.resolved_weights), list(cfg.names))
