"""Group-normalised advantages (shared by GRPO and NFT)."""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    global_std: bool = True,
    eps: float = 1e-4,
    clip: float = 5.0,
    unbiased: bool = False,
) -> torch.Tensor:
    """``A = (R - mean_group(R)) / (std + eps)``, clipped to ``[-clip, clip]``.

    Args:
        rewards: [N] scalar rewards (all ranks' rewards, gathered).
        group_ids: [N] integer id of each row's group (rows of one prompt share an id).
        global_std: divide by the std of all N rewards (Flow-GRPO's main configs) instead of each group's.
        eps: added to the std; a group whose rewards are all equal gets advantage 0.
        clip: Flow-GRPO's ``adv_clip_max``.
        unbiased: Bessel-corrected std (DanceGRPO uses torch's default) instead of the population std
            (Flow-GRPO uses numpy's).

    Returns:
        [N] float32 advantages.
    """
    r = rewards.float()
    if r.ndim != 1 or group_ids.shape != r.shape:
        raise ValueError(f"rewards {tuple(r.shape)} and group_ids {tuple(group_ids.shape)} must both be [N]")
    _, inverse, counts = torch.unique(group_ids.to(r.device), return_inverse=True, return_counts=True)
    n_groups = counts.numel()
    sums = torch.zeros(n_groups, device=r.device).index_add_(0, inverse, r)
    means = sums / counts
    centred = r - means[inverse]
    if global_std:
        std = r.std(unbiased=unbiased) if r.numel() > 1 else torch.zeros((), device=r.device)
        std_rows = std.expand_as(r)
    else:
        sq = torch.zeros(n_groups, device=r.device).index_add_(0, inverse, centred**2)
        denom = (counts - 1).clamp(min=1) if unbiased else counts
        std_rows = torch.sqrt(sq / denom)[inverse]
    # A group with identical rewards has centred == 0: its advantage is 0 even when std + eps == 0.
    adv = torch.where(centred == 0, torch.zeros_like(centred), centred / (std_rows + eps))
    return adv.clamp(-clip, clip)


def zero_std_fraction(rewards: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Share of groups whose rewards are all identical (they carry no policy-gradient signal)."""
    groups = torch.unique(group_ids)
    same = [bool((rewards[group_ids == g] == rewards[group_ids == g][0]).all()) for g in groups]
    return sum(same) / max(1, len(same))


def aggregate_advantages(
    scores: torch.Tensor,
    components: dict[str, torch.Tensor],
    weights: dict[str, float],
    group_ids: torch.Tensor,
    aggregate: str,
    *,
    global_std: bool = True,
    clip: float = 5.0,
    eps: float = 1e-4,
    unbiased: bool = False,
) -> torch.Tensor:
    """Advantages of several rewards, by one of the three published conventions.

    ``aggregate="reward"`` normalises the weighted sum ``scores`` (Flow-GRPO, DiffusionNFT); ``"advantage"``
    normalises each reward in ``components`` on its own and sums ``w_i A_i`` (MixGRPO), so that a reward with a
    large spread cannot drown the others; the sum is clipped to ``[-clip, clip]`` again. ``"loss"`` returns each
    reward's own advantages, [N, K] in the order of ``components``, for one clipped loss per reward (DanceGRPO).
    ``eps`` and ``unbiased`` go to :func:`group_advantages`.
    """
    norm = dict(global_std=global_std, clip=clip, eps=eps, unbiased=unbiased)
    if aggregate == "reward" or len(components) <= 1:
        return group_advantages(scores, group_ids, **norm)
    per_reward = {name: group_advantages(r, group_ids, **norm) for name, r in components.items()}
    if aggregate == "loss":
        return torch.stack(list(per_reward.values()), dim=1)
    if aggregate != "advantage":
        raise ValueError(f"reward.aggregate must be 'reward', 'advantage' or 'loss', got {aggregate!r}")
    return sum(weights[name] * a for name, a in per_reward.items()).clamp(-clip, clip)
