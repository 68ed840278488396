"""The run folder: its identity, what it saves to continue exactly, and how a run stops.

``check_run_dir`` / ``write_run_header`` guard and start a folder (a resumed run must keep its config);
``save`` / ``save_sharded`` write a run's EMA export and resume state (``save_all``: with the diffusers export, one
message on a failed write); ``resume_from_newest`` loads the newest
complete one, skipping damaged ones; ``StopSignals`` turns SIGTERM / SIGINT into a checkpoint and a clean stop
(:class:`TrainingStopped`). docs/distributed.md describes the files and the guarantees.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException

import rewardflow
from rewardflow.algorithms.base import Algorithm, Tools
from rewardflow.config import TrainConfig, read_run_config, to_yaml
from rewardflow.export import exportable, write_export
from rewardflow.models.protocol import FlowPolicy
from rewardflow.utils import distributed
from rewardflow.utils.checkpoint import (
    IncompatibleState,
    load_sharded_state,
    load_state,
    prune_states,
    save_sharded_state,
    save_state_atomic,
    save_trainable,
    state_files,
)
from rewardflow.utils.configs import config_differences
from rewardflow.utils.ema import EMA
from rewardflow.utils.errors import RunFailed
from rewardflow.utils.logging import git_commit

log = logging.getLogger(__name__)


def check_run_dir(cfg: TrainConfig, resume: bool) -> Path:
    """Validate the run folder without writing: fresh runs need an empty folder, resumes a matching config."""
    run = Path(cfg.run_dir)
    if run.exists() and not run.is_dir():
        raise FileExistsError(f"run folder {run} is a file; pick another --run-dir")
    if not resume:
        if run.exists() and any(run.iterdir()):
            raise FileExistsError(f"run folder {run} is not empty; pick another --run-dir or pass --resume")
        return run
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"cannot resume: {run / 'config.yaml'} does not exist")
    # Where it runs (its folder, its device, its reward servers and how long to wait for them), how long, and how
    # often it is evaluated on the way are not part of a run's identity: a run folder may be moved, a GPU run resumed
    # on a CPU and extended, a server move; none of them changes a training step.
    saved = read_run_config(run)
    ignore = ("run_dir", "iterations", "eval_every", "eval.subset_every", "model.device", "threads", "trackers",
              "wandb_project", "wandb_mode",
              "reward.device", "reward.remote_url", "reward.vlm_url", "reward.remote_timeout", "reward.remote_retries",
              "reward.remote_backoff")  # fmt: skip
    differ = config_differences(saved, cfg, ignore=ignore)
    if differ:
        hint = ""
        if any(f.endswith(("micro_batch", "optimizer_steps")) or f == "prompts_per_iter" for f in differ):
            hint = (
                " (the batch geometry is fitted to the number of processes, TrainConfig.for_world: resume with as "
                "many as the run started with)"
            )
        raise ValueError(f"cannot resume {run}: these fields differ from its config.yaml: {', '.join(differ)}{hint}")
    return run


def write_run_header(cfg: TrainConfig, run: Path, resume: bool, preset: str = "") -> None:
    """The resolved config, the folders, and (for a new run) the package version, git commit and preset name."""
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "samples").mkdir(exist_ok=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    if resume and (run / "meta.json").exists():
        return
    meta = {"rewardflow_version": rewardflow.__version__, "git_commit": git_commit(), "torch": torch.__version__,
            "preset": preset}  # fmt: skip
    (run / "meta.json").write_text(json.dumps(meta, indent=2))


def save(method: Algorithm, policy: FlowPolicy, optimizer: torch.optim.Optimizer, ema: EMA, run: Path,
         iteration: int, keep: int) -> None:  # fmt: skip
    """EMA weights for use (``checkpoints/iter_XXXXX.safetensors``) and a resume state (the newest ``keep``).

    Rank 0 alone, except for a sharded model (``model.fsdp``), where every rank calls it (:func:`save_sharded`).
    """
    with ema.swapped():
        save_trainable(
            list(policy.named_trainable_state()),
            run / "checkpoints" / f"iter_{iteration:05d}.safetensors",
            iteration=str(iteration),
            weights="ema",
        )
    state = {
        "iteration": iteration,
        "trainable": {n: p.detach().clone() for n, p in policy.named_trainable_state()},
        "optimizer": optimizer.state_dict(),
        "ema": ema.state_dict(),
    }
    for key, tensors in method.state(policy).items():
        state[key] = {n: t.detach().clone() for n, t in tensors.items()}
    save_state_atomic(state, run / "checkpoints" / f"state_{iteration:05d}.pt")
    prune_states(run / "checkpoints", keep)


def _sharded_state(method: Algorithm, policy: FlowPolicy, optimizer: torch.optim.Optimizer, ema: EMA) -> dict:
    """The resume state of a sharded model as torch.distributed.checkpoint wants it (the live tensors)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    names = [n for n, _ in policy.named_trainable_state()]
    state = {
        "iteration": torch.zeros((), dtype=torch.int64),
        "model": get_model_state_dict(policy.module),
        "optimizer": get_optimizer_state_dict(policy.module, optimizer),
        "ema": dict(zip(names, ema.shadow)),
        "ema_counts": torch.tensor([ema.calls, ema.updates], dtype=torch.int64),
    }
    return {**state, **method.state(policy)}


def save_sharded(method: Algorithm, policy: FlowPolicy, optimizer: torch.optim.Optimizer, ema: EMA, run: Path,
                 iteration: int, keep: int, main: bool) -> dict[str, torch.Tensor]:  # fmt: skip
    """:func:`save` for a sharded model: every rank writes its shards; rank 0 gathers the EMA export.

    Returns the network's whole EMA state dict on rank 0 (on the CPU; empty on the other ranks).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    with ema.swapped():
        full = get_model_state_dict(policy.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if main:
        names = [n for n, _ in policy.named_trainable_state()]
        save_trainable([(n, full[n]) for n in names], run / "checkpoints" / f"iter_{iteration:05d}.safetensors",
                       iteration=str(iteration), weights="ema")  # fmt: skip
    distributed.reshard(*policy.weights.networks())
    state = _sharded_state(method, policy, optimizer, ema)
    state["iteration"].fill_(iteration)
    save_sharded_state(state, run / "checkpoints" / f"state_{iteration:05d}.dcp", main)
    if main:
        prune_states(run / "checkpoints", keep)
    return full if main else {}


def restore_sharded(method: Algorithm, policy: FlowPolicy, optimizer: torch.optim.Optimizer, ema: EMA,
                    path: Path) -> int:  # fmt: skip
    """Load a sharded resume state into the live (sharded) weights, optimizer, EMA and old policy."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    distributed.reshard(*policy.weights.networks())
    state = _sharded_state(method, policy, optimizer, ema)
    load_sharded_state(state, path)
    set_model_state_dict(policy.module, state["model"])
    set_optimizer_state_dict(policy.module, optimizer, state["optimizer"])
    ema.calls, ema.updates = (int(v) for v in state["ema_counts"])
    return int(state["iteration"])


def resume_from_newest(method: Algorithm, policy: FlowPolicy, optimizer: torch.optim.Optimizer, ema: EMA,
                       run: Path, sharded: bool) -> int | None:  # fmt: skip
    """Load the newest complete resume state of a run, skipping (and reporting) damaged ones.

    Returns its iteration, or None when the run has no complete state.
    """
    for path in state_files(run / "checkpoints"):
        if path.is_dir() != sharded:
            raise ValueError(f"resume state {path} was saved {'un' if sharded else ''}sharded: resume with the "
                             "model.fsdp setting and number of processes it was saved with")  # fmt: skip
        try:
            if sharded:
                return restore_sharded(method, policy, optimizer, ema, path)
            return restore(method, policy, optimizer, ema, load_state(path), path)
        except IncompatibleState:
            raise  # another model or LoRA setting: an older state would not fit either
        except ValueError as err:  # damaged: the previous state may be whole
            log.warning("%s; trying the previous checkpoint", err)
    return None


def restore(method: Algorithm, policy: FlowPolicy, optimizer: torch.optim.Optimizer, ema: EMA, state: dict,
            path: Path) -> int:  # fmt: skip
    """Load a resume state into the policy, optimizer and EMA (and the old policy); returns its iteration."""
    own = dict(policy.named_trainable_state())
    if set(state["trainable"]) != set(own):
        raise IncompatibleState(f"resume state {path} does not hold this policy's trainable weights")
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            own[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    ema.load_state_dict(state["ema"])
    method.load_state(policy, state, str(path))
    return int(state["iteration"])


class TrainingStopped(Exception):
    """A stop signal (SIGTERM, SIGINT) ended training after saving a checkpoint; ``--resume`` continues it."""

    def __init__(self, signum: int, iteration: int, run: Path) -> None:
        self.signum, self.iteration, self.run = signum, iteration, run
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped after iteration {iteration} with a checkpoint; "
                         f"continue with --run-dir {run} --resume")  # fmt: skip


class StopSignals:
    """Remembers SIGTERM / SIGINT instead of dying mid-update; the loop saves and stops at the iteration's end.

    A second signal stops at once (KeyboardInterrupt), except while a checkpoint is being written (:meth:`saving`):
    the save finishes first, so the folder never holds half a checkpoint that a later signal cut short.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._saving = False
        self._again = False

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Within this context a second signal waits for the end of the save, then stops (KeyboardInterrupt)."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False
        if self._again:
            raise KeyboardInterrupt

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and self._saving:
            log.warning("%s received again: the checkpoint is being written; stopping once it is",
                        signal.Signals(signum).name)  # fmt: skip
            self._again = True
            return
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signum
        log.warning("%s received: saving a checkpoint at the end of this iteration", signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# What a failed write raises: the OS (a full disk), torch.save's stream writer, safetensors, torch.distributed's
# checkpoint (which gathers the ranks' errors).
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError, CheckpointException)


def save_all(cfg: TrainConfig, method: Algorithm, tools: Tools, run: Path, done: int, world: distributed.World,
             sharded: bool) -> None:  # fmt: skip
    """The checkpoint of iteration ``done``: EMA weights, resume state, and for a diffusers model its export.

    Every file is written beside its name and moved into place, so a failed write (a full disk) leaves the previous
    checkpoint whole; the failure is one message naming the folder.
    """
    policy, optimizer, ema = tools.policy, tools.optimizer, tools.ema
    try:
        if sharded:
            full = save_sharded(method, policy, optimizer, ema, run, done, cfg.keep_checkpoints, world.main)
            if world.main and exportable(cfg):  # the EMA weights as a plain pipeline loads them
                write_export(policy, cfg, run, done, run / "diffusers", state=full)
        elif world.main:
            save(method, policy, optimizer, ema, run, done, cfg.keep_checkpoints)
            if exportable(cfg):
                with ema.swapped():
                    write_export(policy, cfg, run, done, run / "diffusers")
    except WRITE_ERRORS as err:
        why = getattr(err, "strerror", None) or str(err).splitlines()[0]
        raise RunFailed(
            f"could not write the checkpoint of iteration {done} in {run}: {why}; the checkpoints saved before it "
            "are intact (free space, then --resume)"
        ) from err
