"""Config dataclasses in general: declared ranges and their check, YAML, building from a mapping, comparing two.

Every section of a run (model, reward, sampler, evaluation, each algorithm) is a dataclass whose numeric fields
declare their allowed range in their annotation (:class:`Range`, or an alias such as :data:`Count`); its
``__post_init__`` calls :func:`check_fields`, the one place where ranges and finiteness are checked, and then checks
what spans several fields.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass
from typing import Annotated, Any

import yaml


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric field, declared in its annotation: ``Annotated[float, Range(0, 1)]``.

    ``low`` and ``high`` are inclusive unless ``low_open`` / ``high_open``; None is unbounded. :func:`check_fields`
    enforces them (and finiteness) for every field of a config, in one place.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, x: float) -> bool:
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return self.high is None or (x < self.high if self.high_open else x <= self.high)

    def describe(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


# The ranges most fields need, by name.
Count = Annotated[int, Range(1)]
"""An integer >= 1 (steps, sizes, iterations)."""
Natural = Annotated[int, Range(0)]
"""An integer >= 0 (0 usually meaning "off" or "default")."""
Positive = Annotated[float, Range(0, low_open=True)]
"""A float > 0 (learning rates, clip norms, timeouts)."""
NonNegative = Annotated[float, Range(0)]
"""A float >= 0 (weights of penalty terms, shifts)."""
Fraction = Annotated[float, Range(0, 1, low_open=True)]
"""A float in (0, 1]."""
Probability = Annotated[float, Range(0, 1)]
"""A float in [0, 1]."""
Guidance = Annotated[float, Range(1)]
"""A classifier-free guidance scale, >= 1 (1: no guidance)."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def check_fields(cfg: Any, section: str = "") -> None:
    """Check every field of the config dataclass ``cfg``: floats finite, numbers in their declared :class:`Range`.

    Tuples are checked item by item. The error names ``section.field``, the allowed range and the value. Nested
    sections are checked by their own ``__post_init__``, which calls this with their name.
    """
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            continue
        name = f"{section}.{f.name}" if section else f.name
        ranges = [m for m in getattr(hints.get(f.name), "__metadata__", ()) if isinstance(m, Range)]
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v}")
            for r in ranges:
                if not r.allows(v):
                    raise ValueError(f"{name} must be {r.describe()}, got {v}")


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
