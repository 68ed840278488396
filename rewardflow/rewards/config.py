"""The ``reward`` section of a run: the rewards, their weights, how they combine, and their models' settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rewardflow.utils.configs import Natural, NonNegative, Positive, check_fields


@dataclass
class RewardConfig:
    """The rewards, their weights and how they combine (default: the Shapes judge alone)."""

    names: tuple[str, ...] = ("shapes-judge",)
    """Registered rewards (``rewardflow.rewards.REWARDS``): shapes-judge, jpeg-compressibility, ..."""
    weights: tuple[float, ...] = ()
    """One weight per reward (empty: 1 each)."""
    aggregate: Literal["reward", "advantage", "loss"] = "reward"
    """Several rewards: advantages of the weighted sum of rewards (Flow-GRPO, DiffusionNFT); the weighted sum of each
    reward's own group advantages (MixGRPO); or each reward's own advantages in its own clipped policy loss, the
    losses summed with the weights (DanceGRPO's FLUX script; ``grpo`` only; it differs from "advantage" once a ratio
    leaves the clip band). One reward: the same in all three (its weight scales it before the normalisation, so only
    the weight's sign matters)."""
    extra_object_penalty: NonNegative = 0.25
    """shapes-judge: score subtracted per detected object the prompt did not ask for."""
    score_checkpoint: str = "shipped"
    """shapes-score: the learned scorer's checkpoint ("shipped", or a file from ``rewardflow reward-model``)."""
    pickscore_model: str = ""
    """pickscore: local folder of the PickScore CLIP model (yuvalkirstain/PickScore_v1 with its processor)."""
    clip_model: str = ""
    """clipscore: local folder of a CLIP model (e.g. openai/clip-vit-large-patch14)."""
    aesthetic_model: str = ""
    """aesthetic: local folder of CLIP ViT-L/14 holding the converted ``aesthetic_head.safetensors``."""
    hps_model: str = ""
    """hps: local folder of HPS v2.1 as a transformers CLIP model (converted from the open_clip checkpoint)."""
    imagereward_model: str = ""
    """imagereward: local folder of ImageReward as a transformers BLIP model plus its score head (converted)."""
    device: str = "cpu"
    """Where reward models run ("cpu", "cuda", ...); scores come back on the policy's device."""
    geneval_detector: str = "shapes"
    """geneval: the object detector, "shapes" (the Shapes judge's) or "module:factory" importable where the reward
    runs (GenEval's Mask2Former + CLIP colour classifier; docs/rewards.md)."""
    vlm_url: str = ""
    """unifiedreward: base URL of an OpenAI-compatible server (sglang, vLLM) serving the VLM judge."""
    vlm_model: str = "UnifiedReward-qwen-7b"
    """unifiedreward: the served model's name."""
    vlm_template_file: str = ""
    """unifiedreward: a text file with the instruction, ``{prompt}`` where the caption goes (empty: ours)."""
    vlm_token_env: str = ""
    """unifiedreward: the environment variable holding the server's API key, if it wants one."""
    remote_url: str = ""
    """remote: the base URL of a ``rewardflow serve-reward`` server, e.g. http://127.0.0.1:18085."""
    remote_token_env: str = ""
    """remote: the environment variable holding the server's bearer token (the token never goes in a config)."""
    remote_timeout: Positive = 60.0
    """remote: seconds to wait for one answer (a request still waiting is logged every 30 s)."""
    remote_retries: Natural = 3
    """remote: further attempts after a connection failure, a timeout or a 5xx answer; then training stops with a
    message naming the URL, its last checkpoint intact."""
    remote_backoff: NonNegative = 1.0
    """remote: seconds before the first retry, doubling each time (a 503's Retry-After, when longer, instead)."""

    def __post_init__(self) -> None:
        check_fields(self, "reward")
        if not self.names or len(set(self.names)) != len(self.names):
            raise ValueError(f"reward.names must list at least one reward, each once, got {list(self.names)}")
        if self.weights and len(self.weights) != len(self.names):
            raise ValueError(
                f"reward.weights must have one weight per reward in reward.names ({len(self.names)}), "
                f"got {len(self.weights)}"
            )
        if self.aggregate not in ("reward", "advantage", "loss"):
            raise ValueError(f"reward.aggregate must be 'reward', 'advantage' or 'loss', got {self.aggregate!r}")

    @property
    def resolved_weights(self) -> tuple[float, ...]:
        return tuple(float(w) for w in self.weights) or (1.0,) * len(self.names)
