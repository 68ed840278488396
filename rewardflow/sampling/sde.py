"""Stochastic steps with Gaussian transitions, their log-probabilities and the KL between two of them.

Flow-GRPO's reverse SDE (Liu et al. 2025, arXiv 2505.05470, eq. 8-9) has the marginals of the
probability-flow ODE of a rectified flow ``x_sigma = (1 - sigma) x0 + sigma eps``:

    dx = [v - (g^2 / 2) * score] dsigma + g dW,      score = -(x + (1 - sigma) v) / sigma,
    g  = a * sqrt(sigma / (1 - sigma))                (a = noise_level)

One Euler-Maruyama step from ``sigma`` to ``sigma_next`` (``dt = sigma - sigma_next > 0``) is Gaussian:

    mean = x (1 - g^2 dt / (2 sigma)) - dt v (1 + g^2 (1 - sigma) / (2 sigma)),   std = g sqrt(dt)

At ``sigma = 1`` the ``1 - sigma`` under the root is replaced by ``1 - sigma_next`` (as in the official
code) so the first step is finite. DanceGRPO's step (:func:`dance_sde_step`) is the same step with a constant
``g = eta``; :func:`cps_step` is coefficients-preserving sampling, another Gaussian transition. All arithmetic
here is float32 whatever the input dtype: in bf16 the ``1/std^2`` term overflows.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, TypedDict

import torch

from rewardflow.sampling.ode import as_sigma
from rewardflow.types import StepOutput

if TYPE_CHECKING:  # annotations only
    from typing_extensions import Unpack

Reduction = Literal["mean", "sum"]
KLForm = Literal["code", "paper"]


class Draw(TypedDict, total=False):
    """How a step obtains and scores its next latent (keyword arguments of every step function)."""

    x_next: torch.Tensor | None
    """When given, this latent is scored instead of sampling a new one (rollout re-evaluation)."""
    generator: torch.Generator | None
    """For the Gaussian noise when sampling."""
    reduction: Reduction
    """"mean" (default) or "sum" of the per-element log-density."""


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: Reduction = "mean"
) -> torch.Tensor:
    """Per-sample log-density of ``x`` under ``N(mean, std^2 I)`` [B], reduced over non-batch dims.

    ``reduction="mean"`` (Flow-GRPO's convention) averages the per-element log-densities, which keeps
    ratios ``exp(delta log p)`` near 1 for large latents; ``"sum"`` is the true joint log-density. Rows with
    ``std == 0`` (deterministic steps) get 0.
    """
    x, mean = x.float(), mean.float()
    std = std.float().view(-1, *([1] * (x.ndim - 1))).expand_as(x)
    safe = torch.where(std > 0, std, torch.ones_like(std))
    per_elem = -((x.detach() - mean) ** 2) / (2 * safe**2) - torch.log(safe) - 0.5 * math.log(2 * math.pi)
    per_elem = torch.where(std > 0, per_elem, torch.zeros_like(per_elem))
    dims = tuple(range(1, x.ndim))
    return per_elem.mean(dim=dims) if reduction == "mean" else per_elem.sum(dim=dims)


def flow_grpo_g(sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    """Diffusion coefficient ``a * sqrt(sigma / (1 - sigma~))`` with ``sigma~ = sigma_next`` where sigma == 1."""
    denom_sigma = torch.where(sigma >= 1.0, sigma_next, sigma)
    return float(noise_level) * torch.sqrt(sigma / (1.0 - denom_sigma))


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float,
    **draw: Unpack[Draw],
) -> StepOutput:
    """One step of Flow-GRPO's SDE (see the module docstring for the formulas).

    Args:
        x: latents at ``sigma`` [B, ...].
        v: the model's velocity at (x, sigma) [B, ...]; gradients flow through the mean.
        sigma: current noise level, a float or a per-sample tensor [B].
        sigma_next: next noise level (``< sigma``), a float or a tensor [B].
        noise_level: ``a``; 0 gives the Euler ODE step (and log-prob 0).
        draw: :class:`Draw` (``x_next`` to score instead of sampling, ``generator``, ``reduction``).
    """
    s, sn = as_sigma(sigma, x), as_sigma(sigma_next, x)
    return _gaussian_step(x, v, s, sn, flow_grpo_g(s, sn, noise_level), draw)


def dance_sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    eta: float,
    **draw: Unpack[Draw],
) -> StepOutput:
    """One step of DanceGRPO's SDE: the same reverse SDE with a constant diffusion coefficient ``g = eta``.

    DanceGRPO writes it as ``mean = x - dt v + (eta^2 / 2) dt score`` with ``score = -(x - (1 - sigma) x0_pred) /
    sigma^2`` and ``x0_pred = x - sigma v``, which is the same score as above; ``std = eta sqrt(dt)``. Arguments
    as for :func:`sde_step`, with ``eta`` in place of ``noise_level`` (0 gives the Euler step).
    """
    s, sn = as_sigma(sigma, x), as_sigma(sigma_next, x)
    return _gaussian_step(x, v, s, sn, torch.full_like(s, float(eta)), draw)


def cps_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float,
    **draw: Unpack[Draw],
) -> StepOutput:
    """One coefficients-preserving sampling (CPS) step (arXiv 2509.05952).

    With the model's predictions ``x0 = x - sigma v`` and ``eps = x + (1 - sigma) v``, the next latent keeps
    the coefficients of a clean rectified-flow point, ``(1 - sigma_next) x0 + sigma_next eps'``, by splitting
    the noise into a predicted part and a fresh part of std ``s = sigma_next sin(a pi / 2)``::

        mean = (1 - sigma_next) x0 + sqrt(sigma_next^2 - s^2) eps,   x_next = mean + s xi

    ``a = 0`` is the Euler step, ``a = 1`` replaces all predicted noise by fresh noise. The step is exact when the
    predictions are (data at one point); unlike the SDE steps its fresh noise does not shrink with the step size,
    so with posterior-mean predictions of spread-out data the samples come out narrower than the flow's
    marginals (on a 1-D Gaussian flow, 10 steps at a = 0.8: std 0.34 against 0.45). The log-probability is
    the true Gaussian one with std ``s`` (Flow-GRPO's code keeps only ``-mean (x_next - mean)^2``, which drops
    the ``1 / (2 s^2)`` scale; its configs use a 10x smaller clip range to compensate).
    """
    s, sn = as_sigma(sigma, x), as_sigma(sigma_next, x)
    x32, v32 = x.float(), v.float()
    std = sn * math.sin(float(noise_level) * math.pi / 2)
    x0, eps = x32 - s * v32, x32 + (1 - s) * v32
    mean = (1 - sn) * x0 + torch.sqrt((sn**2 - std**2).clamp(min=0.0)) * eps
    return _sample_and_score(x, mean, std, **draw)


def _gaussian_step(x: torch.Tensor, v: torch.Tensor, s: torch.Tensor, sn: torch.Tensor, g: torch.Tensor,
                   draw: Draw) -> StepOutput:  # fmt: skip
    """The Euler-Maruyama step of the reverse SDE with diffusion coefficient ``g`` (shaped like ``s``)."""
    dt = s - sn
    x32, v32 = x.float(), v.float()
    mean = x32 * (1 - g**2 * dt / (2 * s)) - dt * v32 * (1 + g**2 * (1 - s) / (2 * s))
    return _sample_and_score(x, mean, g * torch.sqrt(dt), **draw)


def _sample_and_score(
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    x_next: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: Reduction = "mean",
) -> StepOutput:
    """Draw ``x_next ~ N(mean, std^2)`` (unless given) and score it; ``std`` is [B] or broadcastable as [B, 1, ...]."""
    std_b = std.reshape(-1, *([1] * (mean.ndim - 1)))
    if x_next is None:
        # Draw on the generator's device (a CPU generator can drive a GPU run), then move.
        gen_device = generator.device if generator is not None else x.device
        xi = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=torch.float32).to(x.device)
        x_next = (mean + std_b * xi).detach()
    x_next = x_next.float()
    std = std_b.view(-1)
    return StepOutput(x_next=x_next, mean=mean, std=std, log_prob=gaussian_log_prob(x_next, mean, std, reduction))


def kl_code(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor, dt: torch.Tensor | float) -> torch.Tensor:
    """KL as in Flow-GRPO's code: ``mean_dims (mean - mean_ref)^2 / (2 g^2)`` per sample [B], ``g^2 = std^2 / dt``.

    It leaves out the ``dt`` of the exact Gaussian KL and averages over elements, so late (small-dt) steps
    weigh as much as early ones.
    """
    diff = (mean.float() - mean_ref.float()) ** 2
    g2 = (std.float() ** 2 / torch.as_tensor(dt, dtype=torch.float32, device=std.device)).view(
        -1, *([1] * (diff.ndim - 1))
    )
    return (diff / (2 * g2)).mean(dim=tuple(range(1, diff.ndim)))


def kl_paper(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Exact KL of ``N(mean, std^2 I)`` from ``N(mean_ref, std^2 I)``: ``|mean - mean_ref|^2 / (2 std^2)`` [B]."""
    diff = (mean.float() - mean_ref.float()) ** 2
    var = (std.float() ** 2).view(-1, *([1] * (diff.ndim - 1)))
    return (diff / (2 * var)).sum(dim=tuple(range(1, diff.ndim)))


def transition_kl(
    mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor, dt: torch.Tensor | float, form: KLForm
) -> torch.Tensor:
    """Per-sample KL between two same-variance Gaussian transitions, in the named form ("code" or "paper")."""
    if form == "code":
        return kl_code(mean, mean_ref, std, dt)
    if form == "paper":
        return kl_paper(mean, mean_ref, std)
    raise ValueError(f"kl form {form!r} is not one of 'code', 'paper'")


STEPS = {"flow": sde_step, "dance": dance_sde_step, "cps": cps_step}
"""The stochastic steps by the name ``grpo.sde_type`` gives them."""
