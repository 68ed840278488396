"""Rewards: the protocol, the registry the CLI uses, and the built-in reward functions."""

from __future__ import annotations

from collections.abc import Callable

from rewardflow.rewards.config import RewardConfig
from rewardflow.rewards.image import JpegSize
from rewardflow.rewards.multi import WeightedRewards
from rewardflow.rewards.protocol import Judge, RewardFn
from rewardflow.shapes.reward import ShapesJudgeReward

REWARDS: dict[str, Callable[[RewardConfig], RewardFn]] = {
    "shapes-judge": lambda cfg: ShapesJudgeReward(cfg.extra_object_penalty),
    "jpeg-compressibility": lambda cfg: JpegSize(sign=-1.0),
    "jpeg-incompressibility": lambda cfg: JpegSize(sign=1.0),
    "shapes-score": lambda cfg: _shapes_score(cfg.score_checkpoint),
    "shapes-count": lambda cfg: _shapes_count(cfg.score_checkpoint, cfg.extra_object_penalty),
    "pickscore": lambda cfg: _clip("PickScoreReward", cfg.pickscore_model, cfg.device),
    "clipscore": lambda cfg: _clip("ClipScoreReward", cfg.clip_model, cfg.device),
    "aesthetic": lambda cfg: _clip("AestheticReward", cfg.aesthetic_model, cfg.device),
    "hps": lambda cfg: _hps(cfg.hps_model, cfg.device),
    "imagereward": lambda cfg: _imagereward(cfg.imagereward_model, cfg.device),
    "ocr": lambda cfg: _ocr(),
    "remote": lambda cfg: _remote(cfg),
    "geneval": lambda cfg: _geneval(cfg.geneval_detector),
    "unifiedreward": lambda cfg: _vlm(cfg),
}


def _token(field: str, env: str) -> str | None:
    import os

    if env and not os.environ.get(env):
        raise ValueError(f"reward.{field} names {env!r}, but that environment variable is not set")
    return os.environ.get(env) if env else None


def _geneval(detector: str) -> RewardFn:
    from rewardflow.rewards.geneval import GenEvalReward, load_detector

    return GenEvalReward(load_detector(detector))


def _vlm(cfg: RewardConfig) -> RewardFn:
    from rewardflow.rewards.vlm import VLMScoreReward, load_template

    if not cfg.vlm_url:
        raise ValueError("reward 'unifiedreward' needs reward.vlm_url, the base URL of its sglang / vLLM server")
    template = load_template(cfg.vlm_template_file)
    return VLMScoreReward(cfg.vlm_url, cfg.vlm_model, template, token=_token("vlm_token_env", cfg.vlm_token_env))


def _remote(cfg: RewardConfig) -> RewardFn:
    from rewardflow.rewards.remote import RemoteReward

    token = _token("remote_token_env", cfg.remote_token_env)
    return RemoteReward(cfg.remote_url, token=token, timeout=cfg.remote_timeout, retries=cfg.remote_retries,
                        backoff=cfg.remote_backoff)  # fmt: skip


def _ocr() -> RewardFn:
    from rewardflow.rewards.ocr import OCRReward  # rapidocr (the ocr extra): imported only when asked for

    return OCRReward()


def _clip(cls: str, path: str, device: str) -> RewardFn:
    from rewardflow.rewards import clip  # transformers models: built only when asked for

    return getattr(clip, cls)(path, device)


def _hps(path: str, device: str) -> RewardFn:
    from rewardflow.rewards.hps import HPSReward  # transformers CLIP: built only when asked for

    return HPSReward(path, device)


def _imagereward(path: str, device: str) -> RewardFn:
    from rewardflow.rewards.imagereward import ImageRewardReward  # transformers BLIP: built only when asked for

    return ImageRewardReward(path, device)


def _shapes_score(checkpoint: str) -> RewardFn:
    from rewardflow.shapes.scorer import ShapesScoreReward  # torch model: built only when asked for

    return ShapesScoreReward(checkpoint)


def _shapes_count(checkpoint: str, extra_object_penalty: float) -> RewardFn:
    from rewardflow.shapes.scorer import ShapesCountReward

    return ShapesCountReward(checkpoint, extra_object_penalty)


def differentiable_rewards() -> list[str]:
    """Names of the registered rewards whose scores carry gradient to the images."""
    return ["shapes-score", "shapes-count", "pickscore", "clipscore", "aesthetic", "hps", "imagereward"]


def build_reward(cfg: RewardConfig) -> WeightedRewards:
    """The configured rewards from the registry, combined with their weights."""
    unknown = [n for n in cfg.names if n not in REWARDS]
    if unknown:
        raise ValueError(f"reward.names has unknown rewards {unknown}; registered rewards: {', '.join(REWARDS)}")
    return WeightedRewards([REWARDS[n](cfg) for n in cfg.names], list(cfg.resolved_weights), list(cfg.names))


def build_judge(cfg: RewardConfig) -> Judge:
    """The evaluation's judge (``eval.judge``): the Shapes judge, with the run's penalty per unrequested object."""
    return ShapesJudgeReward(cfg.extra_object_penalty)
