"""Config dataclasses in general: finiteness, YAML, building from a mapping, and comparing two of them.

Every section of a run (model, reward, evaluation, each algorithm) is a dataclass that checks its own ranges in
``__post_init__``; these helpers work on any of them, and on the composed run config.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import yaml


def check_finite(cfg: Any, where: str = "") -> None:
    """Refuse NaN and infinity in every float field of ``cfg`` and its sections (tuples included), naming the field.

    A range check like ``x <= 0`` is false for NaN, so without this a NaN would pass them all.
    """
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), f"{where}.{f.name}".lstrip(".")
        if dataclasses.is_dataclass(value):
            check_finite(value, name)
            continue
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v}")


def to_yaml(cfg: Any) -> str:
    """A config dataclass as YAML (the run folder's ``config.yaml``)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def from_dict(cls: Any, raw: Any, where: str = "") -> Any:
    """An instance of the config dataclass ``cls`` from a mapping (parsed YAML), its sections built recursively.

    Unknown fields raise naming the section (``where``) and the allowed fields; every ``__post_init__`` check runs.
    """
    if not dataclasses.is_dataclass(cls):
        return tuple(raw) if isinstance(raw, list) else raw
    if not isinstance(raw, dict):
        raise ValueError(f"config section {where or 'root'} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"config section {where or 'root'} has unknown fields {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, value in raw.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        sub = type(default) if dataclasses.is_dataclass(default) else None
        # YAML has no tuples: a list read back for a tuple field becomes a tuple again.
        kwargs[name] = from_dict(sub, value, f"{where}.{name}".strip(".")) if sub else from_dict(None, value, "")
    return cls(**kwargs)


def config_differences(a: Any, b: Any, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted names of the fields whose values differ between two configs (dataclasses of the same kind)."""

    def flat(obj: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(obj, dict):
            return {k2: v2 for k, v in obj.items() for k2, v2 in flat(v, f"{prefix}{k}.").items()}
        return {prefix.rstrip("."): obj}

    fa, fb = flat(dataclasses.asdict(a)), flat(dataclasses.asdict(b))
    return sorted(k for k in fa.keys() | fb.keys() if k not in ignore and fa.get(k) != fb.get(k))
