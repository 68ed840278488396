"""Checkpoint files: safetensors written atomically, read with errors that say what is wrong."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from pickle import UnpicklingError

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file


class IncompatibleState(ValueError):
    """A readable resume state that belongs to another model or LoRA setting (not a damaged file)."""


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` to ``path`` through a temporary file in the same folder, then rename.

    A crash mid-write leaves the previous file intact: nothing already saved is lost.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_safetensors_checked(path: str | Path, expected_format: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file and its metadata, checking its ``format`` entry.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable (truncated, corrupt, not safetensors) or of another format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"checkpoint {path} is not a readable safetensors file ({err})") from err
    found = meta.get("format")
    if found != expected_format:
        raise ValueError(f"checkpoint {path} has format {found!r}, expected {expected_format!r}")
    return tensors, meta


POLICY_FORMAT = "rewardflow-policy"


def save_trainable(named: list[tuple[str, torch.Tensor]], path: str | Path, **metadata: str) -> None:
    """Save the trainable weights (LoRA adapters, or every weight of a full fine-tune) of a policy."""
    save_safetensors_atomic(
        {n: t.detach().float().cpu() for n, t in named}, path, {"format": POLICY_FORMAT, **metadata}
    )


def load_trainable(named: list[tuple[str, torch.Tensor]], path: str | Path) -> dict[str, str]:
    """Copy saved trainable weights into a policy built the same way; returns the file's metadata.

    Raises:
        ValueError: names or shapes differ from the policy's (e.g. LoRA rank or model size mismatch).
    """
    tensors, meta = load_safetensors_checked(path, POLICY_FORMAT)
    own = dict(named)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit this policy: missing {missing[:5]}, unexpected {unexpected[:5]} "
            "(was it trained with another model or LoRA setting?)"
        )
    for name, param in own.items():
        if param.shape != tensors[name].shape:
            raise ValueError(
                f"checkpoint {path}: {name} has shape {tuple(tensors[name].shape)}, policy has {tuple(param.shape)}"
            )
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(tensors[name].to(param.dtype))
    return meta


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_file(path: Path) -> Path:
    """Where the SHA-256 of the resume state ``path`` is kept; the state is complete once it exists."""
    return path.with_name(path.name + ".sha256")


def save_state_atomic(state: dict, path: str | Path) -> None:
    """``torch.save`` a resume state (tensors and plain Python values only), then its SHA-256 beside it.

    Both go through temporary files renamed into place, and the checksum is written last: a state without a
    matching ``.sha256`` (a crash mid-save, a truncated copy, flipped bits) is never taken for a complete one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves no partial file behind
    side = checksum_file(path)
    tmp_side = side.with_name(f".{side.name}.tmp")
    tmp_side.write_text(_sha256(path) + "\n")
    os.replace(tmp_side, side)


def load_state(path: str | Path) -> dict:
    """Read a resume state onto the CPU with ``weights_only=True`` (no arbitrary objects are unpickled).

    Raises:
        ValueError: the state has no checksum (an unfinished save), does not match it, or cannot be read.
    """
    path = Path(path)
    side = checksum_file(path)
    if not side.is_file():
        raise ValueError(f"resume state {path} has no checksum file {side.name}: its save never finished")
    if side.read_text().strip() != _sha256(path):
        raise ValueError(f"resume state {path} does not match its checksum: truncated or corrupted")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, KeyError, UnpicklingError) as err:
        raise ValueError(f"resume state {path} is unreadable ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        raise ValueError(f"resume state {path} is not a mapping")
    return state


def state_files(folder: str | Path) -> list[Path]:
    """The resume states in ``folder``, newest (highest iteration) first.

    ``state_XXXXX.pt`` files, or ``state_XXXXX.dcp`` folders for a sharded model.
    """
    found = [*Path(folder).glob("state_[0-9]*.pt"), *Path(folder).glob("state_[0-9]*.dcp")]
    return sorted(found, key=lambda p: int(p.stem.split("_")[1]), reverse=True)


def prune_states(folder: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest resume states (and their checksums)."""
    import shutil

    for old in state_files(folder)[keep:]:
        if old.is_dir():
            shutil.rmtree(old)
            continue
        checksum_file(old).unlink(missing_ok=True)
        old.unlink(missing_ok=True)


SHARDED_MANIFEST = "manifest.sha256"


def save_sharded_state(state: dict, folder: str | Path, main: bool) -> None:
    """Save a resume state holding FSDP2-sharded tensors with torch.distributed.checkpoint (every rank calls this).

    Each rank writes its shards into a temporary folder; once all have, rank 0 writes the SHA-256 of every
    file into a manifest and renames the folder into place, so a partial folder is never taken for a state.
    """
    import shutil

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    if main and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    dist.barrier()
    if main:
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        (tmp / SHARDED_MANIFEST).write_text("".join(f"{_sha256(p)}  {p.relative_to(tmp)}\n" for p in files))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    dist.barrier()


def load_sharded_state(state: dict, folder: str | Path) -> None:
    """Fill ``state`` (tensors shaped and sharded as saved) from a folder of :func:`save_sharded_state`.

    Raises:
        ValueError: no manifest (an unfinished save), a file missing or differing from it, or unreadable.
    """
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    manifest = folder / SHARDED_MANIFEST
    if not manifest.is_file():
        raise ValueError(f"resume state {folder} has no {SHARDED_MANIFEST}: its save never finished")
    for line in manifest.read_text().splitlines():
        digest, name = line.split("  ", 1)
        if not (folder / name).is_file() or _sha256(folder / name) != digest:
            raise ValueError(f"resume state {folder}: {name} is missing or does not match its checksum")
    try:
        dcp.load(state, checkpoint_id=str(folder))
    except Exception as err:  # DCP raises its own exception types for bad shards
        raise ValueError(f"resume state {folder} is unreadable ({type(err).__name__}: {err})") from err
