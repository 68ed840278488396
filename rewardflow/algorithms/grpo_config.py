"""The settings of Flow-GRPO and its family (:mod:`rewardflow.algorithms.grpo`): sampler, SDE, window, objective.

Kept apart from the algorithm so that ``grpo.py`` reads as the method; :class:`GRPOConfig` is re-exported there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from rewardflow.algorithms.batching import check_split
from rewardflow.sampling.config import SamplerConfig
from rewardflow.sampling.sde import STEPS
from rewardflow.sampling.windows import SDEWindow
from rewardflow.types import StepOutput
from rewardflow.utils.configs import Count, Fraction, Natural, NonNegative, Positive, Range


def trained_step_count(fraction: float, steps: int) -> int:
    """``int(fraction * steps)``, at least 1: the official scripts truncate (DanceGRPO: 6 of 11 steps at 0.6)."""
    return max(1, int(fraction * steps))


@dataclass
class GRPOConfig(SamplerConfig):
    """Flow-GRPO settings (defaults: the paper's SD3.5 GenEval run, except where the tiny presets change them).

    ``num_steps``, ``shift`` and ``guidance_scale``: :class:`~rewardflow.sampling.config.SamplerConfig` (10 steps in
    training rollouts, CFG 4.5 in rollouts and the training forward).
    """

    SECTION = "grpo"
    num_steps: Annotated[int, Range(2)] = 10
    """Sampler steps in training rollouts (the last, deterministic one is never trained; evaluation uses more)."""
    sde_type: Literal["flow", "dance", "cps"] = "flow"
    """The stochastic step of rollouts and training: Flow-GRPO's SDE (``g = a sqrt(sigma / (1 - sigma))``),
    DanceGRPO's constant ``g = eta``, or coefficients-preserving sampling (fresh-noise std
    ``sigma_next sin(a pi / 2)``); ``noise_level`` is ``a``, ``eta`` or the CPS ``a``."""
    noise_level: Positive = 0.7
    """``a`` (flow; the paper's ablation found 0.7 best for SD3.5), ``eta`` (dance; DanceGRPO uses 0.3) or the
    CPS ``a`` in (0, 1] (Flow-GRPO's README: 0.8)."""
    clip_range: NonNegative = 1e-4
    adv_clip_max: NonNegative = 5.0
    global_std: bool = True
    """Normalise advantages by the std of the whole batch (True) or of each group."""
    std_unbiased: bool = False
    """Bessel-corrected std (DanceGRPO: torch's default) instead of the population std (Flow-GRPO: numpy's)."""
    adv_eps: Positive = 1e-4
    """Added to the std before dividing (Flow-GRPO 1e-4, DanceGRPO 1e-8)."""
    kl_beta: NonNegative = 0.04
    kl_every: Count = 1
    """Compute the KL term in one of every ``kl_every`` training forwards (micro-batch, step), weighted by
    ``kl_every``: since the rows are random draws, an unbiased estimate of the full term, without that share of the
    reference's forwards. Which steps carry it rotates with the micro-batch, so over ``kl_every`` micro-batches
    every step does."""
    kl_form: Literal["code", "paper"] = "code"
    micro_batch: Count = 32
    """Rows per rollout chunk and per training micro-batch (equal shapes keep the on-policy ratio exactly 1)."""
    optimizer_steps: Count = 2
    """Optimizer steps per iteration (the rows are split into this many accumulation groups, in order)."""
    grad_clip: Positive = 1.0
    same_initial_noise: bool = False
    """DanceGRPO: every image of a group starts from the same initial noise (the SDE noise still differs), so
    the reward differences within a group come from the sampling path alone."""
    sde_window: Natural = 0
    """Flow-GRPO-Fast: the number W of consecutive SDE steps per rollout, at a random start in
    ``sde_window_range``; every other step is an ODE step and only the window is trained. 0: every step but the
    last is an SDE step (plain Flow-GRPO)."""
    sde_window_range: tuple[int, int] = (0, 0)
    """``(lo, hi)``: the window starts in ``lo .. hi - W``; ``hi = 0`` means ``num_steps - 1``."""
    window_schedule: Literal["random", "progressive", "decay"] = "random"
    """Where the window sits each iteration: a uniform random start (Flow-GRPO-Fast), or MixGRPO's sliding
    window moving from ``lo`` to ``hi - W`` over training ("progressive": ``window_iters`` iterations per
    position; "decay": the stay shrinks linearly to ``window_iters_min`` over one sweep)."""
    window_iters: Count = 25
    """MixGRPO: iterations the window stays at one position (the first position, for "decay")."""
    window_iters_min: Count = 1
    """MixGRPO "decay": iterations at the last position of a sweep."""
    window_stride: Count = 1
    """MixGRPO: steps the window moves at a time."""
    timestep_fraction: Fraction = 1.0
    """Fraction of the SDE steps trained, a random subset of ``int(fraction * steps)`` (truncated, as DanceGRPO and
    DiffusionNFT count; at least one) drawn for each sample. Steps of
    one trajectory share its advantage, so training fewer steps of more trajectories buys more independent
    signal per unit of compute (Flow-GRPO's and DanceGRPO's ``timestep_fraction``; DanceGRPO uses 0.6)."""
    best_worst_k: Natural = 0
    """DanceGRPO's best-of-N selection: train only the ``k/2`` highest- and ``k/2`` lowest-advantage rows of
    each group (k even, at most the group size); 0 trains every row."""
    drop_zero_advantage: bool = False
    """Train only the rows whose advantage is not 0, as the official Flow-GRPO code does, topped up with dropped rows
    to a whole number of micro-batches (:func:`rewardflow.algorithms.grpo.rows_with_signal`); with fewer of them
    than ``optimizer_steps`` there are fewer optimizer steps. A group whose samples all scored alike
    (``zero_std_groups`` in the metrics) then costs no training time, and gives up its KL term. One process only."""
    guard: bool = False
    """GRPO-Guard's objective (module docstring): the ratio re-centred on the rollout's transition mean (RatioNorm)
    and each step's term weighted by ``1 / dt`` so that every step's gradient has the same scale. Rollouts keep
    their transition means for it (as much memory again as the stored latents)."""

    def __post_init__(self) -> None:
        super().__post_init__()
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
        if self.window_iters_min > self.window_iters:
            raise ValueError(
                f"grpo.window_iters_min must be <= grpo.window_iters, got {self.window_iters_min}, {self.window_iters}"
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
        """How many of its SDE steps each sample trains (``timestep_fraction`` of them, truncated, at least one)."""
        return trained_step_count(self.timestep_fraction, self.sde_steps)

    @property
    def window_bounds(self) -> tuple[int, int]:
        lo, hi = self.sde_window_range
        return lo, hi or self.num_steps - 1

    @property
    def window(self) -> SDEWindow:
        """Where the SDE steps of a rollout are (:class:`~rewardflow.sampling.windows.SDEWindow`)."""
        lo, hi = self.window_bounds
        return SDEWindow(self.sde_window, lo, hi, self.window_schedule, self.window_stride, self.window_iters,
                         self.window_iters_min)  # fmt: skip

    def draw_noise_levels(self, generator: torch.Generator | None = None, iteration: int = 0) -> torch.Tensor:
        """The noise level of each step for one rollout [T]: with a window, SDE only inside it."""
        return self.window.levels(self.num_steps, self.noise_level, iteration, generator)

    @property
    def step(self) -> Callable[..., StepOutput]:
        """The step function of ``sde_type``."""
        return STEPS[self.sde_type]
