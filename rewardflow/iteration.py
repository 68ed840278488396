"""One training iteration of each algorithm family, as the loop in :mod:`rewardflow.train` calls it.

Each returns the images of the iteration (for grids), the reward of what was scored, and the metrics.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from rewardflow.algorithms import grpo, nft
from rewardflow.algorithms.advantages import aggregate_advantages
from rewardflow.algorithms.draft import direct_train_step, draft_loss
from rewardflow.algorithms.leapalign import leapalign_loss
from rewardflow.config import TrainConfig
from rewardflow.models.protocol import FlowPolicy
from rewardflow.rewards import RewardFn
from rewardflow.rewards.shapes import ShapesJudgeReward
from rewardflow.utils.ema import EMA


def online_iteration(
    cfg: TrainConfig,
    policy: FlowPolicy,
    optimizer: torch.optim.Optimizer,
    ema: EMA,
    reward_fn: RewardFn,
    cond: Any,
    metadata: list[dict[str, Any]],
    group_ids: torch.Tensor,
    gen: torch.Generator,
    it: int,
) -> tuple[torch.Tensor, Any, dict[str, float]]:
    """Roll out, score, turn rewards into advantages, update (Flow-GRPO family and DiffusionNFT)."""
    t0 = time.time()
    if cfg.algorithm == "grpo":
        batch = grpo.collect(policy, cond, cfg.grpo, gen, group_ids, iteration=it)
        final = batch.xs[:, -1]
    else:
        nft_batch = nft.collect(policy, cond, cfg.nft, gen)
        final = nft_batch.x0
    if final.device.type == "cuda":
        torch.cuda.synchronize()  # the rollout's kernels are asynchronous: time them, not their launches
    t_rollout = time.time() - t0
    images = policy.decode(final)
    reward = reward_fn(images, cond.prompts, metadata)
    adv = aggregate_advantages(
        reward.scores,
        reward.components,
        dict(zip(cfg.reward.names, cfg.reward.resolved_weights)),
        group_ids,
        cfg.reward.aggregate,
        global_std=cfg.algo.global_std,
        clip=cfg.algo.adv_clip_max,
    )
    t1 = time.time()
    if cfg.algorithm == "grpo":
        if cfg.grpo.best_worst_k:
            keep = grpo.best_worst_rows(adv, group_ids, cfg.grpo.best_worst_k)
            batch, adv = batch.select(keep), adv[keep]
        update = grpo.train_step(policy, optimizer, batch, adv.to(policy.device), cfg.grpo, ema.step, generator=gen)
    else:
        r = nft.optimality_probability(adv.to(policy.device), cfg.nft.adv_clip_max, cfg.nft.adv_mode)
        update = nft.train_step(policy, optimizer, nft_batch, r, cfg.nft, ema.step, generator=gen)
        # After the iteration's updates, the old policy moves towards the trained one.
        update["old_eta"] = nft.old_decay((it + 1) * cfg.nft.optimizer_steps, cfg.nft)
        policy.soft_update_old(update["old_eta"])
    return images, reward, {**update, "time_rollout": t_rollout, "time_train": time.time() - t1}


def direct_iteration(
    cfg: TrainConfig,
    policy: FlowPolicy,
    optimizer: torch.optim.Optimizer,
    ema: EMA,
    reward_fn: RewardFn,
    cond: Any,
    metadata: list[dict[str, Any]],
    gen: torch.Generator,
) -> tuple[torch.Tensor, Any, dict[str, float]]:
    """Sample with gradient, backpropagate the reward (DRaFT family, LeapAlign).

    The Shapes judge scores the same images as a monitor (``judge/*``): the learned reward is what is optimised,
    the judge is the truth it stands in for, and the gap between them is where reward hacking shows.
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
    return images, reward, update
