"""Typed training configuration (tyro turns it into command-line flags; presets fill it in)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from rewardflow.algorithms.batching import fit_world
from rewardflow.algorithms.draft import DraftConfig
from rewardflow.algorithms.grpo import GRPOConfig
from rewardflow.algorithms.leapalign import LeapAlignConfig
from rewardflow.algorithms.nft import NFTConfig
from rewardflow.evaluate import EvalConfig

ALGORITHMS = ("grpo", "nft", "draft", "leapalign")
DIRECT = ("draft", "leapalign")


@dataclass
class ModelConfig:
    """Which model to fine-tune and how."""

    kind: Literal["tiny-dit", "sd3", "flux", "sd1"] = "tiny-dit"
    """The Shapes tiny DiT, or a diffusers model from ``path``: Stable Diffusion 3 / 3.5, FLUX.1, or SD 1.x / 2.x
    (a VP UNet seen as a flow; docs/models.md)."""
    checkpoint: str = "base"
    """tiny-dit: a checkpoint path, or "base" for the shipped Shapes base model."""
    path: str = ""
    """sd3 / flux / sd1: the diffusers model: a local folder (model_index.json and its subfolders) or a Hub id,
    fetched through the Hub cache (with HF_HUB_OFFLINE=1, the cache only)."""
    resolution: int = 0
    """sd3 / flux: image side in pixels (0: the model's native size)."""
    max_sequence_length: int = 0
    """sd3 / flux: T5 tokens per prompt (0: the pipeline's default, 256 for SD3 and 512 for FLUX; Flow-GRPO's SD3.5
    scripts use 128)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """sd3 / flux / sd1: the frozen weights' dtype (LoRA weights and step math are float32 either way; with
    ``autocast`` the network computes in bfloat16)."""
    fsdp: bool = False
    """Full fine-tuning under torchrun: shard weights, gradients and optimizer state over the ranks with FSDP2
    (``fully_shard`` per block; bfloat16 compute with float32 reduction when ``dtype`` is bfloat16)."""
    gradient_checkpointing: bool = False
    """sd3 / flux: activation checkpointing in the transformer (less memory, one more forward per backward)."""
    lora_rank: int = 0
    """0 trains every weight (against a frozen reference copy); > 0 trains LoRA adapters of this rank."""
    lora_alpha: float = 0.0
    """LoRA scale numerator; 0 means 2 * rank."""
    lora_init: Literal["gaussian", "kaiming"] = "gaussian"
    """How LoRA's A starts (B starts at 0 either way): Gaussian (Flow-GRPO, DiffusionNFT) or peft's default
    Kaiming-uniform (DanceGRPO)."""
    lora_targets: tuple[str, ...] = ()
    """sd3 / flux / sd1: the module names LoRA goes on (suffixes, as peft matches them, e.g. ``to_q`` matches every
    block's ``attn.to_q``); empty: the adapter's default (every attention projection of both streams for SD3 and
    FLUX, ``to_q to_k to_v to_out.0`` for the SD UNet)."""
    merge_lora_rollouts: bool = False
    """LoRA: sample rollouts and evaluations with the adapter folded into the base weights (faster on large models;
    Flow-GRPO's on-policy ratio is then 1 within rounding, not bitwise; docs/models.md)."""
    autocast: bool = True
    """bfloat16 autocast for the network's forward (step math stays float32), where the hardware computes bfloat16
    natively: CUDA, or a CPU with AVX512-BF16 / AMX; on other CPUs the network runs in float32, since emulated
    bfloat16 is several times slower (``rewardflow.models.protocol.native_bf16``)."""
    compile: bool = False
    """tiny-dit: run the networks through ``torch.compile`` (on in ``shapes_grpo_cpu`` and ``shapes_grpo``): on 2 CPU
    cores in bf16 a 10-step Shapes iteration took 10.4 s instead of 13.3 (little gain in float32), after a first
    iteration of about 1.5 minutes that compiles (cached on disk for later runs). The on-policy ratio stays exactly 1
    (docs/models.md). Where nothing can be compiled it warns and runs eagerly."""
    device: str = "cpu"
    """Where the network runs: "cpu", "cuda", "cuda:N", or "auto" (CUDA when available). Sampling noise is
    drawn on the CPU either way, so a seed gives the same noise on every device."""

    def __post_init__(self) -> None:
        if self.kind not in ("tiny-dit", "sd3", "flux", "sd1"):
            raise ValueError(f"model.kind must be 'tiny-dit', 'sd3', 'flux' or 'sd1', got {self.kind!r}")
        if self.kind != "tiny-dit" and not self.path:
            raise ValueError(f"model.kind {self.kind!r} needs model.path, the local diffusers model folder")
        if self.dtype not in ("float32", "bfloat16") or self.resolution < 0:
            raise ValueError(
                f"model.dtype must be 'float32' or 'bfloat16' and model.resolution >= 0, got {self.dtype!r}, "
                f"{self.resolution}"
            )
        if self.lora_rank < 0 or self.lora_alpha < 0:
            raise ValueError(
                f"model.lora_rank and model.lora_alpha must be >= 0 (alpha 0: 2 x rank), got "
                f"{self.lora_rank}, {self.lora_alpha}"
            )
        if self.lora_targets and (self.kind == "tiny-dit" or not self.lora_rank):
            raise ValueError(
                "model.lora_targets names the LoRA layers of a diffusers model (model.kind sd3, flux or "
                "sd1) with model.lora_rank > 0; leave it empty otherwise"
            )
        if self.max_sequence_length < 0 or (self.max_sequence_length and self.kind not in ("sd3", "flux")):
            raise ValueError(
                f"model.max_sequence_length is T5's token count for model.kind sd3 or flux (0: the "
                f"pipeline's default), got {self.max_sequence_length} for {self.kind!r}"
            )
        if self.lora_init not in ("gaussian", "kaiming"):
            raise ValueError(f"model.lora_init must be 'gaussian' or 'kaiming', got {self.lora_init!r}")
        if self.merge_lora_rollouts and not self.lora_rank:
            raise ValueError("model.merge_lora_rollouts folds LoRA adapters into the weights: set model.lora_rank > 0")
        if self.compile and self.kind != "tiny-dit":
            raise ValueError(f"model.compile is implemented for the tiny DiT only, not model.kind {self.kind!r}")
        if self.fsdp and self.lora_rank:
            raise ValueError("model.fsdp shards a full fine-tune: set model.lora_rank 0, or leave model.fsdp off")
        name, _, index = str(self.device).partition(":")
        if name not in ("cpu", "cuda", "auto") or (index and (name != "cuda" or not index.isdigit())):
            raise ValueError(f"model.device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {self.device!r}")

    def resolved_device(self) -> torch.device:
        """The torch device of ``device``; raises ValueError when CUDA is asked for and absent."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"model.device is {self.device!r} but torch sees no CUDA device; use 'cpu' or 'auto'")
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ValueError(f"model.device is {self.device!r} but torch sees {count} CUDA devices")
        return dev


@dataclass
class OptimConfig:
    """AdamW settings (Flow-GRPO: lr 3e-4 for LoRA, betas 0.9/0.999, weight decay 1e-4, eps 1e-8)."""

    lr: float = 3e-4
    weight_decay: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")


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
    extra_object_penalty: float = 0.25
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

    def __post_init__(self) -> None:
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


@dataclass
class TrainConfig:
    """A complete training run. Derived batch sizes are properties, checked at construction."""

    run_dir: str = "runs/shapes_grpo_cpu"
    algorithm: Literal["grpo", "nft", "draft", "leapalign"] = "grpo"
    """Flow-GRPO and its family (``grpo`` section), DiffusionNFT (``nft``), or a direct-gradient method: DRaFT,
    ReFL, AlignProp (``draft``) or LeapAlign (``leapalign``); those need a differentiable reward."""
    iterations: int = 60
    seed: int = 0
    train_prompts: str = "shapes:train"
    balance_prompts_by: str = ""
    """Metadata key whose values are drawn equally often (``"category"`` for the Shapes sets); empty draws
    every training prompt with equal probability."""
    prompts_per_iter: int = 16
    group_size: int = 8
    overlap_scoring: bool = True
    """Score each rollout chunk (``micro_batch`` rows) in a worker thread while the next one samples; the
    results are bit-identical to scoring after the rollout, only faster when the reward is slow or remote."""
    ema_decay: float = 0.9
    """EMA of the trained weights for evaluation and checkpoints (decay min((1+k)/(10+k), ema_decay))."""
    ema_every: int = 8
    """Optimizer steps between EMA updates (Flow-GRPO: 8)."""
    eval_every: int = 0
    """Iterations between evaluations (0: only before and after training)."""
    save_every: int = 20
    keep_checkpoints: int = 2
    """Resume states kept (the newest; older ones are deleted). The EMA exports ``iter_*.safetensors`` all stay."""
    max_bad_iterations: int = 5
    """Stop after this many iterations in a row whose update was skipped for non-finite rewards or gradients."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    trackers: tuple[Literal["tensorboard", "wandb"], ...] = ()
    """Also log to these experiment trackers: tensorboard, wandb (optional packages; metrics.jsonl always)."""
    wandb_project: str = "rewardflow"
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline: the W&B run stays in RUN_DIR/wandb (``wandb sync`` uploads it later); online needs a login."""
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    leapalign: LeapAlignConfig = field(default_factory=LeapAlignConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        check_finite(self)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no averaging), got {self.ema_decay}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: only before and after training), got {self.eval_every}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: torch's default), got {self.threads}")
        for name in ("iterations", "prompts_per_iter", "group_size", "ema_every", "save_every", "keep_checkpoints",
                     "max_bad_iterations"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2 and self.algorithm not in DIRECT:
            raise ValueError(f"group_size must be >= 2 for group-normalised advantages, got {self.group_size}")
        from rewardflow.utils.trackers import TRACKERS

        if any(t not in TRACKERS for t in self.trackers) or len(set(self.trackers)) != len(self.trackers):
            raise ValueError(
                f"trackers must list each of {', '.join(TRACKERS)} at most once, got {list(self.trackers)}"
            )
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        self.algo.check_batch(self.rows_per_iter)
        if self.reward.aggregate == "loss" and self.algorithm != "grpo":
            raise ValueError(
                f"reward.aggregate 'loss' (a clipped loss per reward) is Flow-GRPO's family's; algorithm "
                f"{self.algorithm!r} takes 'reward' or 'advantage'"
            )
        k = self.grpo.best_worst_k
        if self.algorithm == "grpo" and k:
            if k > self.group_size:
                raise ValueError(f"grpo.best_worst_k ({k}) must be at most group_size ({self.group_size})")
            try:
                self.grpo.check_batch(self.prompts_per_iter * k)
            except ValueError as e:
                rows = self.prompts_per_iter * k
                raise ValueError(f"with grpo.best_worst_k = {k}, {rows} rows are trained: {e}") from e

    def for_world(self, world: int) -> tuple[TrainConfig, list[str]]:
        """This config with the batch geometry fitted to ``world`` ranks, and a line per field that changed.

        :func:`rewardflow.algorithms.batching.fit_world`: the per-rank micro-batch shrinks so that each optimizer
        step's rows split over the ranks, keeping the images per optimizer step where it can.
        """
        a = self.algo
        fit = fit_world(self.prompts_per_iter, self.group_size, a.micro_batch, a.optimizer_steps, world)
        before = {"prompts_per_iter": self.prompts_per_iter, f"{self.algorithm}.micro_batch": a.micro_batch,
                  f"{self.algorithm}.optimizer_steps": a.optimizer_steps}  # fmt: skip
        changes = [f"{k} {v} -> {w}" for (k, v), w in zip(before.items(), fit) if v != w]
        if not changes:
            return self, []
        algo = dataclasses.replace(a, micro_batch=fit.micro_batch, optimizer_steps=fit.optimizer_steps)
        fitted = dataclasses.replace(self, prompts_per_iter=fit.prompts_per_iter, **{self.algorithm: algo})
        return fitted, changes

    @property
    def algo(self) -> GRPOConfig | NFTConfig | DraftConfig | LeapAlignConfig:
        """The settings of the chosen algorithm."""
        return getattr(self, self.algorithm)

    @property
    def uses_shapes_prompts(self) -> bool:
        """Whether the training prompts must be in the Shapes grammar.

        They must when the tiny DiT's tokenizer, a Shapes reward, or the judge's monitor of a direct-gradient run
        (``eval.judge``) reads them.
        """
        shapes_reward = any(n.startswith("shapes-") for n in self.reward.names)
        return self.model.kind == "tiny-dit" or shapes_reward or (self.algorithm in DIRECT and self.eval.judge)

    @property
    def rows_per_iter(self) -> int:
        """Images sampled per iteration: prompts_per_iter x group_size."""
        return self.prompts_per_iter * self.group_size

    def summary(self) -> str:
        a = self.algo
        head = (
            f"{self.algorithm}: {self.rows_per_iter} images/iteration ({self.prompts_per_iter} prompts x "
            f"{self.group_size}), {self.rows_per_iter // a.micro_batch} micro-batches of {a.micro_batch}, "
            f"{a.optimizer_steps} optimizer steps/iteration, "
        )
        if isinstance(a, GRPOConfig):
            lo, hi = a.window_bounds
            if not a.sde_window:
                where = "all but the last"
            elif a.sde_window == hi - lo:  # one place: the window is fixed
                where = f"steps {lo}..{hi - 1}"
            else:
                where = f"a {a.window_schedule} window of {a.sde_window} in steps {lo}..{hi - 1}"
            return head + (
                f"{a.sde_type} SDE on {where} of {a.num_steps} steps, {a.steps_per_sample} of its "
                f"{a.sde_steps} SDE steps trained per sample" + (", GRPO-Guard objective" if a.guard else "")
            )
        if isinstance(a, NFTConfig):
            return head + f"{a.solver} rollouts of {a.num_steps} steps, {a.sigmas_per_image} sigmas trained per image"
        if isinstance(a, DraftConfig):
            return head + f"{a.method} through {a.num_steps} Euler steps"
        return head + f"two leaps (alpha {a.alpha}) inside {a.num_steps} Euler steps"


def check_finite(cfg: Any, where: str = "") -> None:
    """Refuse NaN and infinity in every float field of ``cfg`` and its sections (tuples included), naming the field.

    A range check like ``x <= 0`` is false for NaN, so without this a NaN would pass them all.
    """
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), f"{where}.{f.name}".lstrip(".")
        if dataclasses.is_dataclass(value):
            check_finite(value, name)
            continue
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v}")


def to_yaml(cfg: Any) -> str:
    """A config dataclass as YAML (the run folder's ``config.yaml``)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def _build(cls: Any, raw: Any, where: str) -> Any:
    if not dataclasses.is_dataclass(cls):
        return tuple(raw) if isinstance(raw, list) else raw
    if not isinstance(raw, dict):
        raise ValueError(f"config section {where or 'root'} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"config section {where or 'root'} has unknown fields {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, value in raw.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        sub = type(default) if dataclasses.is_dataclass(default) else None
        # YAML has no tuples: a list read back for a tuple field becomes a tuple again.
        kwargs[name] = _build(sub, value, f"{where}.{name}".strip(".")) if sub else _build(None, value, "")
    return cls(**kwargs)


def from_yaml(text: str) -> TrainConfig:
    """Rebuild a TrainConfig from ``config.yaml``; unknown fields raise naming the field."""
    raw = yaml.safe_load(text)
    reward = raw.get("reward") if isinstance(raw, dict) else None
    if isinstance(reward, dict) and "name" in reward:  # run folders written before several rewards existed
        reward["names"] = [reward.pop("name")]
    for section in ("grpo", "nft", "draft", "leapalign", "eval"):
        # Run folders written when grids were scaled by hand: the start of the grid is now the model's own.
        if isinstance(raw, dict) and isinstance(raw.get(section), dict):
            raw[section].pop("sigma_max", None)
    return _build(TrainConfig, raw, "")


def read_run_config(run: str | Path) -> TrainConfig:
    """A run folder's ``config.yaml`` as a TrainConfig; an unreadable or invalid file raises ValueError naming it."""
    path = Path(run) / "config.yaml"
    try:
        return from_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a valid run config: {str(err).splitlines()[0]}") from err


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """``cfg`` with ``section.field=value`` overrides (values parsed as YAML), every check run again.

    An unknown section or field is named with the allowed ones; the result is a new config.
    """
    raw = yaml.safe_load(to_yaml(cfg))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form section.field=value")
        *path, last = key.strip().split(".")
        node = raw
        for part in path:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"override {item!r}: no config section {part!r}")
            node = node[part]
        if last not in node:
            raise ValueError(f"override {item!r}: unknown field {last!r}; allowed: {sorted(node)}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML reads "1e-3" as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        node[last] = parsed
    return from_yaml(yaml.safe_dump(raw))
