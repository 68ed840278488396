"""Several processes, one run: torch.distributed as torchrun starts it, and the few collectives the loop needs.

``torchrun --nproc_per_node N -m rewardflow.cli train PRESET ...`` (or ``--nnodes`` with a rendezvous for
several machines) starts N processes; :func:`init` joins them (NCCL on GPUs, gloo on CPUs) and a process
started without torchrun is a world of one, where every function here does nothing.

Data parallelism: every rank holds the whole policy and its share of each iteration's rows
(``rewardflow.algorithms.batching.rank_rows``); the gradients are averaged over ranks once per optimizer step
(:func:`average_gradients`, one bucketed all-reduce) rather than by a DistributedDataParallel wrapper, whose
reducer expects one forward per backward: our methods run many forwards per backward (every sampler step of
a direct-gradient method, CFG's two branches, the reference and old policies in between) and toggle LoRA
adapters, and accumulate several micro-batches per optimizer step, which DDP would all-reduce each time.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device_type: str = "cpu", timeout_minutes: float = 60.0) -> World:
    """Join the process group torchrun describes in the environment (a world of one without it).

    The timeout bounds how long a rank waits in a collective for the others (rank 0 writing a checkpoint, a slow
    reward server).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return World(rank, size, local_rank)


def active() -> bool:
    """Whether this process is one of several (a process group of more than one is initialised)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    """Where collective tensors must live: the GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shutdown() -> None:
    """Leave the process group, if any (at the end of a torchrun job)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (a weight sharded by FSDP2)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard(module: torch.nn.Module, bf16: bool) -> None:
    """Shard ``module`` over the ranks with FSDP2: each block of its top-level ModuleLists, then the rest.

    ``bf16``: compute in bfloat16 with float32 gradient reduction (the weights stay as they are).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for child in module.children():
        if isinstance(child, torch.nn.ModuleList):
            for block in child:
                fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)


def reshard(*modules: torch.nn.Module | None) -> None:
    """Put every FSDP2 module of ``modules`` back in its sharded state.

    A forward pass with no backward after it (a rollout, the reference or old policy, an evaluation) leaves
    the root's gathered weights in place; call this before changing the sharded weights outside the optimizer
    (EMA swaps, the old policy's soft update, loading a state), so that the next forward gathers them afresh.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in modules:
        for m in module.modules() if module is not None else ():
            if isinstance(m, FSDPModule):
                m.reshard()


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over ranks (one all-reduce of the flattened gradients).

    Sharded (FSDP2) weights are skipped: their gradients were reduce-scattered, averaged, in the backward pass.
    """
    if not active():
        return
    params = [p for p in params if not is_sharded(p)]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


def gather_rows(local: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``local`` [n, ...] (equal n on every rank), put in global row order.

    ``order`` [world * n] lists the global row index of each gathered row (rank 0's rows first).
    """
    if not active():
        return local
    moved = local.detach().to(_comm_device()).contiguous()
    parts = [torch.empty_like(moved) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, moved)
    out = torch.empty((len(order), *local.shape[1:]), dtype=local.dtype, device=moved.device)
    out[order.to(moved.device)] = torch.cat(parts)
    return out.to(local.device)


def gather_ragged(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``local`` [n_r, ...] (``n_r`` may differ, the other sizes not), in rank order.

    Every rank gets the whole; with one process ``local`` itself.
    """
    if not active():
        return local
    moved = local.detach().to(_comm_device()).contiguous()
    count = torch.tensor([moved.shape[0]], device=moved.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros((longest, *moved.shape[1:]), dtype=moved.dtype, device=moved.device)
    padded[: moved.shape[0]] = moved
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)]).to(local.device)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over ranks (every rank holds the same number of rows, so this is the global mean)."""
    if not active() or not values:
        return values
    keys = list(values)  # the same order on every rank: the same code built the dict
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (e.g. a stop signal that reached one process)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def check_in_step(tensors: list[torch.Tensor], what: str) -> None:
    """Raise unless every rank holds the same ``tensors`` (compared by their float64 sums and sums of squares)."""
    tensors = [t for t in tensors if not is_sharded(t)]  # a sharded weight exists once: nothing to compare
    if not active() or not tensors:
        return
    mine = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()]) for t in tensors]).flatten()
    mine = mine.to(_comm_device())
    lo, hi = mine.clone(), mine.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"the ranks' {what} have diverged (rank {dist.get_rank()}): a bug, please report it")


def barrier() -> None:
    """Wait until every rank is here (nothing to wait for in a world of one)."""
    if active():
        dist.barrier()
