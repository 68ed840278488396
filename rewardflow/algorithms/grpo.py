"""Flow-GRPO: online policy gradient for flow-matching models through an SDE sampler.

Paper: Liu et al., "Flow-GRPO: Training Flow Matching Models via Online RL", arXiv 2505.05470 (NeurIPS
2025); official code yifan123/flow_grpo (formulas checked against that code).

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
- Samples with zero advantage are kept by default, so they still feed the KL; ``drop_zero_advantage`` drops them
  as the official code does, adding a few back so the rest fills whole micro-batches (the official code: so the
  count splits into its batches).
- The KL form (code: no ``dt``, mean over elements; paper: exact Gaussian KL) is the named option
  ``kl_form``, default "code" as in the official configs' beta values. ``kl_every`` (ours; default 1, every forward
  as in the paper) computes the KL term in one of every ``kl_every`` training forwards, weighted by ``kl_every``, so
  the reference network runs that much less; the Shapes demo uses 4.
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
layout-setting ones by 10-30x (measured on the tiny DiT: ``docs/results.md`` at 7635c1f). The KL term is unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rewardflow.algorithms import batching
from rewardflow.algorithms.base import Batch, StepResult, Tools, register
from rewardflow.algorithms.grpo_config import GRPOConfig, trained_step_count
from rewardflow.algorithms.online import check_online, own_advantages, roll_out_and_score
from rewardflow.models.protocol import Conditioning, FlowPolicy
from rewardflow.rewards.config import RewardConfig
from rewardflow.rewards.protocol import RewardFn
from rewardflow.sampling.rollout import rollout
from rewardflow.sampling.sde import KLForm, Reduction, transition_kl
from rewardflow.types import StepOutput
from rewardflow.utils import distributed


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
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    weights: torch.Tensor | None = None,
    reward_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate ``mean w max(-A rho, -A clip(rho, 1-eps, 1+eps))`` and diagnostics.

    Args:
        log_ratio: [B] ``log rho`` (with gradient): ``log p_theta - log p_old``, or GRPO-Guard's
            :func:`guard_log_ratio`.
        advantages: [B], or [B, K]: K rewards' own advantages, each in its own clipped term, the terms summed with
            ``reward_weights`` [K] (``reward.aggregate`` "loss": DanceGRPO's several rewards).
        clip_range: ``eps``.
        weights: [B] per-row weights ``w`` of the terms (GRPO-Guard's ``1 / dt``); None is 1.
        reward_weights: [K], with [B, K] advantages: each reward's weight on its clipped term.

    Returns:
        The scalar loss and a dict with ``ratio`` [B], ``clipped`` [B] (1 where |rho - 1| > eps) and
        ``approx_kl`` (0.5 * mean (log rho)^2).
    """
    delta = log_ratio
    ratio = torch.exp(delta)
    r = ratio if advantages.ndim == 1 else ratio[:, None]
    unclipped = -advantages * r
    clipped = -advantages * torch.clamp(r, 1.0 - clip_range, 1.0 + clip_range)
    terms = torch.maximum(unclipped, clipped)
    if advantages.ndim == 2:
        if reward_weights is None or reward_weights.shape != advantages.shape[1:]:
            raise ValueError(f"advantages of K = {advantages.shape[1]} rewards need reward_weights [K]")
        terms = terms @ reward_weights.to(terms)
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
    generator: batching.Random = None,
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
    sigmas = policy.schedule(cfg.num_steps, cfg.shift)
    levels = cfg.draw_noise_levels(batching.shared_generator(generator, "window"), iteration)
    x_init = None
    if cfg.same_initial_noise:
        if group_ids is None:
            raise ValueError("grpo.same_initial_noise needs the rows' group ids")
        groups, inverse = torch.unique(group_ids, return_inverse=True)
        if isinstance(
            generator, batching.KeyedRandom
        ):  # a group's noise is the same on every rank that holds its rows
            start = float(sigmas[0])
            x_init = torch.cat([policy.noise(1, generator.shared("group-noise", int(g)), start) for g in groups])
        else:
            x_init = policy.noise(len(groups), generator, float(sigmas[0]))
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
                generator=batching.rows_generator(generator, "rollout", start),
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
    out = cfg.step(x, policy.velocity(x, s, cond, cfg.guidance_scale), s, sn, a, x_next=x_next)
    kl = None
    if need_reference:
        with torch.no_grad(), policy.reference():
            v_ref = policy.velocity(x, s, cond, cfg.guidance_scale)
        ref = cfg.step(x, v_ref, s, sn, a, x_next=x_next)
        form: KLForm = cfg.kl_form
        kl = transition_kl(out.mean, ref.mean, out.std, s - sn, form)
    return out, kl


def rows_with_signal(advantages: torch.Tensor, micro_batch: int) -> torch.Tensor:
    """The rows ``drop_zero_advantage`` trains, in row order (none when every advantage is 0).

    Those whose advantage is not 0, topped up with the first zero-advantage rows to a whole number of micro-batches.
    As the official Flow-GRPO code adds dropped samples back so that its count splits evenly, the top-up keeps every
    training forward at the rollout's batch shape (a compiled network would build new code for a short one); the
    added rows carry only their KL term.
    """
    nonzero = advantages != 0
    if not bool(nonzero.any()):
        return torch.zeros(0, dtype=torch.long)
    top_up = torch.nonzero(~nonzero).flatten()[: -int(nonzero.sum()) % micro_batch]
    keep = torch.cat([torch.nonzero(nonzero).flatten(), top_up])
    return keep.sort().values.cpu()


def train_step(
    policy: FlowPolicy,
    optimizer: torch.optim.Optimizer,
    batch: GRPOBatch,
    advantages: torch.Tensor,
    cfg: GRPOConfig,
    after_optimizer_step: Callable[[], None] | None = None,
    generator: batching.Random = None,
    reward_weights: torch.Tensor | None = None,
) -> dict[str, float]:
    """One iteration's update: every micro-batch, its trained steps in time order.

    ``advantages`` [N], or [N, K] with ``reward_weights`` [K] for one clipped loss per reward
    (:func:`clipped_policy_loss`).

    Each row trains all SDE steps, or with ``cfg.timestep_fraction < 1`` its own random subset of
    ``cfg.steps_per_sample`` of them drawn from ``generator`` (the k-th forward of a micro-batch takes
    each row's k-th drawn step). Any number of rows is accepted (:func:`micro_batches`: the last micro-batch may
    be short). Each (micro-batch, step) loss is scaled so that each optimizer step sees the mean over its rows
    and steps (with ``cfg.guard``, of GRPO-Guard's terms, each weighted by ``1 / dt``). ``after_optimizer_step`` runs
    after every ``optimizer.step()`` (the loop folds its EMA in there).
    """
    n = batch.xs.shape[0]
    if advantages.shape[:1] != (n,) or advantages.ndim > 2:
        raise ValueError(f"advantages must be [{n}] or [{n}, K] (rows of the batch), got {tuple(advantages.shape)}")
    all_steps = batch.trained_steps
    n_steps = trained_step_count(cfg.timestep_fraction, len(all_steps))
    plan = batching.micro_batches(n, cfg.micro_batch, cfg.optimizer_steps)
    # Summed as tensors and read once at the end: no host-device sync per step on a GPU.
    names = ("policy_loss", "clip_frac", "approx_kl", "ratio_dev")
    sums: dict[str, torch.Tensor | float] = dict.fromkeys(names, 0.0)
    kl_sum, kl_terms = 0.0, 0  # over the forwards that compute the KL (every one unless kl_every > 1)
    grad_norms = []
    optimizer.zero_grad(set_to_none=True)
    finite: torch.Tensor | bool = True  # every loss of the optimizer step so far
    for m, (rows, share, _, ends_step) in enumerate(plan):
        adv = advantages[rows].float()
        b = torch.arange(len(adv))
        steps = torch.tensor(all_steps).expand(len(adv), -1)
        if n_steps < len(all_steps):  # each row's own subset: argsort of uniform keys is a random permutation
            keys = torch.rand(steps.shape, generator=batching.rows_generator(generator, "train-steps", rows.start))
            steps = steps.gather(1, keys.argsort(dim=1)[:, :n_steps].sort(dim=1).values)
        for k in range(n_steps):
            j = steps[:, k]
            with_kl = cfg.kl_beta > 0 and (m + k) % cfg.kl_every == 0
            out, kl = step_terms(policy, batch, rows, j, cfg, need_reference=with_kl)
            jd = j.to(batch.log_probs.device)
            if cfg.guard:
                log_ratio = guard_log_ratio(out, batch.means[rows][b, jd])
                weights = 1.0 / (batch.sigmas[j] - batch.sigmas[j + 1]).to(log_ratio.device)
            else:
                log_ratio, weights = out.log_prob - batch.log_probs[rows][b, jd], None
            pg, info = clipped_policy_loss(log_ratio, adv, cfg.clip_range, weights, reward_weights)
            loss = pg + (cfg.kl_beta * cfg.kl_every * kl.mean() if kl is not None else 0.0)
            (loss / (share * n_steps)).backward()
            finite = finite & torch.isfinite(loss.detach())
            sums["policy_loss"] += pg.detach()
            if kl is not None:
                kl_sum, kl_terms = kl_sum + kl.detach().mean(), kl_terms + 1
            sums["clip_frac"] += info["clipped"].mean()
            sums["approx_kl"] += info["approx_kl"]
            sums["ratio_dev"] += (info["ratio"] - 1.0).abs().max()
        if ends_step:
            grad_norms.append(batching.optimizer_step(optimizer, cfg.grad_clip, after_optimizer_step, finite))
            finite = True
    metrics = batching.mean_metrics(sums, len(plan) * n_steps, grad_norms)
    metrics["kl"] = float(kl_sum) / max(kl_terms, 1)
    return metrics


@register("grpo", GRPOConfig)
class FlowGRPO:
    """The Flow-GRPO family as the loop runs it: SDE rollouts, group advantages, the clipped update."""

    monitored = False

    def __init__(self, cfg: GRPOConfig) -> None:
        self.cfg, self.needs_reference = cfg, cfg.kl_beta > 0  # the KL term evaluates the reference

    def check(self, prompts_per_iter: int, group_size: int, reward: RewardConfig) -> None:
        check_online(self.cfg, prompts_per_iter, group_size, reward, "grpo", ("reward", "advantage", "loss"))
        k = self.cfg.best_worst_k
        if k:
            if k > group_size:
                raise ValueError(f"grpo.best_worst_k ({k}) must be at most group_size ({group_size})")
            try:
                self.cfg.check_batch(prompts_per_iter * k)
            except ValueError as e:
                raise ValueError(f"with grpo.best_worst_k = {k}, {prompts_per_iter * k} rows are trained: {e}") from e

    def check_world(self, world_size: int) -> None:
        for name in ("best_worst_k", "drop_zero_advantage"):
            if world_size > 1 and getattr(self.cfg, name):
                raise ValueError(f"grpo.{name} keeps a different number of rows per rank: use it with one process")

    def describe(self) -> str:
        a = self.cfg
        lo, hi = a.window_bounds
        if not a.sde_window:
            where = "all but the last"
        elif a.sde_window == hi - lo:  # one place: the window is fixed
            where = f"steps {lo}..{hi - 1}"
        else:
            where = f"a {a.window_schedule} window of {a.sde_window} in steps {lo}..{hi - 1}"
        return (
            f"{a.sde_type} SDE on {where} of {a.num_steps} steps, {a.steps_per_sample} of its "
            f"{a.sde_steps} SDE steps trained per sample" + (", GRPO-Guard objective" if a.guard else "")
        )

    def prepare(self, policy: FlowPolicy) -> None:
        """Nothing to set up: any policy will do."""

    def check_reward(self, reward_fn: RewardFn) -> None:
        """Any reward: only its scores are used."""

    def step(self, tools: Tools, batch: Batch) -> StepResult:
        cfg, policy, layout = self.cfg, tools.policy, batch.layout
        own_groups = layout.group_ids[layout.own]

        def rollout_scored_by(on_chunk: Callable[[slice, torch.Tensor], None]) -> GRPOBatch:
            return collect(policy, batch.cond, cfg, batch.random, own_groups, batch.iteration, on_chunk)

        scored = roll_out_and_score(tools, batch, rollout_scored_by)
        rollout, images, reward, metrics = scored.rollout, scored.images, scored.reward, scored.metrics
        if not scored.finite:
            return StepResult(images, reward, {**metrics, "skipped_steps": float(cfg.optimizer_steps)})
        adv = own_advantages(tools, batch, reward, cfg.global_std, cfg.adv_clip_max, eps=cfg.adv_eps,
                             unbiased=cfg.std_unbiased)  # fmt: skip
        t1 = time.time()
        # One clipped loss per reward ([N, K] advantages): rows are chosen by their weighted sum.
        weights = dict(zip(tools.reward.names, tools.reward.resolved_weights))
        reward_weights = torch.tensor([weights[n] for n in reward.components]) if adv.ndim == 2 else None
        combined = adv if reward_weights is None else adv @ reward_weights
        # best_worst_k and drop_zero_advantage: one process only (check_world), so the kept rows are its own.
        if cfg.best_worst_k:
            keep = best_worst_rows(combined, own_groups, cfg.best_worst_k)
            rollout, adv, combined = rollout.select(keep), adv[keep], combined[keep]
        if cfg.drop_zero_advantage:
            # A row carries signal when any of its rewards' advantages is not 0 (their sum may be).
            signal = combined if adv.ndim == 1 else adv.abs().amax(dim=1)
            keep = rows_with_signal(signal, cfg.micro_batch)
            metrics["trained_rows"] = len(keep) / len(adv)
            if not len(keep):  # every group scored alike: nothing to learn from, and no failure either
                return StepResult(images, reward, metrics)
            rollout, adv = rollout.select(keep), adv[keep]
        update = train_step(policy, tools.optimizer, rollout, adv.to(policy.device), cfg, tools.ema.step,
                            generator=batch.random, reward_weights=reward_weights)  # fmt: skip
        update = distributed.mean_over_ranks(update)
        return StepResult(images, reward, {**update, **metrics, "time_train": time.time() - t1})

    def state(self, policy: FlowPolicy) -> dict[str, dict[str, torch.Tensor]]:
        return {}

    def load_state(self, policy: FlowPolicy, state: dict, path: str) -> None:
        """Nothing beyond the trained weights, optimizer and EMA."""
