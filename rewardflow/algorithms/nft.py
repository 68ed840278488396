"""DiffusionNFT: likelihood-free online RL on the forward (noising) process.

Paper: Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process", arXiv 2509.16117;
official code NVlabs/DiffusionNFT (formulas checked against that code).

An "old" policy samples clean images with any deterministic solver; only ``x0`` and the sigma grid are kept.
Rewards become group-normalised advantages ``A`` (clipped to ``[-C, C]``) and then an optimality probability
``r = clip(A / (2C) + 1/2, 0, 1)``. For sigmas ``t`` of the grid and fresh noise, ``x_t = (1-t) x0 + t eps``,
and two implicit policies built from the trained velocity ``v`` are fitted by flow matching::

    v+ = beta v + (1 - beta) v_old          v- = (1 + beta) v_old - beta v
    L+- = mean_dims (x_t - t v+- - x0)^2 / sg(max(mean_dims |x_t - t v+- - x0|, 1e-5))   (adaptive weight)
    L   = C mean_batch (r L+ + (1 - r) L-) / beta  +  lambda mean (v - v_ref)^2

so that at the optimum ``v = v_old + (2 / beta) Delta``, the reward-guided direction. After every iteration
``theta_old <- eta theta_old + (1 - eta) theta`` with ``eta = min(max(0, k - k0) * rate, eta_max)``, ``k`` the
optimizer steps so far. No CFG anywhere by default: the guidance is learned into the model.

Differences from the official code, on purpose:

- The old policy of a tiny-DiT run is a frozen copy of the network (adapters included), not a second LoRA
  adapter; the soft update touches only the trainable weights, as the official code's does.
- The trained sigmas are drawn per image as in the official code (a random permutation of the grid, the first
  ``int(T * timestep_fraction)``), from the loop's generator so a resumed run draws the same ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch

from rewardflow.algorithms import batching
from rewardflow.algorithms.base import Batch, StepResult, Tools, register
from rewardflow.algorithms.online import check_online, own_advantages, roll_out_and_score
from rewardflow.models.protocol import Conditioning, FlowPolicy, OldPolicy
from rewardflow.rewards.config import RewardConfig
from rewardflow.rewards.protocol import RewardFn
from rewardflow.sampling.config import SamplerConfig
from rewardflow.sampling.ode import SOLVERS, solve_ode
from rewardflow.utils import distributed
from rewardflow.utils.checkpoint import IncompatibleState
from rewardflow.utils.configs import Count, Fraction, Guidance, Natural, NonNegative, Positive, Range

AdvMode = Literal["all", "positive_only", "negative_only", "one_only", "binary"]
ADV_MODES = ("all", "positive_only", "negative_only", "one_only", "binary")


@dataclass
class NFTConfig(SamplerConfig):
    """DiffusionNFT settings (defaults: the paper's SD3.5 GenEval run, except where the tiny presets change them).

    ``num_steps``, ``shift``: :class:`~rewardflow.sampling.config.SamplerConfig` (10 solver steps in rollouts).
    """

    SECTION = "nft"
    solver: str = "dpm2"
    """Deterministic rollout solver: "euler", "heun" or "dpm2" (2nd-order multistep DPM-Solver++, the paper's)."""
    guidance_scale: Guidance = 1.0
    """CFG scale in rollouts and training (1.0: CFG-free, the paper's setting)."""
    beta: Positive = 1.0
    """NFT's beta: how far the implicit policies sit from the old one (1.0 stable; 0.1 rises faster)."""
    adv_clip_max: Positive = 5.0
    """``C``: advantages are clipped to [-C, C], mapped to r = A / (2C) + 1/2, and the policy loss is scaled by C."""
    global_std: bool = True
    adv_mode: AdvMode = "all"
    """How advantages enter r: all; positive_only / negative_only (the other sign set to 0); one_only
    (A -> 1 if positive else 0); binary (A -> sign A)."""
    ref_weight: NonNegative = 1e-4
    """``lambda`` of the velocity penalty to the reference policy (0 skips the reference forward)."""
    timestep_fraction: Fraction = 0.99
    """Per image, the first ``int(T * fraction)`` (at least 1) of a random permutation of its T grid sigmas."""
    micro_batch: Count = 32
    """Rows per rollout chunk and per training micro-batch."""
    optimizer_steps: Count = 1
    """Optimizer steps per iteration (the official GenEval config: 1)."""
    grad_clip: Positive = 1.0
    """Gradient norm clipped to this before each optimizer step."""
    old_decay_start: Natural = 0
    """``k0`` of the old-policy schedule ``eta = min(max(0, k - k0) * rate, eta_max)``."""
    old_decay_rate: NonNegative = 0.001
    """``rate`` of the old-policy schedule: how fast the old policy starts lagging."""
    old_decay_max: Annotated[float, Range(0, 1, high_open=True)] = 0.5
    """``eta_max`` of the old-policy schedule: the most the old policy lags."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver not in SOLVERS:
            raise ValueError(f"nft.solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.adv_mode not in ADV_MODES:
            raise ValueError(f"nft.adv_mode must be one of {', '.join(ADV_MODES)}, got {self.adv_mode!r}")

    def check_batch(self, rows: int) -> None:
        """Raise unless ``rows`` splits into micro-batches and those into optimizer steps."""
        batching.check_split(rows, self.micro_batch, self.optimizer_steps, "nft")

    @property
    def sigmas_per_image(self) -> int:
        return max(1, int(self.num_steps * self.timestep_fraction))


def optimality_probability(advantages: torch.Tensor, clip_max: float, mode: AdvMode = "all") -> torch.Tensor:
    """``r = clip(A / (2C) + 1/2, 0, 1)`` [B] after clipping A to [-C, C] and applying ``mode``."""
    a = advantages.float().clamp(-clip_max, clip_max)
    if mode == "positive_only":
        a = a.clamp(min=0.0)
    elif mode == "negative_only":
        a = a.clamp(max=0.0)
    elif mode == "one_only":
        a = (a > 0).float()
    elif mode == "binary":
        a = torch.sign(a)
    return (a / (2.0 * clip_max) + 0.5).clamp(0.0, 1.0)


def old_decay(optimizer_steps: int, cfg: NFTConfig) -> float:
    """The old policy's soft-update coefficient ``eta = min(max(0, k - k0) * rate, eta_max)``."""
    return min(max(0, optimizer_steps - cfg.old_decay_start) * cfg.old_decay_rate, cfg.old_decay_max)


def adaptive_x0_loss(x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """``mean_dims (x0_pred - x0)^2 / sg(max(mean_dims |x0_pred - x0|, 1e-5))`` per sample [B].

    The self-normalising weight is computed in float64 and detached, as in the official code.
    """
    err = x0_pred.float() - x0.float()
    dims = tuple(range(1, err.ndim))
    weight = err.detach().double().abs().mean(dim=dims).clamp(min=1e-5)
    # The official code divides in float64; dividing by the weight rounded to float32 changes the loss by < 1e-7.
    return (err**2).mean(dim=dims) / weight.float()


def nft_policy_loss(
    v: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    r: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample NFT policy loss ``(r L+ + (1 - r) L-) / beta`` [B] and its two parts.

    Args:
        v: trained velocity at ``x_t`` [B, ...] (with gradient).
        v_old: old policy's velocity at ``x_t`` [B, ...] (no gradient).
        x_t: noised sample ``(1 - sigma) x0 + sigma eps`` [B, ...].
        x0: the clean rollout sample [B, ...].
        sigma: the noise level of each row [B].
        r: optimality probability [B] in [0, 1].
        beta: NFT's beta.
    """
    t = sigma.float().view(-1, *([1] * (x_t.ndim - 1)))
    v, v_old = v.float(), v_old.float()
    v_pos = beta * v + (1.0 - beta) * v_old
    v_neg = (1.0 + beta) * v_old - beta * v
    loss_pos = adaptive_x0_loss(x_t.float() - t * v_pos, x0)
    loss_neg = adaptive_x0_loss(x_t.float() - t * v_neg, x0)
    loss = (r * loss_pos + (1.0 - r) * loss_neg) / beta
    return loss, {"loss_pos": loss_pos.detach(), "loss_neg": loss_neg.detach()}


@dataclass
class NFTBatch:
    """What a rollout keeps: clean samples [N, ...], their conditioning, and the solver's sigma grid [T+1]."""

    x0: torch.Tensor
    cond: Conditioning
    sigmas: torch.Tensor


@torch.no_grad()
def collect(
    policy: FlowPolicy,
    cond: Conditioning,
    cfg: NFTConfig,
    generator: batching.Random = None,
    on_chunk: Callable[[slice, torch.Tensor], None] | None = None,
) -> NFTBatch:
    """Sample every row of ``cond`` with the old policy and ``cfg.solver``, in chunks of ``cfg.micro_batch``.

    ``on_chunk(rows, x0)`` is called with each chunk's samples as soon as they exist (see ``grpo.collect``).
    """
    sigmas = policy.schedule(cfg.num_steps, cfg.shift)
    outs = []
    with policy.old(), policy.sampling():
        for start in range(0, len(cond), cfg.micro_batch):
            chunk = cond.index(slice(start, start + cfg.micro_batch))
            x = policy.noise(len(chunk), batching.rows_generator(generator, "rollout", start), float(sigmas[0]))
            outs.append(
                solve_ode(lambda x, s, c=chunk: policy.velocity(x, s, c, cfg.guidance_scale), x, sigmas, cfg.solver)
            )
            if on_chunk is not None:
                on_chunk(slice(start, start + len(chunk)), outs[-1])
    return NFTBatch(torch.cat(outs), cond, sigmas)


def train_step(
    policy: FlowPolicy,
    optimizer: torch.optim.Optimizer,
    batch: NFTBatch,
    r: torch.Tensor,
    cfg: NFTConfig,
    after_optimizer_step: Callable[[], None] | None = None,
    generator: batching.Random = None,
) -> dict[str, float]:
    """One iteration's update over every micro-batch and ``cfg.sigmas_per_image`` grid sigmas per image.

    Each (micro-batch, sigma slot) term is divided by the number of terms per optimizer step, so an optimizer
    step sees the mean over its rows and slots. Noise and the sigma draws come from ``generator`` (CPU).
    """
    n = batch.x0.shape[0]
    cfg.check_batch(n)
    grid = batch.sigmas[:-1]  # the T sigmas the solver evaluated at (the final 0 is never trained)
    slots = min(cfg.sigmas_per_image, len(grid))
    plan = batching.micro_batches(n, cfg.micro_batch, cfg.optimizer_steps)
    names = ("policy_loss", "ref_loss", "loss_pos", "loss_neg")
    sums: dict[str, torch.Tensor | float] = dict.fromkeys(names, 0.0)
    grad_norms = []
    device = batch.x0.device
    optimizer.zero_grad(set_to_none=True)
    finite: torch.Tensor | bool = True  # every loss of the optimizer step so far
    for rows, share, _, ends_step in plan:
        x0, rr, cond = batch.x0[rows], r[rows].to(device).float(), batch.cond.index(rows)
        gen = batching.rows_generator(generator, "train", rows.start)
        # Draw on the generator's device (the loop's is a CPU generator: a seed gives the same draws everywhere).
        gen_device = gen.device if gen is not None else torch.device("cpu")
        b = x0.shape[0]
        order = torch.argsort(torch.rand(b, len(grid), generator=gen, device=gen_device), dim=1)[:, :slots]
        for j in range(slots):
            sigma = grid[order[:, j]].to(device)
            eps = torch.randn(x0.shape, generator=gen, device=gen_device, dtype=torch.float32).to(device)
            t = sigma.view(-1, *([1] * (x0.ndim - 1)))
            x_t = (1.0 - t) * x0 + t * eps
            v = policy.velocity(x_t, sigma, cond, cfg.guidance_scale)
            with torch.no_grad(), policy.old():
                v_old = policy.velocity(x_t, sigma, cond, cfg.guidance_scale)
            per_sample, info = nft_policy_loss(v, v_old, x_t, x0, sigma, rr, cfg.beta)
            loss = cfg.adv_clip_max * per_sample.mean()
            sums["policy_loss"] += loss.detach()
            if cfg.ref_weight > 0:
                with torch.no_grad(), policy.reference():
                    v_ref = policy.velocity(x_t, sigma, cond, cfg.guidance_scale)
                ref_loss = ((v - v_ref) ** 2).mean()
                loss = loss + cfg.ref_weight * ref_loss
                sums["ref_loss"] += ref_loss.detach()
            (loss / (share * slots)).backward()
            finite = finite & torch.isfinite(loss.detach())
            sums["loss_pos"] += info["loss_pos"].mean()
            sums["loss_neg"] += info["loss_neg"].mean()
        if ends_step:
            grad_norms.append(batching.optimizer_step(optimizer, cfg.grad_clip, after_optimizer_step, finite))
            finite = True
    metrics = batching.mean_metrics(sums, len(plan) * slots, grad_norms)
    metrics["r_mean"] = float(r.float().mean())
    return metrics


@register("nft", NFTConfig)
class DiffusionNFT:
    """DiffusionNFT as the loop runs it: old-policy rollouts, optimality probabilities, the forward-process update."""

    monitored = False

    def __init__(self, cfg: NFTConfig) -> None:
        self.cfg, self.needs_reference = cfg, cfg.ref_weight > 0  # the velocity penalty evaluates the reference

    def check(self, prompts_per_iter: int, group_size: int, reward: RewardConfig) -> None:
        check_online(self.cfg, prompts_per_iter, group_size, reward, "nft")

    def check_world(self, world_size: int) -> None:
        """Any number of processes."""

    def describe(self) -> str:
        a = self.cfg
        return f"{a.solver} rollouts of {a.num_steps} steps, {a.sigmas_per_image} sigmas trained per image"

    def check_reward(self, reward_fn: RewardFn) -> None:
        """Any reward: only its scores are used."""

    def prepare(self, policy: FlowPolicy) -> None:
        """The old (rollout) policy starts equal to the trained one; the policy must be able to keep one."""
        if not isinstance(policy, OldPolicy):
            raise ValueError(
                f"algorithm 'nft' samples with an old copy of the trained weights, which {type(policy).__name__} "
                "cannot keep (rewardflow.models.protocol.OldPolicy)"
            )
        policy.init_old()

    def step(self, tools: Tools, batch: Batch) -> StepResult:
        cfg, policy = self.cfg, tools.policy
        scored = roll_out_and_score(
            tools, batch, lambda on_chunk: collect(policy, batch.cond, cfg, batch.random, on_chunk=on_chunk)
        )
        if not scored.finite:
            return StepResult(
                scored.images, scored.reward, {**scored.metrics, "skipped_steps": float(cfg.optimizer_steps)}
            )
        adv = own_advantages(tools, batch, scored.reward, cfg.global_std, cfg.adv_clip_max)
        t1 = time.time()
        r = optimality_probability(adv.to(policy.device), cfg.adv_clip_max, cfg.adv_mode)
        update = train_step(policy, tools.optimizer, scored.rollout, r, cfg, tools.ema.step, generator=batch.random)
        # After the iteration's updates, the old policy moves towards the trained one.
        update["old_eta"] = old_decay((batch.iteration + 1) * cfg.optimizer_steps, cfg)
        policy.soft_update_old(update["old_eta"])
        update = distributed.mean_over_ranks(update)
        return StepResult(scored.images, scored.reward, {**update, **scored.metrics, "time_train": time.time() - t1})

    def state(self, policy: FlowPolicy) -> dict[str, dict[str, torch.Tensor]]:
        """The old policy's weights."""
        return {"old": dict(policy.named_old_state())}

    def load_state(self, policy: FlowPolicy, state: dict[str, Any], path: str) -> None:
        old = dict(policy.named_old_state())
        if set(state.get("old", {})) != set(old):
            raise IncompatibleState(f"resume state {path} does not hold this policy's old (rollout) weights")
        with torch.no_grad():
            for name, tensor in old.items():
                tensor.copy_(state["old"][name])
