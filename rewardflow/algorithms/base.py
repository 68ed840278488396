"""The interface every algorithm implements, and what the training loop hands it.

An algorithm is one module of this package that defines its config section (a dataclass, whose fields become the
``--<name>.*`` flags) and a class with the :class:`Algorithm` methods, registered with :func:`register`. The loop
(:mod:`rewardflow.train`) and the run state (:mod:`rewardflow.run_state`) call only these methods; no module outside
this package names an algorithm. :mod:`rewardflow.algorithms.registry` finds every registered one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from rewardflow.algorithms.batching import KeyedRandom, RowLayout
from rewardflow.models.protocol import Conditioning, FlowPolicy
from rewardflow.rewards.config import RewardConfig
from rewardflow.rewards.protocol import RewardFn
from rewardflow.types import RewardOutput
from rewardflow.utils.ema import EMA


@dataclass
class Tools:
    """What an algorithm works with for a whole run (built once by the loop)."""

    policy: FlowPolicy
    optimizer: torch.optim.Optimizer
    ema: EMA
    """Folded in after every optimizer step (``ema.step``)."""
    reward_fn: RewardFn
    reward: RewardConfig
    """The run's ``reward`` section: the rewards' names, weights and how they combine."""
    overlap_scoring: bool
    """Score each rollout chunk in a worker thread while the next one samples (bit-identical scores)."""
    monitor: RewardFn | None = None
    """The evaluation's judge, scoring the training images beside the reward (``judge/*`` metrics), when the
    algorithm asks for it (:attr:`Algorithm.monitored`) and ``eval.judge`` is on."""


@dataclass
class Batch:
    """One iteration's rows on this rank."""

    cond: Conditioning
    metadata: list[dict[str, Any]]
    layout: RowLayout
    """This rank's rows among the iteration's, and every row's group."""
    random: KeyedRandom
    """Every random draw of the iteration, keyed by purpose and global row (a resumed run draws the same)."""
    iteration: int
    """0-based index of the iteration."""


class StepResult(NamedTuple):
    """What one iteration returns to the loop."""

    images: torch.Tensor
    """This rank's images [n, 3, H, W] in [0, 1] (for the sample grids)."""
    reward: RewardOutput
    """The whole batch's reward, gathered from every rank in global row order."""
    metrics: dict[str, float]
    """Averaged over ranks; ``skipped_steps`` counts optimizer steps not taken (non-finite rewards or losses)."""


class Algorithm(Protocol):
    """A training method as the loop sees it. Built from its config section: ``cls(section)``."""

    monitored: bool
    """Whether the evaluation's judge should score its training images as a monitor (a learned, differentiable
    reward stands in for the judge there, and the gap between them is where reward hacking shows)."""
    needs_reference: bool
    """Whether it ever evaluates the frozen reference policy (a KL term, a velocity penalty): without it, a full
    fine-tune skips the reference copy."""

    def check(self, prompts_per_iter: int, group_size: int, reward: RewardConfig) -> None:
        """Raise ValueError, naming the field, unless the run's batch and rewards suit the algorithm."""
        ...

    def check_world(self, world_size: int) -> None:
        """Raise ValueError unless the algorithm can run on ``world_size`` processes as configured."""
        ...

    def describe(self) -> str:
        """One phrase for the start-up line: what is sampled and trained."""
        ...

    def prepare(self, policy: FlowPolicy) -> None:
        """Check that the policy offers what the algorithm needs and set up its state (before sharding)."""
        ...

    def check_reward(self, reward_fn: RewardFn) -> None:
        """Raise ValueError, naming the reward, unless the algorithm can train on it."""
        ...

    def step(self, tools: Tools, batch: Batch) -> StepResult:
        """One iteration: sample, score, update."""
        ...

    def state(self, policy: FlowPolicy) -> dict[str, dict[str, torch.Tensor]]:
        """What a resume state must hold besides the trained weights, optimizer and EMA (live tensors)."""
        ...

    def load_state(self, policy: FlowPolicy, state: dict[str, Any], path: str) -> None:
        """Copy :meth:`state`'s entries back from a loaded resume state (raising ``IncompatibleState``)."""
        ...


class Registered(NamedTuple):
    """A registered algorithm: its name, its config section's dataclass, and how to build it from a section.

    The name is both the value of the run's ``algorithm`` field and the name of its config section.
    """

    name: str
    config: type
    build: Callable[[Any], Algorithm]


REGISTERED: dict[str, Registered] = {}


def register(name: str, config: type) -> Callable[[Callable[[Any], Algorithm]], Callable[[Any], Algorithm]]:
    """Class decorator (or a call on a factory): make an algorithm available under ``name`` with its ``config``."""

    def add(build: Callable[[Any], Algorithm]) -> Callable[[Any], Algorithm]:
        if name in REGISTERED and REGISTERED[name].build is not build:
            raise ValueError(f"two algorithms are registered as {name!r}")
        REGISTERED[name] = Registered(name, config, build)
        return build

    return add


def check_aggregate(reward: RewardConfig, name: str, allowed: tuple[str, ...] = ("reward", "advantage")) -> None:
    """Raise unless ``reward.aggregate`` is one the algorithm ``name`` implements."""
    if reward.aggregate not in allowed:
        raise ValueError(
            f"reward.aggregate {reward.aggregate!r} is not implemented by algorithm {name!r}; it takes "
            f"{' or '.join(repr(a) for a in allowed)}"
        )
