"""Typed training configuration (tyro turns it into command-line flags; presets fill it in)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from rewardflow.algorithms.batching import fit_world
from rewardflow.algorithms.draft import DraftConfig
from rewardflow.algorithms.grpo import GRPOConfig
from rewardflow.algorithms.leapalign import LeapAlignConfig
from rewardflow.algorithms.nft import NFTConfig
from rewardflow.evaluate import EvalConfig
from rewardflow.models.config import ModelConfig
from rewardflow.rewards.config import RewardConfig
from rewardflow.utils.configs import check_finite, from_dict, to_yaml

ALGORITHMS = ("grpo", "nft", "draft", "leapalign")
DIRECT = ("draft", "leapalign")


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
    return from_dict(TrainConfig, raw, "")


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
