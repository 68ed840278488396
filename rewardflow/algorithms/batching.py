"""Batch geometry shared by the algorithms: rows -> micro-batches -> optimizer steps."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from rewardflow.types import RewardOutput
from rewardflow.utils import distributed


def check_split(rows: int, micro_batch: int, optimizer_steps: int, section: str) -> None:
    """Raise unless ``rows`` splits into micro-batches of ``micro_batch`` and those into ``optimizer_steps``.

    ``section`` names the config section in the message (``grpo``, ``nft``).
    """
    if rows % micro_batch:
        raise ValueError(f"rows per rank ({rows}) must be a multiple of {section}.micro_batch ({micro_batch})")
    if (rows // micro_batch) % optimizer_steps:
        raise ValueError(
            f"{rows // micro_batch} micro-batches per iteration do not split into "
            f"{section}.optimizer_steps={optimizer_steps} equal accumulation groups"
        )


class WorldLayout(NamedTuple):
    """An iteration's geometry on a number of ranks (:func:`fit_world`)."""

    prompts_per_iter: int
    micro_batch: int
    optimizer_steps: int


def fit_world(
    prompts_per_iter: int, group_size: int, micro_batch: int, optimizer_steps: int, world: int
) -> WorldLayout:
    """The geometry closest to the configured one that splits over ``world`` ranks (:func:`rank_rows`).

    The images per optimizer step (``prompts x group / optimizer_steps``) are kept where the ranks can share them:
    only the per-rank micro-batch shrinks, to the largest divisor of each rank's rows per optimizer step that is
    at most ``micro_batch``. Where the rows per rank do not split into ``optimizer_steps``, fewer (larger) steps are
    taken; where the rows do not split over the ranks at all, ``prompts_per_iter`` grows to the next multiple that
    does (every rank holds whole rows). One process keeps a valid configuration as it is.
    """
    if world < 1:
        raise ValueError(f"the world size must be >= 1, got {world}")
    unit = world // math.gcd(group_size, world)  # prompts per iteration must be a multiple of this
    prompts = -(-prompts_per_iter // unit) * unit
    per_rank = prompts * group_size // world
    steps = max(s for s in range(1, optimizer_steps + 1) if per_rank % s == 0)
    rows = per_rank // steps
    micro = max(d for d in range(1, min(micro_batch, rows) + 1) if rows % d == 0)
    return WorldLayout(prompts, micro, steps)


def rank_rows(
    rows: int, micro_batch: int, optimizer_steps: int, rank: int, world: int, section: str = "algorithm"
) -> list[int]:
    """The global rows (indices into an iteration's ``rows``) that ``rank`` of ``world`` holds.

    Each optimizer step's micro-batches are dealt out in equal contiguous shares, so every rank accumulates
    its share of the same optimizer step, and the gradients averaged over ranks are those of one process
    holding every row (``world`` x B rows reproduce 1 x ``world`` B, up to the order of float sums).
    """
    check_split(rows, micro_batch, optimizer_steps, section)
    per_step = rows // micro_batch // optimizer_steps
    if per_step % world:
        raise ValueError(
            f"the {per_step} micro-batches of each optimizer step cannot be dealt equally to {world} ranks: "
            f"change {section}.micro_batch, {section}.optimizer_steps or the batch"
        )
    share = per_step // world
    chunks = [s * per_step + rank * share + c for s in range(optimizer_steps) for c in range(share)]
    return [c * micro_batch + i for c in chunks for i in range(micro_batch)]


@dataclass
class RowLayout:
    """Where an iteration's rows live: this rank's global row indices, and the gathered order of all of them.

    Built from :func:`rank_rows`; with one process ``own`` and ``order`` are both ``0..N-1``.
    """

    own: list[int]
    order: torch.Tensor
    group_ids: torch.Tensor
    """[N] the group (prompt) of every row of the iteration."""

    @classmethod
    def build(cls, micro_batch: int, optimizer_steps: int, section: str, world: distributed.World,
              group_ids: torch.Tensor) -> RowLayout:  # fmt: skip
        """The layout of ``len(group_ids)`` rows on ``world`` (``section`` names the batch fields in messages)."""
        n = len(group_ids)
        layout = [rank_rows(n, micro_batch, optimizer_steps, r, world.size, section) for r in range(world.size)]
        return cls(layout[world.rank], torch.tensor([i for rows in layout for i in rows]), group_ids)

    def gather(self, out: RewardOutput) -> RewardOutput:
        """Every rank's rewards in global row order (each rank ends with the same, whole-batch output)."""
        return out.map(lambda t: distributed.gather_rows(t, self.order))


class KeyedRandom:
    """An iteration's random draws as independent streams, each keyed by what it is for.

    ``shared(name, key)`` gives the same generator on every rank (the SDE window, a direct method's active
    steps); ``rows(name, start)`` the generator of the micro-batch whose first (local) row is ``start``, keyed by
    that row's global index, so a micro-batch draws the same noise whichever rank holds it and however many
    ranks there are. Every stream is a pure function of (seed, iteration, name, key): a resumed run draws
    exactly what the uninterrupted one did, with no generator state to save.
    """

    def __init__(self, seed: int, iteration: int, global_rows: Sequence[int] | None = None) -> None:
        self.seed, self.iteration, self.global_rows = seed, iteration, global_rows

    def shared(self, name: str, key: int = 0) -> torch.Generator:
        entropy = [self.seed, self.iteration, zlib.crc32(name.encode()), key]
        state = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])
        return torch.Generator().manual_seed(state)

    def rows(self, name: str, start: int) -> torch.Generator:
        return self.shared(name, 1 + (self.global_rows[start] if self.global_rows is not None else start))


Random = torch.Generator | KeyedRandom | None


def shared_generator(random: Random, name: str, key: int = 0) -> torch.Generator | None:
    """``random``'s stream ``name`` shared by all ranks; a plain generator (or None) is returned as is."""
    return random.shared(name, key) if isinstance(random, KeyedRandom) else random


def rows_generator(random: Random, name: str, start: int) -> torch.Generator | None:
    """``random``'s stream ``name`` for the micro-batch starting at local row ``start`` (a plain generator as is)."""
    return random.rows(name, start) if isinstance(random, KeyedRandom) else random


class MicroBatch(NamedTuple):
    """One micro-batch of an iteration's update (see :func:`micro_batches`)."""

    rows: slice
    share: float
    """What its mean loss is divided by so that its optimizer step sees the mean over the step's rows."""
    step: int
    """Which optimizer step of the iteration it belongs to (0, 1, ...)."""
    ends_step: bool
    """Whether an optimizer step follows it."""


def micro_batches(rows: int, micro_batch: int, optimizer_steps: int) -> list[MicroBatch]:
    """``rows`` as micro-batches of ``micro_batch`` rows, in order, and how they make up the optimizer steps.

    When the configs' ``check_batch`` holds (the rows split into equal micro-batches and those into equal
    steps), every micro-batch's ``share`` is the number of micro-batches per step. Any other row count (GRPO's
    ``drop_zero_advantage``) is cut into ``optimizer_steps`` equal spans, or fewer when there are fewer
    micro-batches' worth of rows (rounded); a micro-batch goes to the span its middle row falls in (a short last
    one joins the step before it rather than making a step of a few rows), and every row of a step weighs the same.
    """
    if rows < 1:
        raise ValueError(f"a batch needs at least one row, got {rows}")
    chunks = [slice(i, min(i + micro_batch, rows)) for i in range(0, rows, micro_batch)]
    spans = max(1, min(optimizer_steps, round(rows / micro_batch)))
    owner = [(c.start + c.stop) * spans // (2 * rows) for c in chunks]
    step_rows = [0] * spans
    for o, chunk in zip(owner, chunks):
        step_rows[o] += chunk.stop - chunk.start
    return [
        MicroBatch(chunk, step_rows[o] / (chunk.stop - chunk.start), o, c + 1 == len(chunks) or owner[c + 1] != o)
        for c, (o, chunk) in enumerate(zip(owner, chunks))
    ]


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    grad_clip: float,
    after: Callable[[], None] | None = None,
    losses_finite: torch.Tensor | bool = True,
) -> torch.Tensor:
    """Average the accumulated gradients over ranks, clip them to ``grad_clip``, step, zero them, run ``after``.

    Returns the norm before clipping. A non-finite norm, or a non-finite loss among those accumulated into the step
    (``losses_finite`` False on any rank: a NaN loss can leave finite gradients, e.g. through a clamp, while the
    rest of the loss still pulls), skips the step: the weights, the optimizer state and ``after`` are left alone,
    and the returned norm is NaN so that the step counts as skipped (:func:`mean_metrics`). Every rank sees the same
    averaged gradients and the same verdict on the losses, so every rank skips or steps alike.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    distributed.average_gradients(params)
    losses_ok = not distributed.any_rank(not bool(losses_finite))
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if losses_ok and torch.isfinite(norm):
        optimizer.step()
        if after is not None:
            after()
    optimizer.zero_grad(set_to_none=True)
    return norm if losses_ok else torch.full_like(norm, float("nan"))


def mean_metrics(
    sums: dict[str, torch.Tensor | float], terms: int, grad_norms: list[torch.Tensor]
) -> dict[str, float]:
    """Per-term means of the summed metrics, the mean finite gradient norm, and how many steps were skipped."""
    metrics = {k: float(v) / terms for k, v in sums.items()}
    finite = [float(g) for g in grad_norms if torch.isfinite(g)]
    metrics["grad_norm"] = sum(finite) / len(finite) if finite else float("nan")
    metrics["skipped_steps"] = float(len(grad_norms) - len(finite))
    return metrics
