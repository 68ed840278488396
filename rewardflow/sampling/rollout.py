"""``rollout``: drive a step function over a schedule and record the trajectory."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from rewardflow.models.protocol import Conditioning, FlowPolicy
from rewardflow.sampling.sde import sde_step
from rewardflow.types import StepOutput, Trajectory


def rollout(
    policy: FlowPolicy,
    cond: Conditioning,
    sigmas: torch.Tensor,
    noise_levels: Sequence[float] | torch.Tensor,
    *,
    guidance_scale: float = 1.0,
    x_init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    step: Callable[..., StepOutput] = sde_step,
    keep_means: bool = False,
) -> Trajectory:
    """Sample ``len(cond)`` images along ``sigmas`` with an SDE step (Flow-GRPO's by default).

    Steps whose noise level is 0 are Euler ODE steps, so the same call gives an ODE sample
    (all zeros), a full SDE rollout, or a window of SDE steps inside an ODE trajectory.

    Args:
        policy: the model.
        cond: encoded prompts, one row per image.
        sigmas: the grid [T+1], down to 0 (``policy.schedule``).
        noise_levels: SDE noise level ``a`` for each of the T steps.
        guidance_scale: classifier-free guidance applied to every velocity.
        x_init: initial noise [B, ...]; drawn from ``policy.noise`` with ``generator`` when None.
        generator: source of the initial noise and of every SDE step's noise.
        step: ``sde_step`` or ``dance_sde_step`` (the noise level is its 5th argument).
        keep_means: also keep every step's transition mean (GRPO-Guard's ratio needs the rollout's means).

    Returns:
        The trajectory: latents (float32) [B, T+1, ...], log-probs [B, T], sigmas and noise levels (and the
        means [B, T, ...] with ``keep_means``).
    """
    levels = torch.as_tensor(noise_levels, dtype=torch.float32)
    if levels.shape != (len(sigmas) - 1,):
        raise ValueError(f"noise_levels must have one entry per step ({len(sigmas) - 1}), got {tuple(levels.shape)}")
    x = policy.noise(len(cond), generator, float(sigmas[0])) if x_init is None else x_init
    xs, log_probs, means = [x.float()], [], []
    for i in range(len(sigmas) - 1):
        v = policy.velocity(x, sigmas[i], cond, guidance_scale)
        out = step(x, v, sigmas[i], sigmas[i + 1], float(levels[i]), generator=generator)
        x = out.x_next
        xs.append(x)
        log_probs.append(out.log_prob)
        if keep_means:
            means.append(out.mean.detach())
    return Trajectory(
        xs=torch.stack(xs, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        sigmas=sigmas,
        noise_levels=levels,
        means=torch.stack(means, dim=1) if keep_means else None,
    )
