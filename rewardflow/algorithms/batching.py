"""Batch geometry shared by the algorithms: rows -> micro-batches -> optimizer steps."""

from __future__ import annotations

from collections.abc import Callable

import torch


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


def micro_batches(rows: int, micro_batch: int, optimizer_steps: int) -> tuple[list[slice], int]:
    """The micro-batch slices of ``rows``, in order, and how many of them each optimizer step accumulates."""
    chunks = [slice(i, i + micro_batch) for i in range(0, rows, micro_batch)]
    return chunks, len(chunks) // optimizer_steps


def optimizer_step(
    optimizer: torch.optim.Optimizer, grad_clip: float, after: Callable[[], None] | None = None
) -> torch.Tensor:
    """Clip the accumulated gradients to ``grad_clip``, step, zero them, run ``after``; returns the norm before."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if after is not None:
        after()
    return norm


def mean_metrics(
    sums: dict[str, torch.Tensor | float], terms: int, grad_norms: list[torch.Tensor]
) -> dict[str, float]:
    """Per-term means of the summed metrics and the mean gradient norm (one host sync per iteration)."""
    metrics = {k: float(v) / terms for k, v in sums.items()}
    metrics["grad_norm"] = float(sum(grad_norms)) / len(grad_norms)
    return metrics
