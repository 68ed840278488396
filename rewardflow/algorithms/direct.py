"""What the direct-gradient methods (the DRaFT family, LeapAlign) share: settings, the update, the loop's step.

Each method is a per-micro-batch loss (:data:`MicroBatchLoss`): it samples with gradient through some steps and
returns the reward loss of what it scored. :func:`direct_train_step` runs it over an iteration's micro-batches and
optimizer steps; :class:`DirectMethod` is the :class:`~rewardflow.algorithms.base.Algorithm` around it, so that a new
direct method is its config, its loss and one ``register`` call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import torch

from rewardflow.algorithms import batching
from rewardflow.algorithms.base import Batch, StepResult, Tools, check_aggregate, register
from rewardflow.models.protocol import Conditioning, FlowPolicy
from rewardflow.rewards import differentiable_rewards
from rewardflow.rewards.config import RewardConfig
from rewardflow.rewards.protocol import RewardFn
from rewardflow.sampling.config import SamplerConfig
from rewardflow.sampling.grad import Velocity, checkpointed
from rewardflow.types import RewardOutput
from rewardflow.utils import distributed
from rewardflow.utils.configs import Count, Positive, Range


@dataclass
class DirectConfig(SamplerConfig):
    """Settings every direct-gradient method shares (its config section is ``SECTION``).

    ``num_steps``, ``shift``, ``guidance_scale``: :class:`~rewardflow.sampling.config.SamplerConfig` (the Euler steps
    of the training sampler).
    """

    SECTION = "direct"
    num_steps: Annotated[int, Range(2)] = 20
    hinge: Annotated[float | None, Range(0, low_open=True)] = None
    """Loss ``relu(hinge - r)`` instead of ``-r`` (ReFL: 2 on ImageReward's scale): good images stop pulling."""
    checkpointing: bool = True
    """Recompute each grad-carrying model call in the backward pass instead of storing its activations."""
    micro_batch: Count = 16
    optimizer_steps: Count = 1
    grad_clip: Positive = 1.0

    def check_batch(self, rows: int) -> None:
        batching.check_split(rows, self.micro_batch, self.optimizer_steps, self.SECTION)

    def describe(self) -> str:
        """What the method trains through, for the start-up line."""
        return f"{self.num_steps} Euler steps"


def check_differentiable(reward_fn: RewardFn, algorithm: str) -> None:
    """Raise unless the reward can carry gradient (a direct-gradient method cannot use anything else)."""
    if not getattr(reward_fn, "differentiable", False):
        raise ValueError(
            f"algorithm {algorithm!r} backpropagates the reward, but reward {reward_fn.name!r} is not differentiable;"
            f" differentiable rewards: {', '.join(differentiable_rewards())}"
        )


def reward_loss(scores: torch.Tensor, hinge: float | None) -> torch.Tensor:
    """Per-sample loss ``-r``, or ``relu(hinge - r)``."""
    return -scores if hinge is None else torch.relu(hinge - scores)


def bind_velocity(policy: FlowPolicy, cond: Conditioning, guidance_scale: float, checkpointing: bool) -> Velocity:
    """``v(x, sigma)`` of the policy for these prompts (checkpointed when asked)."""

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return policy.velocity(x, sigma, cond, guidance_scale)

    return checkpointed(velocity) if checkpointing else velocity


Gen = torch.Generator | None

# (policy, cond rows, metadata rows, noise generator, choices generator)
#   -> (loss, real samples [B, ...] detached, their reward, metrics)
# The noise generator is the micro-batch's own; the choices one (which steps carry gradient) is shared by every
# rank for the optimizer step, as the direct-gradient blueprint asks.
MicroBatchLoss = Callable[
    [FlowPolicy, Conditioning, list[dict], torch.Generator | None, torch.Generator | None],
    tuple[torch.Tensor, torch.Tensor, RewardOutput, dict],
]


def direct_train_step(
    policy: FlowPolicy,
    optimizer: torch.optim.Optimizer,
    cond: Conditioning,
    metadata: list[dict],
    loss_fn: MicroBatchLoss,
    cfg: DirectConfig,
    after_optimizer_step: Callable[[], None] | None = None,
    generator: batching.Random = None,
) -> tuple[dict[str, float], torch.Tensor, RewardOutput]:
    """One iteration of a direct-gradient method over every micro-batch of ``cond`` (with its ``metadata``).

    Returns the metrics, the real samples [N, ...] (detached) and the reward of what was scored (detached).
    """
    n = len(cond)
    cfg.check_batch(n)
    plan = batching.micro_batches(n, cfg.micro_batch, cfg.optimizer_steps)
    sums: dict[str, torch.Tensor | float] = {"loss": 0.0}
    finals, outs, grad_norms = [], [], []
    optimizer.zero_grad(set_to_none=True)
    finite: torch.Tensor | bool = True  # every loss of the optimizer step so far
    for rows, share, step, ends_step in plan:
        noise = batching.rows_generator(generator, "direct", rows.start)
        choices = batching.shared_generator(generator, "active-steps", step)
        loss, final, out, extra = loss_fn(policy, cond.index(rows), metadata[rows], noise, choices)
        (loss / share).backward()
        finite = finite & torch.isfinite(loss.detach())
        sums["loss"] += loss.detach()
        for key, value in extra.items():
            sums[key] = sums.get(key, 0.0) + value
        finals.append(final)
        outs.append(out)
        if ends_step:
            grad_norms.append(batching.optimizer_step(optimizer, cfg.grad_clip, after_optimizer_step, finite))
            finite = True
    return batching.mean_metrics(sums, len(plan), grad_norms), torch.cat(finals), RewardOutput.cat(outs)


class DirectMethod:
    """A direct-gradient method as the loop runs it: its config section and its loss.

    ``make_loss(reward_fn, cfg)`` builds the method's :data:`MicroBatchLoss`. The evaluation's judge scores the
    training images as a monitor (``judge/*``), since the differentiable reward it optimises is a stand-in for it.
    """

    monitored = True
    needs_reference = False

    def __init__(self, cfg: DirectConfig, name: str, make_loss: Callable[[RewardFn, Any], MicroBatchLoss]) -> None:
        self.cfg, self.name, self.make_loss = cfg, name, make_loss

    def check(self, prompts_per_iter: int, group_size: int, reward: RewardConfig) -> None:
        """Any group size (one image per prompt is enough); every micro-batch whole."""
        self.cfg.check_batch(prompts_per_iter * group_size)
        check_aggregate(reward, self.name)

    def check_world(self, world_size: int) -> None:
        """Any number of processes."""

    def describe(self) -> str:
        return self.cfg.describe()

    def prepare(self, policy: FlowPolicy) -> None:
        """Nothing to set up: any policy will do."""

    def check_reward(self, reward_fn: RewardFn) -> None:
        """The reward must carry gradient to the images."""
        check_differentiable(reward_fn, self.name)

    def step(self, tools: Tools, batch: Batch) -> StepResult:
        policy, cond, metadata = tools.policy, batch.cond, batch.metadata
        loss_fn = self.make_loss(tools.reward_fn, self.cfg)
        update, final, reward = direct_train_step(policy, tools.optimizer, cond, metadata, loss_fn, self.cfg,
                                                  tools.ema.step, generator=batch.random)  # fmt: skip
        images = policy.decode(final)
        if tools.monitor is not None:
            judged = tools.monitor(images, cond.prompts, metadata)
            update.update({f"judge/{k}": v.mean().item() for k, v in judged.details.items()})
            update["judge/reward"] = judged.scores.mean().item()
        return StepResult(images, batch.layout.gather(reward), distributed.mean_over_ranks(update))

    def state(self, policy: FlowPolicy) -> dict[str, dict[str, torch.Tensor]]:
        return {}

    def load_state(self, policy: FlowPolicy, state: dict[str, Any], path: str) -> None:
        """Nothing beyond the trained weights, optimizer and EMA."""


def register_direct(
    name: str, config: type[DirectConfig], make_loss: Callable[[RewardFn, Any], MicroBatchLoss]
) -> None:
    """Register a direct-gradient method: its name, its config section and its loss (:class:`DirectMethod`)."""
    register(name, config)(functools.partial(DirectMethod, name=name, make_loss=make_loss))
