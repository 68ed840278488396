"""Direct reward gradients through sampling: DRaFT (full, -K, -LV), ReFL and AlignProp.

Papers: Clark et al., "Directly Fine-Tuning Diffusion Models on Differentiable Rewards" (DRaFT, arXiv
2309.17400); Xu et al., ImageReward (ReFL, arXiv 2304.05977); Prabhudesai et al., AlignProp (arXiv
2310.03739); ported to rectified flows with deterministic Euler sampling.

Every method samples with the Euler ODE, lets the reward's gradient reach the model through some steps
(:mod:`rewardflow.sampling.grad`) and minimises ``-r`` (or a hinge ``relu(margin - r)``):

- ``draft``: the last ``k`` steps carry gradient, through the model and the latent chain between them;
  ``k = num_steps`` is full backprop (DRaFT), ``k = 1`` is DRaFT-1.
- ``draft-lv``: DRaFT-LV. The sample is drawn without gradient, re-noised ``lv_samples`` times to the last
  grid sigma and denoised in one step with gradient each; with ``lv_include_base`` the ordinary last step is
  one more term (FlowBP's choice; the SD reimplementations keep only the re-noised terms).
- ``refl``: ReFL. Sampling stops at a random step among the last ``refl_last``; the reward is computed on that
  step's one-step clean prediction ``x - sigma v``, with one model call's gradient.
- ``alignprop``: AlignProp's randomised truncation: the first grad-carrying step is drawn uniformly in
  ``[alignprop_min, num_steps)`` each micro-batch (a random K).

Every model call that carries gradient is checkpointed (``checkpointing``), so memory grows with the number
of such steps by one latent each, not by one network's activations. The reward must be differentiable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from rewardflow.algorithms.batching import (
    Random,
    check_split,
    mean_metrics,
    micro_batches,
    optimizer_step,
    rows_generator,
    shared_generator,
)
from rewardflow.models.protocol import Conditioning, FlowPolicy
from rewardflow.rewards.protocol import RewardFn
from rewardflow.sampling.grad import Velocity, checkpointed, renoised_last_step, stopped_euler, truncated_euler
from rewardflow.types import RewardOutput

METHODS = ("draft", "draft-lv", "refl", "alignprop")


@dataclass
class DirectConfig:
    """Settings every direct-gradient method shares (its config section is ``SECTION``)."""

    SECTION = "direct"
    num_steps: int = 20
    """Euler steps of the training sampler."""
    shift: float = 0.0
    """The sampling grid: 0 is the model's own (the sigmas its diffusers pipeline samples on for ``num_steps``,
    from the scheduler config in the model folder; the Shapes world's uniform grid shifted by 3 for the tiny DiT);
    > 0 is ``linspace(1, 0, T + 1)`` with this fixed shift for any model (DanceGRPO's grid, shift 3)."""
    guidance_scale: float = 4.5
    hinge: float | None = None
    """Loss ``relu(hinge - r)`` instead of ``-r`` (ReFL: 2 on ImageReward's scale): good images stop pulling."""
    checkpointing: bool = True
    """Recompute each grad-carrying model call in the backward pass instead of storing its activations."""
    micro_batch: int = 16
    optimizer_steps: int = 1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        s = self.SECTION
        if self.num_steps < 2:
            raise ValueError(f"{s}.num_steps must be >= 2, got {self.num_steps}")
        if self.hinge is not None and self.hinge <= 0:
            raise ValueError(f"{s}.hinge must be > 0 (or unset for the loss -r), got {self.hinge}")
        if self.guidance_scale < 1 or self.shift < 0 or self.grad_clip <= 0:
            raise ValueError(
                f"{s}.guidance_scale must be >= 1, {s}.shift >= 0 (0: the model's own grid) and {s}.grad_clip > 0"
            )
        if self.micro_batch < 1 or self.optimizer_steps < 1:
            raise ValueError(f"{s}.micro_batch and {s}.optimizer_steps must be >= 1")

    def check_batch(self, rows: int) -> None:
        check_split(rows, self.micro_batch, self.optimizer_steps, self.SECTION)


@dataclass
class DraftConfig(DirectConfig):
    """Settings of the DRaFT family (defaults: DRaFT-1 scaled to the Shapes world)."""

    SECTION = "draft"
    method: Literal["draft", "draft-lv", "refl", "alignprop"] = "draft"
    k: int = 1
    """``draft``: how many of the last steps carry gradient (``num_steps``: full backprop)."""
    lv_samples: int = 2
    """``draft-lv``: re-noised gradient samples per image (DRaFT uses 2)."""
    lv_include_base: bool = True
    """``draft-lv``: also train the ordinary last step of the real trajectory."""
    refl_last: int = 5
    """``refl``: the stop step is drawn among the last this many steps (ImageReward: the last 10 of 40)."""
    alignprop_min: int = 10
    """``alignprop``: the first grad-carrying step is drawn in ``[alignprop_min, num_steps)``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"draft.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        # The fields of the chosen method must fit the grid (the others are not used).
        m, steps = self.method, self.num_steps
        if m == "draft" and not 1 <= self.k <= steps:
            raise ValueError(f"draft.k must be in [1, draft.num_steps = {steps}], got {self.k}")
        if m == "refl" and not 1 <= self.refl_last <= steps:
            raise ValueError(f"draft.refl_last must be in [1, draft.num_steps = {steps}], got {self.refl_last}")
        if m == "alignprop" and not 0 <= self.alignprop_min < steps:
            raise ValueError(
                f"draft.alignprop_min must be in [0, draft.num_steps = {steps}), got {self.alignprop_min}"
            )
        if m == "draft-lv" and self.lv_samples < 1:
            raise ValueError(f"draft.lv_samples must be >= 1, got {self.lv_samples}")

    def sample(
        self,
        velocity: Velocity,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        generator: torch.Generator | None,
        choices: torch.Generator | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The samples whose rewards make one micro-batch's loss, and the real sample of its trajectory.

        Each scored sample carries its method's gradient path; the real sample is detached (it is what the judge
        monitors and the sample grids show). ``generator`` draws noise (DRaFT-LV's), ``choices`` the steps
        (AlignProp's truncation, ReFL's stop; ``generator`` when None).
        """
        choices = generator if choices is None else choices
        steps = self.num_steps
        if self.method in ("draft", "alignprop"):
            start = steps - self.k
            if self.method == "alignprop":
                start = int(torch.randint(self.alignprop_min, steps, (1,), generator=choices))
            x0 = truncated_euler(velocity, x, sigmas, grad_from=start)
            return [x0], x0.detach()
        if self.method == "refl":
            stop = int(torch.randint(steps - self.refl_last, steps, (1,), generator=choices))
            prediction, real = stopped_euler(velocity, x, sigmas, stop)
            return [prediction], real
        last = truncated_euler(velocity, x, sigmas, grad_from=steps - 1)  # the real sample, last step with grad
        extra = renoised_last_step(velocity, last, float(sigmas[-2]), self.lv_samples, generator)
        return ([last, *extra] if self.lv_include_base else extra), last.detach()


def check_differentiable(reward_fn: RewardFn, algorithm: str) -> None:
    """Raise unless the reward can carry gradient (a direct-gradient method cannot use anything else)."""
    if not getattr(reward_fn, "differentiable", False):
        from rewardflow.rewards import differentiable_rewards

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
    generator: Random = None,
) -> tuple[dict[str, float], torch.Tensor, RewardOutput]:
    """One iteration of a direct-gradient method over every micro-batch of ``cond`` (with its ``metadata``).

    Returns the metrics, the real samples [N, ...] (detached) and the reward of what was scored (detached).
    """
    n = len(cond)
    cfg.check_batch(n)
    plan = micro_batches(n, cfg.micro_batch, cfg.optimizer_steps)
    sums: dict[str, torch.Tensor | float] = {"loss": 0.0}
    finals, outs, grad_norms = [], [], []
    optimizer.zero_grad(set_to_none=True)
    finite: torch.Tensor | bool = True  # every loss of the optimizer step so far
    for rows, share, step, ends_step in plan:
        noise = rows_generator(generator, "direct", rows.start)
        choices = shared_generator(generator, "active-steps", step)
        loss, final, out, extra = loss_fn(policy, cond.index(rows), metadata[rows], noise, choices)
        (loss / share).backward()
        finite = finite & torch.isfinite(loss.detach())
        sums["loss"] += loss.detach()
        for key, value in extra.items():
            sums[key] = sums.get(key, 0.0) + value
        finals.append(final)
        outs.append(out)
        if ends_step:
            grad_norms.append(optimizer_step(optimizer, cfg.grad_clip, after_optimizer_step, finite))
            finite = True
    return mean_metrics(sums, len(plan), grad_norms), torch.cat(finals), RewardOutput.cat(outs)


def draft_loss(reward_fn: RewardFn, cfg: DraftConfig) -> MicroBatchLoss:
    """The per-micro-batch loss of ``cfg.method``: mean over images and gradient samples of the reward loss.

    The logged reward is that of the first scored sample: the real one, except for ReFL (its clean
    prediction) and DRaFT-LV without the base term (a re-noised one).
    """

    def loss_fn(policy: FlowPolicy, cond: Conditioning, metadata: list[dict], generator: Gen, choices: Gen):
        velocity = bind_velocity(policy, cond, cfg.guidance_scale, cfg.checkpointing)
        sigmas = policy.schedule(cfg.num_steps, cfg.shift)
        x = policy.noise(len(cond), generator, float(sigmas[0]))
        samples, real = cfg.sample(velocity, x, sigmas, generator, choices)
        outs = [reward_fn(policy.decode(x), cond.prompts, metadata) for x in samples]
        loss = torch.stack([reward_loss(o.scores, cfg.hinge).mean() for o in outs]).mean()
        return loss, real, outs[0], {}

    return loss_fn
