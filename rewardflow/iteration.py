"""One training iteration of each algorithm family, as the loop in :mod:`rewardflow.train` calls it.

Each returns the images of the iteration (for grids), the reward of what was scored, and the metrics.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from rewardflow.algorithms import grpo, nft
from rewardflow.algorithms.advantages import aggregate_advantages
from rewardflow.algorithms.batching import KeyedRandom, rank_rows
from rewardflow.algorithms.draft import direct_train_step, draft_loss
from rewardflow.algorithms.leapalign import leapalign_loss
from rewardflow.config import TrainConfig
from rewardflow.models.protocol import FlowPolicy
from rewardflow.rewards import RewardFn
from rewardflow.shapes.reward import ShapesJudgeReward
from rewardflow.types import RewardOutput
from rewardflow.utils import distributed
from rewardflow.utils.ema import EMA

log = logging.getLogger(__name__)


@dataclass
class RowLayout:
    """Where an iteration's rows live: this rank's global row indices, and the gathered order of all of them.

    Built from :func:`rank_rows`; with one process ``own`` and ``order`` are both ``0..N-1``.
    """

    own: list[int]
    order: torch.Tensor
    group_ids: torch.Tensor

    @classmethod
    def build(cls, cfg: TrainConfig, world: distributed.World, group_ids: torch.Tensor) -> RowLayout:
        a, n = cfg.algo, cfg.rows_per_iter
        layout = [
            rank_rows(n, a.micro_batch, a.optimizer_steps, r, world.size, cfg.algorithm) for r in range(world.size)
        ]
        return cls(layout[world.rank], torch.tensor([i for rows in layout for i in rows]), group_ids)

    def gather(self, out: RewardOutput) -> RewardOutput:
        """Every rank's rewards in global row order (each rank ends with the same, whole-batch output)."""
        return out.map(lambda t: distributed.gather_rows(t, self.order))


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


def online_iteration(
    cfg: TrainConfig,
    policy: FlowPolicy,
    optimizer: torch.optim.Optimizer,
    ema: EMA,
    reward_fn: RewardFn,
    cond: Any,
    metadata: list[dict[str, Any]],
    layout: RowLayout,
    gen: KeyedRandom,
    it: int,
) -> tuple[torch.Tensor, Any, dict[str, float]]:
    """Roll out, score, turn rewards into advantages, update (Flow-GRPO family and DiffusionNFT).

    Returns this rank's images, the whole batch's reward (gathered from every rank) and the metrics (averaged
    over ranks). Non-finite rewards skip the update (``skipped_steps`` counts the optimizer steps not taken).
    """
    t0 = time.time()
    scorer = ChunkScorer(policy, reward_fn, cond.prompts, metadata, cfg.overlap_scoring)
    own_groups = layout.group_ids[layout.own]
    if cfg.algorithm == "grpo":
        batch = grpo.collect(policy, cond, cfg.grpo, gen, own_groups, iteration=it, on_chunk=scorer)
    else:
        nft_batch = nft.collect(policy, cond, cfg.nft, gen, on_chunk=scorer)
    if policy.device.type == "cuda":
        torch.cuda.synchronize()  # the rollout's kernels are asynchronous: time them, not their launches
    t_rollout = time.time() - t0
    images, reward = scorer.result()
    reward = layout.gather(reward)
    t_reward_wait = time.time() - t0 - t_rollout
    metrics = {"time_rollout": t_rollout, "time_reward_wait": t_reward_wait}
    if not all(torch.isfinite(t).all() for t in (reward.scores, *reward.components.values())):
        log.warning("iteration %d: non-finite rewards; the update is skipped", it + 1)
        return images, reward, {**metrics, "skipped_steps": float(cfg.algo.optimizer_steps)}
    weights = dict(zip(cfg.reward.names, cfg.reward.resolved_weights))
    norm = {"eps": cfg.grpo.adv_eps, "unbiased": cfg.grpo.std_unbiased} if cfg.algorithm == "grpo" else {}
    adv = aggregate_advantages(
        reward.scores,
        reward.components,
        weights,
        layout.group_ids,
        cfg.reward.aggregate,
        global_std=cfg.algo.global_std,
        clip=cfg.algo.adv_clip_max,
        **norm,
    )[layout.own]
    t1 = time.time()
    if cfg.algorithm == "grpo":
        # One clipped loss per reward ([N, K] advantages): rows are chosen by their weighted sum.
        reward_weights = torch.tensor([weights[n] for n in reward.components]) if adv.ndim == 2 else None
        combined = adv if reward_weights is None else adv @ reward_weights
        # best_worst_k and drop_zero_advantage: one process only (train() checks), so the kept rows are its own.
        if cfg.grpo.best_worst_k:
            keep = grpo.best_worst_rows(combined, own_groups, cfg.grpo.best_worst_k)
            batch, adv, combined = batch.select(keep), adv[keep], combined[keep]
        if cfg.grpo.drop_zero_advantage:
            # A row carries signal when any of its rewards' advantages is not 0 (their sum may be).
            signal = combined if adv.ndim == 1 else adv.abs().amax(dim=1)
            keep = grpo.rows_with_signal(signal, cfg.grpo.micro_batch)
            metrics["trained_rows"] = len(keep) / len(adv)
            if not len(keep):  # every group scored alike: nothing to learn from, and no failure either
                return images, reward, metrics
            batch, adv = batch.select(keep), adv[keep]
        update = grpo.train_step(policy, optimizer, batch, adv.to(policy.device), cfg.grpo, ema.step, generator=gen,
                                 reward_weights=reward_weights)  # fmt: skip
    else:
        r = nft.optimality_probability(adv.to(policy.device), cfg.nft.adv_clip_max, cfg.nft.adv_mode)
        update = nft.train_step(policy, optimizer, nft_batch, r, cfg.nft, ema.step, generator=gen)
        # After the iteration's updates, the old policy moves towards the trained one.
        update["old_eta"] = nft.old_decay((it + 1) * cfg.nft.optimizer_steps, cfg.nft)
        policy.soft_update_old(update["old_eta"])
    update = distributed.mean_over_ranks(update)
    return images, reward, {**update, **metrics, "time_train": time.time() - t1}


def direct_iteration(
    cfg: TrainConfig,
    policy: FlowPolicy,
    optimizer: torch.optim.Optimizer,
    ema: EMA,
    reward_fn: RewardFn,
    cond: Any,
    metadata: list[dict[str, Any]],
    layout: RowLayout,
    gen: KeyedRandom,
) -> tuple[torch.Tensor, Any, dict[str, float]]:
    """Sample with gradient, backpropagate the reward (DRaFT family, LeapAlign).

    The Shapes judge scores the same images as a monitor (``judge/*``): the learned reward is what is optimised,
    the judge is the truth it stands in for, and the gap between them is where reward hacking shows.
    Returns this rank's images, the whole batch's reward and the metrics averaged over ranks.
    """
    if cfg.algorithm == "draft":
        loss_fn = draft_loss(reward_fn, cfg.draft)
    else:
        loss_fn = leapalign_loss(reward_fn, cfg.leapalign)
    update, final, reward = direct_train_step(
        policy, optimizer, cond, metadata, loss_fn, cfg.algo, ema.step, generator=gen
    )
    images = policy.decode(final)
    if cfg.eval.judge:
        judged = ShapesJudgeReward(cfg.reward.extra_object_penalty)(images, cond.prompts, metadata)
        update.update({f"judge/{k}": v.mean().item() for k, v in judged.details.items()})
        update["judge/reward"] = judged.scores.mean().item()
    return images, layout.gather(reward), distributed.mean_over_ranks(update)
