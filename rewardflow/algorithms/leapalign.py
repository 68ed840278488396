"""LeapAlign: direct reward gradients to any step through a two-leap trajectory.

Paper: Liang et al., "LeapAlign" (arXiv 2604.15311, CVPR 2026); the algorithm as the public reimplementation in FlowBP
(which credits the official code) runs it. Each micro-batch samples an ordinary Euler trajectory; two steps ``k < j``
are drawn and :func:`rewardflow.sampling.grad.leap_rollout` builds the two leaps ``x_k -> x_j -> x_0`` with one model
call each, joined to the real trajectory by connectors, so the reward is computed on the real sample while its gradient
reaches step ``k`` (early, layout-setting steps included) and step ``j``. The nested cross-step term is discounted by
``alpha`` rather than removed (``alpha = 0`` is DRTune's input stop-gradient), and each image's loss is weighted by the
trajectory-consistency weight ``1 / (d_j + d_0)``.

Choices the public material leaves open, as made here and exposed as fields:

- The pair: ``(k, j)`` uniform over distinct pairs of ``[pair_min, pair_max)`` (``pair_max = 0``: every
  step), drawn per optimizer step from a stream every rank shares (its micro-batches, on every rank, use
  the same pair). ``k`` may be the first step and ``j`` the last.
- The weight: ``1 / (max(tau, mean|leap_j - x_j|) + max(tau, mean|leap_0 - x_0|))``, mean absolute
  difference per image, not normalised across the batch.
- Discounting only on the model input at ``j`` (the only place the nested term enters), constant ``alpha``.
- The loss: ``-r`` (or a hinge, ``hinge``), as for DRaFT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rewardflow.algorithms.direct import DirectConfig, Gen, MicroBatchLoss, bind_velocity, register_direct, reward_loss
from rewardflow.models.protocol import Conditioning, FlowPolicy
from rewardflow.rewards.protocol import RewardFn
from rewardflow.sampling.grad import leap_rollout
from rewardflow.utils.configs import Natural, Positive, Probability


@dataclass
class LeapAlignConfig(DirectConfig):
    """LeapAlign's settings (alpha 0.3 and tau 0.1 as in the reimplementation's config)."""

    SECTION = "leapalign"
    alpha: Probability = 0.3
    """Gradient discount of the nested term: 0 = input stop-gradient (DRTune), 1 = exact two-leap backprop."""
    tau: Positive = 0.1
    """Floor of each leap distance (caps the weight at 1 / (2 tau))."""
    pair_min: Natural = 0
    pair_max: Natural = 0
    """Steps ``k < j`` are drawn in ``[pair_min, pair_max)``; 0 means ``num_steps``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        lo, hi = self.pair_range
        if not 0 <= lo < hi - 1 or hi > self.num_steps:
            raise ValueError(
                f"leapalign.pair_min / pair_max must leave two steps in [0, {self.num_steps}), got "
                f"[{self.pair_min}, {self.pair_max})"
            )

    @property
    def pair_range(self) -> tuple[int, int]:
        return self.pair_min, self.pair_max or self.num_steps

    def draw_pair(self, generator: torch.Generator | None = None) -> tuple[int, int]:
        """Two distinct steps ``k < j``, uniform over the pairs of the range."""
        lo, hi = self.pair_range
        k, j = sorted((lo + torch.randperm(hi - lo, generator=generator)[:2]).tolist())
        return k, j

    def describe(self) -> str:
        return f"two leaps (alpha {self.alpha}) inside {self.num_steps} Euler steps"


def leapalign_loss(reward_fn: RewardFn, cfg: LeapAlignConfig) -> MicroBatchLoss:
    """Per micro-batch: the consistency-weighted mean of the reward loss on the (connected) real samples."""

    def loss_fn(policy: FlowPolicy, cond: Conditioning, metadata: list[dict], generator: Gen, choices: Gen):
        k, j = cfg.draw_pair(choices)
        velocity = bind_velocity(policy, cond, cfg.guidance_scale, cfg.checkpointing)
        sigmas = policy.schedule(cfg.num_steps, cfg.shift)
        x = policy.noise(len(cond), generator, float(sigmas[0]))
        out = leap_rollout(velocity, x, sigmas, k, j, alpha=cfg.alpha, tau=cfg.tau)
        reward = reward_fn(policy.decode(out.x0), cond.prompts, metadata)
        loss = (out.weight * reward_loss(reward.scores, cfg.hinge)).mean()
        extra = {"d_j": out.d_j.mean(), "d_0": out.d_0.mean(), "weight": out.weight.mean(), "k": k, "j": j}
        return loss, out.x0.detach(), reward, extra

    return loss_fn


register_direct("leapalign", LeapAlignConfig, leapalign_loss)
