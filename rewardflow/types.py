"""Dataclasses passed between the sampler, the algorithms, the rewards and the loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class StepOutput:
    """One sampler step from ``sigma`` to ``sigma_next``.

    Attributes:
        x_next: the next latent [B, ...] (sampled, or the one given to be scored).
        mean: the transition mean [B, ...] (float32; depends on the model through ``v``).
        std: the transition standard deviation, [B] broadcastable as [B, 1, ...] (0 for a deterministic step).
        log_prob: log-density of ``x_next`` under the transition, one value per sample [B] (float32); 0 where
            the step is deterministic.
    """

    x_next: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor


@dataclass
class Trajectory:
    """A sampling run over a schedule.

    Attributes:
        xs: latents [B, T+1, ...]; ``xs[:, 0]`` is the initial noise, ``xs[:, -1]`` the clean sample.
        log_probs: per-step log-probabilities [B, T] (0 for deterministic steps).
        sigmas: the schedule [T+1], decreasing from 1 to 0.
        noise_levels: the SDE noise level of each step [T] (0 = ODE step).
        means: the transition means [B, T, ...] (float32), when the rollout was asked to keep them.
    """

    xs: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    noise_levels: torch.Tensor
    means: torch.Tensor | None = None

    @property
    def final(self) -> torch.Tensor:
        return self.xs[:, -1]


@dataclass
class RewardOutput:
    """Scores of a batch: ``scores`` [B] float32, plus per-image details (e.g. pass/fail flags) by name.

    ``components`` holds, for a combination of rewards, each reward's own (unweighted) scores [B] by name.
    """

    scores: torch.Tensor
    details: dict[str, torch.Tensor] = field(default_factory=dict)
    components: dict[str, torch.Tensor] = field(default_factory=dict)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> RewardOutput:
        """The same output with ``fn`` applied to the scores and to every detail and component."""
        return RewardOutput(fn(self.scores), {k: fn(v) for k, v in self.details.items()},
                            {k: fn(v) for k, v in self.components.items()})  # fmt: skip

    @staticmethod
    def cat(outs: list[RewardOutput]) -> RewardOutput:
        """The outputs of consecutive chunks of a batch as one (detached), rows in order."""
        cat = lambda get: torch.cat([get(o).detach() for o in outs])  # noqa: E731
        return RewardOutput(
            cat(lambda o: o.scores),
            {k: cat(lambda o, k=k: o.details[k]) for k in outs[0].details},
            {k: cat(lambda o, k=k: o.components[k]) for k in outs[0].components},
        )
