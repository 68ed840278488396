"""The run's configuration, composed from the components' sections (tyro turns it into flags; presets fill it in).

Each component owns its section: ``model`` (:mod:`rewardflow.models.config`), ``reward``
(:mod:`rewardflow.rewards.config`), ``eval`` (:mod:`rewardflow.evaluate`) and one section per registered algorithm
(:mod:`rewardflow.algorithms.registry`), named after it. This module only composes them and checks what spans
sections; nothing in the package below it imports it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from rewardflow.algorithms.base import Algorithm
from rewardflow.algorithms.batching import fit_world
from rewardflow.algorithms.registry import ALGORITHMS, DEFAULT, build
from rewardflow.evaluate import EvalConfig
from rewardflow.models.config import ModelConfig
from rewardflow.rewards.config import RewardConfig
from rewardflow.utils.configs import Count, Natural, NonNegative, Positive, Range, check_fields, from_dict, to_yaml
from rewardflow.utils.trackers import TRACKERS

AlgorithmName = Literal[tuple(ALGORITHMS)]  # type: ignore[valid-type]


@dataclass
class OptimConfig:
    """AdamW settings (Flow-GRPO: lr 3e-4 for LoRA, weight decay 1e-4).

    Betas 0.9 / 0.999 and eps 1e-8 are AdamW's own defaults, as in every official script.
    """

    lr: Positive = 3e-4
    weight_decay: NonNegative = 1e-4

    def __post_init__(self) -> None:
        check_fields(self, "optim")


@dataclass
class RunConfig:
    """The sections and fields every run has; :class:`TrainConfig` adds one section per algorithm and ``eval``."""

    run_dir: str = "runs/shapes_grpo_cpu"
    algorithm: AlgorithmName = DEFAULT
    """The training method, one of the registered algorithms; its settings are the section of the same name
    (docs/papers.md lists each with its paper and preset)."""
    iterations: Count = 60
    """Training iterations (each: sample, score, update); a resumed run may raise it."""
    seed: int = 0
    """Seeds every random draw: the prompts, the noise, the SDE windows (a resumed run draws the same)."""
    train_prompts: str = "shapes:train"
    """Training prompts: a .txt (one a line) or .jsonl file (``prompt`` plus metadata), or a shipped set."""
    balance_prompts_by: str = ""
    """Metadata key whose values are drawn equally often (``"category"`` for the Shapes sets); empty draws
    every training prompt with equal probability."""
    prompts_per_iter: Count = 16
    """Distinct prompts per iteration, each sampled ``group_size`` times."""
    group_size: Count = 8
    """Images per prompt; advantages are normalised within each prompt's group."""
    overlap_scoring: bool = True
    """Score each rollout chunk (``micro_batch`` rows) in a worker thread while the next one samples; the
    results are bit-identical to scoring after the rollout, only faster when the reward is slow or remote."""
    ema_decay: Annotated[float, Range(0, 1, high_open=True)] = 0.9
    """EMA of the trained weights for evaluation and checkpoints (decay min((1+k)/(10+k), ema_decay))."""
    ema_every: Count = 8
    """Optimizer steps between EMA updates (Flow-GRPO: 8)."""
    eval_every: Natural = 0
    """Iterations between evaluations (0: only before and after training)."""
    save_every: Count = 20
    """Iterations between checkpoints (EMA weights and a resume state; the last iteration always saves)."""
    keep_checkpoints: Count = 2
    """Resume states kept (the newest; older ones are deleted). The EMA exports ``iter_*.safetensors`` all stay."""
    max_bad_iterations: Count = 5
    """Stop after this many iterations in a row whose update was skipped for non-finite rewards or gradients."""
    threads: Natural = 0
    """torch CPU threads (0: torch's default)."""
    trackers: tuple[Literal["tensorboard", "wandb"], ...] = ()
    """Also log to these experiment trackers: tensorboard, wandb (optional packages; metrics.jsonl always)."""
    wandb_project: str = "rewardflow"
    """The W&B project of the run (with ``trackers`` wandb)."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline: the W&B run stays in RUN_DIR/wandb (``wandb sync`` uploads it later); online needs a login."""
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        check_fields(self)
        if any(t not in TRACKERS for t in self.trackers) or len(set(self.trackers)) != len(self.trackers):
            raise ValueError(
                f"trackers must list each of {', '.join(TRACKERS)} at most once, got {list(self.trackers)}"
            )
        self.method().check(self.prompts_per_iter, self.group_size, self.reward)

    def method(self) -> Algorithm:
        """The chosen algorithm, built from its section (raises ValueError for an unknown ``algorithm``)."""
        return build(self.algorithm, getattr(self, self.algorithm, None))

    @property
    def algo(self) -> Any:
        """The chosen algorithm's section (its config dataclass)."""
        return getattr(self, self.algorithm)

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
    def uses_shapes_prompts(self) -> bool:
        """Whether the training prompts must be in the Shapes grammar.

        They must when the tiny DiT's tokenizer, a Shapes reward, or the judge monitoring the training images
        (an algorithm that asks for it, with ``eval.judge``) reads them.
        """
        shapes_reward = any(n.startswith("shapes-") for n in self.reward.names)
        return self.model.kind == "tiny-dit" or shapes_reward or (self.method().monitored and self.eval.judge)

    @property
    def rows_per_iter(self) -> int:
        """Images sampled per iteration: prompts_per_iter x group_size."""
        return self.prompts_per_iter * self.group_size

    def summary(self) -> str:
        """The start-up line: the batch geometry and what the algorithm samples and trains."""
        a = self.algo
        return (
            f"{self.algorithm}: {self.rows_per_iter} images/iteration ({self.prompts_per_iter} prompts x "
            f"{self.group_size}), {self.rows_per_iter // a.micro_batch} micro-batches of {a.micro_batch}, "
            f"{a.optimizer_steps} optimizer steps/iteration, {self.method().describe()}"
        )


# One section per registered algorithm, named after it, then the evaluation's.
TrainConfig = dataclasses.make_dataclass(
    "TrainConfig",
    [(name, a.config, field(default_factory=a.config)) for name, a in ALGORITHMS.items()]
    + [("eval", EvalConfig, field(default_factory=EvalConfig))],
    bases=(RunConfig,),
)
TrainConfig.__module__ = __name__
TrainConfig.__doc__ = "A complete training run. Derived batch sizes are properties, checked at construction."


RETIRED = {"optim.beta1": 0.9, "optim.beta2": 0.999, "optim.eps": 1e-8, "grpo.log_prob_reduction": "mean"}
"""Fields that no preset, test or documented use set, with the value they always had: an old config.yaml that holds
them at that value still loads."""


def from_yaml(text: str) -> TrainConfig:
    """Rebuild a TrainConfig from ``config.yaml``; unknown fields raise naming the field."""
    raw = yaml.safe_load(text)
    reward = raw.get("reward") if isinstance(raw, dict) else None
    if isinstance(reward, dict) and "name" in reward:  # run folders written before several rewards existed
        reward["names"] = [reward.pop("name")]
    for section in raw.values() if isinstance(raw, dict) else ():
        # Run folders written when grids were scaled by hand: the start of the grid is now the model's own.
        if isinstance(section, dict):
            section.pop("sigma_max", None)
    for name, value in RETIRED.items():
        section, _, key = name.partition(".")
        held = raw.get(section) if isinstance(raw, dict) else None
        if isinstance(held, dict) and key in held:
            if held.pop(key) != value:
                raise ValueError(f"{name} is no longer a setting (it is always {value!r}); remove it from config.yaml")
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
