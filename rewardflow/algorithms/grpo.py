"""Flow-GRPO: online policy gradient for flow-matching models through an SDE sampler.

Paper: Liu et al., "Flow-GRPO: Training Flow Matching Models via Online RL", arXiv 2505.05470 (NeurIPS
2025); official code yifan123/flow_grpo (formulas checked against the team's reference notes on that code).

Rollouts sample each prompt ``G`` times with the SDE of :mod:`rewardflow.sampling.sde` (same marginals as
the ODE), storing every latent and every step's Gaussian log-probability. Rewards become group-normalised
advantages ``A``. For each trained step ``j`` the loss is PPO's clipped surrogate plus a KL to the
reference policy::

    rho_j = exp(log p_theta(x_{j+1} | x_j) - log p_old(x_{j+1} | x_j))
    L     = mean_batch max(-A rho_j, -A clip(rho_j, 1 - eps, 1 + eps)) + beta * KL(p_theta || p_ref)_j

Denoising reduction: training rollouts use few steps (10), evaluation uses more deterministic ones (40).

Differences from the paper / official code, on purpose:

- The last transition is deterministic (Euler) in rollouts as well as untrained; in pixel space an SDE
  last step leaves visible noise (the official code samples it and only skips training it).
- Samples with zero advantage are kept (the official code drops them and re-pads); they still feed the KL.
- The KL form (code: no ``dt``, mean over elements; paper: exact Gaussian KL) is the named option
  ``kl_form``, default "code" as in the official configs' beta values.
- Flow-GRPO-Fast (``sde_window > 0``) draws one window per iteration for every row; the official code draws
  one per rollout call (per GPU batch).

The rest of the family is configuration of the same loop:

- DanceGRPO: ``sde_type="dance"`` (constant ``g = eta``), ``same_initial_noise``, ``timestep_fraction`` (a
  random subset of the SDE steps per sample; each training forward then mixes timesteps across its rows),
  ``best_worst_k`` (train only the k/2 best and k/2 worst rows of each group), ``kl_beta=0``.
- MixGRPO: a window that moves over training, ``window_schedule`` "progressive" or "decay" (our reading of
  its ``GRPOTrainingStates``: the window stays ``window_iters`` iterations per position, moves by
  ``window_stride`` steps and rolls back to the start after the last position; "decay" shortens the stay
  linearly from ``window_iters`` to ``window_iters_min`` over one sweep).
- CPS: ``sde_type="cps"``, coefficients-preserving sampling (:func:`rewardflow.sampling.sde.cps_step`).

GRPO-Guard (Wang et al., "GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via Regulated
Clipping", arXiv 2510.22319), ``guard=True``, changes only the objective. With ``xi = (x_{j+1} - mu_old) / std``
the rollout's unit noise and ``d = mu_theta - mu_old`` the move of the transition mean since the rollout:

    log rho_hat = mean_dims(xi * d)  ( = std * (log p_theta - log p_old) + mean_dims(d^2) / (2 std) )
    L_j         = (1 / dt_j) * mean_batch max(-A rho_hat, -A clip(rho_hat, 1 - eps, 1 + eps))

RatioNorm removes the ``-|d|^2 / (2 std^2)`` term that pulls every ratio below 1 once the policy moves, and the
``std`` factor with the ``1 / dt`` weight gives every step the same gradient scale in velocity space: with the
plain ratio the gradient of a step scales as ``sqrt(dt) / g``, so the last, low-noise steps outweigh the first,
layout-setting ones by 10-30x (measured on the tiny DiT: ``docs/results.md``). The KL term is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from rewardflow.algorithms.batching import (
    KeyedRandom,
    Random,
    check_split,
    mean_metrics,
    micro_batches,
    optimizer_step,
    rows_generator,
    shared_generator,
)
from rewardflow.models.protocol import Conditioning, FlowPolicy
from rewardflow.sampling.rollout import rollout
from rewardflow.sampling.schedules import sd3_schedule
from rewardflow.sampling.sde import KLForm, Reduction, cps_step, dance_sde_step, sde_step, transition_kl
from rewardflow.types import StepOutput


@dataclass
class GRPOConfig:
    """Flow-GRPO settings (defaults: the paper's SD3.5 GenEval run, except where the tiny presets change them)."""

    num_steps: int = 10
    """Sampler steps in training rollouts (denoising reduction: evaluation uses more)."""
    shift: float = 3.0
    sigma_max: float = 1.0
    """The noisiest sigma of the grid (the shifted grid is scaled by it): 1 for flow models; a VP model's
    ``SD1Policy.sigma_max`` (its last training timestep, about 0.94 for SD 1.x)."""
    sde_type: Literal["flow", "dance", "cps"] = "flow"
    """The stochastic step of rollouts and training: Flow-GRPO's SDE (``g = a sqrt(sigma / (1 - sigma))``),
    DanceGRPO's constant ``g = eta``, or coefficients-preserving sampling (fresh-noise std
    ``sigma_next sin(a pi / 2)``); ``noise_level`` is ``a``, ``eta`` or the CPS ``a``."""
    noise_level: float = 0.7
    """``a`` (flow; the paper's ablation found 0.7 best for SD3.5), ``eta`` (dance; DanceGRPO uses 0.3) or the
    CPS ``a`` in (0, 1] (Flow-GRPO's README: 0.8)."""
    guidance_scale: float = 4.5
    """CFG scale in rollouts and in the training forward (1.0 = no CFG)."""
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    global_std: bool = True
    """Normalise advantages by the std of the whole batch (True) or of each group."""
    kl_beta: float = 0.04
    kl_form: Literal["code", "paper"] = "code"
    log_prob_reduction: Literal["mean", "sum"] = "mean"
    micro_batch: int = 32
    """Rows per rollout chunk and per training micro-batch (equal shapes keep the on-policy ratio exactly 1)."""
    optimizer_steps: int = 2
    """Optimizer steps per iteration (the rows are split into this many accumulation groups, in order)."""
    grad_clip: float = 1.0
    same_initial_noise: bool = False
    """DanceGRPO: every image of a group starts from the same initial noise (the SDE noise still differs), so
    the reward differences within a group come from the sampling path alone."""
    sde_window: int = 0
    """Flow-GRPO-Fast: the number W of consecutive SDE steps per rollout, at a random start in
    ``sde_window_range``; every other step is an ODE step and only the window is trained. 0: every step but the
    last is an SDE step (plain Flow-GRPO)."""
    sde_window_range: tuple[int, int] = (0, 0)
    """``(lo, hi)``: the window starts in ``lo .. hi - W``; ``hi = 0`` means ``num_steps - 1``."""
    window_schedule: Literal["random", "progressive", "decay"] = "random"
    """Where the window sits each iteration: a uniform random start (Flow-GRPO-Fast), or MixGRPO's sliding
    window moving from ``lo`` to ``hi - W`` over training ("progressive": ``window_iters`` iterations per
    position; "decay": the stay shrinks linearly to ``window_iters_min`` over one sweep)."""
    window_iters: int = 25
    """MixGRPO: iterations the window stays at one position (the first position, for "decay")."""
    window_iters_min: int = 1
    """MixGRPO "decay": iterations at the last position of a sweep."""
    window_stride: int = 1
    """MixGRPO: steps the window moves at a time."""
    timestep_fraction: float = 1.0
    """Fraction of the SDE steps trained, a random subset drawn for each sample (at least one step). Steps of
    one trajectory share its advantage, so training fewer steps of more trajectories buys more independent
    signal per unit of compute (Flow-GRPO's and DanceGRPO's ``timestep_fraction``; DanceGRPO uses 0.6)."""
    best_worst_k: int = 0
    """DanceGRPO's best-of-N selection: train only the ``k/2`` highest- and ``k/2`` lowest-advantage rows of
    each group (k even, at most the group size); 0 trains every row."""
    guard: bool = False
    """GRPO-Guard's objective (module docstring): the ratio re-centred on the rollout's transition mean (RatioNorm)
    and each step's term weighted by ``1 / dt`` so that every step's gradient has the same scale. Rollouts keep
    their transition means for it (as much memory again as the stored latents)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.sigma_max <= 1.0:
            raise ValueError(f"grpo.sigma_max must be in (0, 1], got {self.sigma_max}")
        if self.num_steps < 2:
            raise ValueError(f"grpo.num_steps must be >= 2 (the last step is never trained), got {self.num_steps}")
        if self.noise_level <= 0:
            raise ValueError(f"grpo.noise_level must be > 0 (0 makes every step an ODE step), got {self.noise_level}")
        for name in ("clip_range", "adv_clip_max", "kl_beta"):
            if getattr(self, name) < 0:
                raise ValueError(f"grpo.{name} must be >= 0, got {getattr(self, name)}")
        if self.micro_batch < 1 or self.optimizer_steps < 1:
            raise ValueError("grpo.micro_batch and grpo.optimizer_steps must be >= 1")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"grpo.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        lo, hi = self.window_bounds
        if self.sde_window < 0 or not 0 <= lo < hi <= self.num_steps - 1 or self.sde_window > hi - lo:
            raise ValueError(
                f"grpo.sde_window ({self.sde_window}) must fit in grpo.sde_window_range {self.sde_window_range} "
                f"(resolved to [{lo}, {hi})) within the {self.num_steps - 1} SDE steps of grpo.num_steps"
            )
        if self.sde_type not in ("flow", "dance", "cps"):
            raise ValueError(f"grpo.sde_type must be 'flow', 'dance' or 'cps', got {self.sde_type!r}")
        if self.sde_type == "cps" and self.noise_level > 1:
            raise ValueError(f"grpo.noise_level is the CPS a and must be in (0, 1], got {self.noise_level}")
        if self.window_schedule not in ("random", "progressive", "decay"):
            raise ValueError(
                f"grpo.window_schedule must be 'random', 'progressive' or 'decay', got {self.window_schedule!r}"
            )
        if self.window_stride < 1 or not 1 <= self.window_iters_min <= self.window_iters:
            raise ValueError(
                "grpo.window_stride must be >= 1 and 1 <= grpo.window_iters_min <= grpo.window_iters, got "
                f"{self.window_stride}, {self.window_iters_min}, {self.window_iters}"
            )
        if self.sde_type == "cps" and self.kl_form == "code" and self.kl_beta > 0:
            raise ValueError(
                "grpo.kl_form 'code' divides by g^2 = std^2 / dt, which CPS does not have (its noise does not scale "
                "with dt); use grpo.kl_form 'paper' with grpo.sde_type 'cps'"
            )
        if self.window_schedule != "random" and not self.sde_window:
            raise ValueError(f"grpo.window_schedule {self.window_schedule!r} needs a window (grpo.sde_window > 0)")
        if self.best_worst_k < 0 or self.best_worst_k % 2:
            raise ValueError(f"grpo.best_worst_k must be 0 or a positive even number, got {self.best_worst_k}")
        if self.kl_form not in ("code", "paper"):
            raise ValueError(f"grpo.kl_form must be 'code' or 'paper', got {self.kl_form!r}")

    def check_batch(self, rows: int) -> None:
        """Raise unless ``rows`` splits into micro-batches and those into optimizer steps."""
        check_split(rows, self.micro_batch, self.optimizer_steps, "grpo")

    @property
    def sde_steps(self) -> int:
        """SDE steps per rollout: the window, or every step but the last."""
        return self.sde_window or self.num_steps - 1

    @property
    def steps_per_sample(self) -> int:
        """How many of its SDE steps each sample trains (``timestep_fraction`` of them, at least one)."""
        return max(1, round(self.timestep_fraction * self.sde_steps))

    @property
    def window_bounds(self) -> tuple[int, int]:
        lo, hi = self.sde_window_range
        return lo, hi or self.num_steps - 1

    def window_start(self, iteration: int, generator: torch.Generator | None = None) -> int:
        """The first SDE step of the window at ``iteration`` (random, or MixGRPO's sliding schedule)."""
        lo, hi = self.window_bounds
        places = hi - self.sde_window - lo + 1
        if self.window_schedule == "random":
            # No draw when the window has one place: a window over all steps replays plain Flow-GRPO exactly.
            return lo + (int(torch.randint(places, (1,), generator=generator)) if places > 1 else 0)
        positions = (places - 1) // self.window_stride + 1
        if self.window_schedule == "progressive":
            stays = [self.window_iters] * positions
        else:
            span = self.window_iters - self.window_iters_min
            stays = [round(self.window_iters - span * p / max(1, positions - 1)) for p in range(positions)]
        t = iteration % sum(stays)  # after the last position the window rolls back to the first
        p = 0
        while t >= stays[p]:
            t -= stays[p]
            p += 1
        return lo + p * self.window_stride

    def draw_noise_levels(self, generator: torch.Generator | None = None, iteration: int = 0) -> torch.Tensor:
        """The noise level of each step for one rollout: with a window, SDE only in ``[start, start + W)``."""
        levels = self.noise_levels
        if self.sde_window:
            start = self.window_start(iteration, generator)
            levels[:start] = 0.0
            levels[start + self.sde_window :] = 0.0
        return levels

    @property
    def step(self) -> Callable[..., StepOutput]:
        return {"flow": sde_step, "dance": dance_sde_step, "cps": cps_step}[self.sde_type]

    @property
    def sigmas(self) -> torch.Tensor:
        return sd3_schedule(self.num_steps, self.shift) * self.sigma_max

    @property
    def noise_levels(self) -> torch.Tensor:
        """SDE on every step but the last, which is an Euler step."""
        levels = torch.full((self.num_steps,), float(self.noise_level))
        levels[-1] = 0.0
        return levels


@dataclass
class GRPOBatch:
    """What a rollout keeps for training: latents [N, T+1, ...], old log-probs [N, T], conditioning."""

    xs: torch.Tensor
    log_probs: torch.Tensor
    cond: Conditioning
    sigmas: torch.Tensor
    noise_levels: torch.Tensor
    means: torch.Tensor | None = None
    """The rollout's transition means [N, T, ...] (kept for ``GRPOConfig.guard`` only)."""

    @property
    def trained_steps(self) -> list[int]:
        return [j for j in range(len(self.noise_levels)) if self.noise_levels[j] > 0]

    def select(self, rows: torch.Tensor) -> GRPOBatch:
        """The batch restricted to ``rows`` (an index tensor [M])."""
        on = rows.to(self.xs.device)
        means = None if self.means is None else self.means[on]
        return GRPOBatch(self.xs[on], self.log_probs[on], self.cond.index(rows), self.sigmas, self.noise_levels, means)


def best_worst_rows(advantages: torch.Tensor, group_ids: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k/2`` highest- and ``k/2`` lowest-advantage rows of every group, in row order.

    DanceGRPO's best-of-N: training on the extremes of each group keeps the rows with the clearest signal.
    Ties break by row order. Raises when a group has fewer than ``k`` rows.
    """
    keep = []
    adv = advantages.detach().float().cpu()
    for g in torch.unique(group_ids):
        members = torch.nonzero(group_ids.cpu() == g).flatten()
        if len(members) < k:
            raise ValueError(f"grpo.best_worst_k ({k}) is larger than a group ({len(members)} rows)")
        order = members[torch.argsort(adv[members], descending=True, stable=True)]
        keep += [order[: k // 2], order[len(order) - k // 2 :]]
    return torch.cat(keep).sort().values


def clipped_policy_loss(
    log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate ``mean w max(-A rho, -A clip(rho, 1-eps, 1+eps))`` and diagnostics.

    Args:
        log_ratio: [B] ``log rho`` (with gradient): ``log p_theta - log p_old``, or GRPO-Guard's
            :func:`guard_log_ratio`.
        advantages: [B].
        clip_range: ``eps``.
        weights: [B] per-row weights ``w`` of the terms (GRPO-Guard's ``1 / dt``); None is 1.

    Returns:
        The scalar loss and a dict with ``ratio`` [B], ``clipped`` [B] (1 where |rho - 1| > eps) and
        ``approx_kl`` (0.5 * mean (log rho)^2).
    """
    delta = log_ratio
    ratio = torch.exp(delta)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    terms = torch.maximum(unclipped, clipped)
    loss = (terms if weights is None else weights * terms).mean()
    info = {
        "ratio": ratio.detach(),
        "clipped": ((ratio - 1.0).abs() > clip_range).float().detach(),
        "approx_kl": 0.5 * (delta.detach() ** 2).mean(),
    }
    return loss, info


def guard_log_ratio(out: StepOutput, old_mean: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """GRPO-Guard's normalised log-ratio ``reduce_dims(xi * (mean - old_mean))`` [B] (RatioNorm).

    ``xi = (x_next - old_mean) / std`` is the unit noise the rollout drew; ``out`` is the step re-scored with the
    current weights (its ``mean`` carries the gradient). It equals ``std * (log p - log p_old) + reduce_dims((mean
    - old_mean)^2) / (2 std)``: the log-ratio in the transition mean's units, without the ``-|d|^2`` term that
    makes every ratio fall below 1 as the policy moves. Exactly 0 where the mean has not moved.
    """
    std = out.std.float().view(-1, *([1] * (out.mean.ndim - 1)))
    old = old_mean.float()
    per_elem = (out.x_next.float() - old) / std * (out.mean.float() - old)
    dims = tuple(range(1, per_elem.ndim))
    return per_elem.mean(dim=dims) if reduction == "mean" else per_elem.sum(dim=dims)


@torch.no_grad()
def collect(
    policy: FlowPolicy,
    cond: Conditioning,
    cfg: GRPOConfig,
    generator: Random = None,
    group_ids: torch.Tensor | None = None,
    iteration: int = 0,
    on_chunk: Callable[[slice, torch.Tensor], None] | None = None,
) -> GRPOBatch:
    """Roll out every row of ``cond`` with the SDE, in chunks of ``cfg.micro_batch`` rows (one window for all).

    With ``cfg.same_initial_noise`` the rows of one group (``group_ids`` [N]) start from one shared noise.
    ``iteration`` places a MixGRPO sliding window. ``on_chunk(rows, x0)`` is called with each chunk's clean
    samples as soon as they exist (the loop starts scoring them while the next chunk samples). ``generator``:
    one generator drawn from in turn, or the loop's :class:`KeyedRandom` (the window from a stream every rank
    shares, each chunk's noise from the stream of its first row, a group's shared noise from its group id).
    """
    sigmas, levels = cfg.sigmas, cfg.draw_noise_levels(shared_generator(generator, "window"), iteration)
    x_init = None
    if cfg.same_initial_noise:
        if group_ids is None:
            raise ValueError("grpo.same_initial_noise needs the rows' group ids")
        groups, inverse = torch.unique(group_ids, return_inverse=True)
        if isinstance(generator, KeyedRandom):  # a group's noise is the same on every rank that holds its rows
            x_init = torch.cat([policy.noise(1, generator.shared("group-noise", int(g))) for g in groups])
        else:
            x_init = policy.noise(len(groups), generator)
        x_init = x_init[inverse.to(policy.device)]
    xs, lps, means = [], [], []
    with policy.sampling():
        for start in range(0, len(cond), cfg.micro_batch):
            rows = slice(start, start + cfg.micro_batch)
            traj = rollout(
                policy,
                cond.index(rows),
                sigmas,
                levels,
                guidance_scale=cfg.guidance_scale,
                generator=rows_generator(generator, "rollout", start),
                step=cfg.step,
                x_init=None if x_init is None else x_init[rows],
                keep_means=cfg.guard,
            )
            xs.append(traj.xs)
            lps.append(traj.log_probs)
            means.append(traj.means)
            if on_chunk is not None:
                on_chunk(slice(start, start + len(traj.xs)), traj.xs[:, -1])
    return GRPOBatch(torch.cat(xs), torch.cat(lps), cond, sigmas, levels, torch.cat(means) if cfg.guard else None)


def step_terms(
    policy: FlowPolicy,
    batch: GRPOBatch,
    rows: slice,
    j: int | torch.Tensor,
    cfg: GRPOConfig,
    need_reference: bool,
) -> tuple[StepOutput, torch.Tensor | None]:
    """Re-score stored step ``j`` of ``rows``: the step (``log_prob`` [B] and ``mean`` with grad), and the KL [B].

    ``j`` is one step for every row, or a [B] tensor of per-row steps (one forward at mixed timesteps).
    """
    cond = batch.cond.index(rows)
    xs = batch.xs[rows]
    jj = torch.as_tensor(j).expand(len(xs))
    b = torch.arange(len(xs))
    x, x_next = xs[b, jj], xs[b, jj + 1]
    s, sn = batch.sigmas[jj], batch.sigmas[jj + 1]
    a = float(batch.noise_levels[jj[0]])  # every trained step has the same noise level
    reduction: Reduction = cfg.log_prob_reduction
    out = cfg.step(x, policy.velocity(x, s, cond, cfg.guidance_scale), s, sn, a, x_next=x_next, reduction=reduction)
    kl = None
    if need_reference:
        with torch.no_grad(), policy.reference():
            v_ref = policy.velocity(x, s, cond, cfg.guidance_scale)
        ref = cfg.step(x, v_ref, s, sn, a, x_next=x_next, reduction=reduction)
        form: KLForm = cfg.kl_form
        kl = transition_kl(out.mean, ref.mean, out.std, s - sn, form)
    return out, kl


def train_step(
    policy: FlowPolicy,
    optimizer: torch.optim.Optimizer,
    batch: GRPOBatch,
    advantages: torch.Tensor,
    cfg: GRPOConfig,
    after_optimizer_step: Callable[[], None] | None = None,
    generator: Random = None,
) -> dict[str, float]:
    """One iteration's update: every micro-batch, its trained steps in time order.

    Each row trains all SDE steps, or with ``cfg.timestep_fraction < 1`` its own random subset of
    ``cfg.steps_per_sample`` of them drawn from ``generator`` (the k-th forward of a micro-batch takes
    each row's k-th drawn step). The loss of each (micro-batch, step) is divided by the number of terms
    accumulated per optimizer step, so each optimizer step sees the mean over its share of rows and steps
    (with ``cfg.guard``, of GRPO-Guard's terms, each weighted by ``1 / dt``). ``after_optimizer_step`` runs
    after every ``optimizer.step()`` (the loop folds its EMA in there).
    """
    n = batch.xs.shape[0]
    cfg.check_batch(n)
    if advantages.shape != (n,):
        raise ValueError(f"advantages must be [{n}] (one per row of the batch), got {tuple(advantages.shape)}")
    all_steps = batch.trained_steps
    n_steps = max(1, round(cfg.timestep_fraction * len(all_steps)))
    chunks, per_opt = micro_batches(n, cfg.micro_batch, cfg.optimizer_steps)
    # Summed as tensors and read once at the end: no host-device sync per step on a GPU.
    names = ("policy_loss", "kl", "clip_frac", "approx_kl", "ratio_dev")
    sums: dict[str, torch.Tensor | float] = dict.fromkeys(names, 0.0)
    grad_norms = []
    optimizer.zero_grad(set_to_none=True)
    for c, rows in enumerate(chunks):
        adv = advantages[rows].float()
        b = torch.arange(len(adv))
        steps = torch.tensor(all_steps).expand(len(adv), -1)
        if n_steps < len(all_steps):  # each row's own subset: argsort of uniform keys is a random permutation
            keys = torch.rand(steps.shape, generator=rows_generator(generator, "train-steps", rows.start))
            steps = steps.gather(1, keys.argsort(dim=1)[:, :n_steps].sort(dim=1).values)
        for k in range(n_steps):
            j = steps[:, k]
            out, kl = step_terms(policy, batch, rows, j, cfg, need_reference=cfg.kl_beta > 0)
            jd = j.to(batch.log_probs.device)
            if cfg.guard:
                log_ratio = guard_log_ratio(out, batch.means[rows][b, jd], cfg.log_prob_reduction)
                weights = 1.0 / (batch.sigmas[j] - batch.sigmas[j + 1]).to(log_ratio.device)
            else:
                log_ratio, weights = out.log_prob - batch.log_probs[rows][b, jd], None
            pg, info = clipped_policy_loss(log_ratio, adv, cfg.clip_range, weights)
            loss = pg + (cfg.kl_beta * kl.mean() if kl is not None else 0.0)
            (loss / (per_opt * n_steps)).backward()
            sums["policy_loss"] += pg.detach()
            sums["kl"] += kl.detach().mean() if kl is not None else 0.0
            sums["clip_frac"] += info["clipped"].mean()
            sums["approx_kl"] += info["approx_kl"]
            sums["ratio_dev"] += (info["ratio"] - 1.0).abs().max()
        if (c + 1) % per_opt == 0:
            grad_norms.append(optimizer_step(optimizer, cfg.grad_clip, after_optimizer_step))
    metrics = mean_metrics(sums, len(chunks) * n_steps, grad_norms)
    return metrics
