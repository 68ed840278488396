"""What the online methods (the Flow-GRPO family, DiffusionNFT) share: roll out, score, turn rewards into advantages.

A rollout is scored chunk by chunk as it is sampled (:class:`ChunkScorer`); the rewards are gathered from every rank
in global row order, checked, and normalised within each prompt's group (:func:`group_advantages`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import torch

from rewardflow.algorithms.advantages import aggregate_advantages
from rewardflow.algorithms.base import Batch, Tools, check_aggregate
from rewardflow.models.protocol import FlowPolicy
from rewardflow.rewards.config import RewardConfig
from rewardflow.rewards.protocol import RewardFn
from rewardflow.types import RewardOutput

log = logging.getLogger(__name__)


def check_online(cfg: Any, prompts_per_iter: int, group_size: int, reward: RewardConfig, name: str,
                 aggregates: tuple[str, ...] = ("reward", "advantage")) -> None:  # fmt: skip
    """What every online method asks of a run: groups of two images or more, whole micro-batches, an aggregate it has.

    ``cfg``: the method's section (its ``check_batch``); ``name`` and ``aggregates``: for
    :func:`~rewardflow.algorithms.base.check_aggregate`.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group-normalised advantages, got {group_size}")
    cfg.check_batch(prompts_per_iter * group_size)
    check_aggregate(reward, name, aggregates)


class ChunkScorer:
    """Decodes and scores the rollout chunk by chunk, in a worker thread while the next chunk samples.

    One worker: the reward sees the chunks one at a time and in order, exactly as without overlap, so the
    scores (and everything after them) are the same bit for bit; only the wall-clock changes. With
    ``overlap=False`` each chunk is scored at once, in the calling thread.
    """

    def __init__(self, policy: FlowPolicy, reward_fn: RewardFn, prompts: list[str], metadata: list[dict],
                 overlap: bool) -> None:  # fmt: skip
        self.policy, self.reward_fn, self.prompts, self.metadata = policy, reward_fn, prompts, metadata
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward") if overlap else None
        self.images: list[torch.Tensor] = []
        self.parts: list[Future | RewardOutput] = []

    def __call__(self, rows: slice, x0: torch.Tensor) -> None:
        images = self.policy.decode(x0)
        self.images.append(images)
        args = (images, self.prompts[rows], self.metadata[rows])
        self.parts.append(self.pool.submit(self.reward_fn, *args) if self.pool else self.reward_fn(*args))

    def result(self) -> tuple[torch.Tensor, RewardOutput]:
        """Every chunk's images and their rewards, concatenated in row order (re-raises a reward's error)."""
        try:
            outs = [p.result() if isinstance(p, Future) else p for p in self.parts]
        finally:
            if self.pool:
                self.pool.shutdown(wait=True, cancel_futures=True)
        return torch.cat(self.images), RewardOutput.cat(outs)


class Scored(NamedTuple):
    """A scored rollout (:func:`roll_out_and_score`)."""

    rollout: Any
    """What ``collect`` returned (the algorithm's batch)."""
    images: torch.Tensor
    """This rank's images."""
    reward: RewardOutput
    """The whole batch's reward, gathered from every rank."""
    metrics: dict[str, float]
    """``time_rollout`` and ``time_reward_wait``."""
    finite: bool
    """Whether every score is finite (if not, the update must be skipped)."""


def roll_out_and_score(tools: Tools, batch: Batch, collect: Callable[[ChunkScorer], Any]) -> Scored:
    """Run ``collect(on_chunk)`` (a rollout that hands each chunk's clean samples to ``on_chunk``) and score it."""
    t0 = time.time()
    scorer = ChunkScorer(tools.policy, tools.reward_fn, batch.cond.prompts, batch.metadata, tools.overlap_scoring)
    rollout = collect(scorer)
    if tools.policy.device.type == "cuda":
        torch.cuda.synchronize()  # the rollout's kernels are asynchronous: time them, not their launches
    t_rollout = time.time() - t0
    images, reward = scorer.result()
    reward = batch.layout.gather(reward)
    metrics = {"time_rollout": t_rollout, "time_reward_wait": time.time() - t0 - t_rollout}
    finite = all(bool(torch.isfinite(t).all()) for t in (reward.scores, *reward.components.values()))
    if not finite:
        log.warning("iteration %d: non-finite rewards; the update is skipped", batch.iteration + 1)
    return Scored(rollout, images, reward, metrics, finite)


def own_advantages(tools: Tools, batch: Batch, reward: RewardOutput, global_std: bool, clip: float,
                   **norm: Any) -> torch.Tensor:  # fmt: skip
    """This rank's rows of the iteration's advantages (:func:`aggregate_advantages` over the whole batch)."""
    weights = dict(zip(tools.reward.names, tools.reward.resolved_weights))
    adv = aggregate_advantages(reward.scores, reward.components, weights, batch.layout.group_ids,
                               tools.reward.aggregate, global_std=global_std, clip=clip, **norm)  # fmt: skip
    return adv[batch.layout.own]
