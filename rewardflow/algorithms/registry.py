"""Every algorithm of this package, found by importing its modules (each registers itself with ``register``).

Adding an algorithm is adding a module here: nothing else names it (docs/guides/adding-an-algorithm.md).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import rewardflow.algorithms as package
from rewardflow.algorithms.base import REGISTERED, Algorithm, Registered

DEFAULT = "grpo"
"""The algorithm of a run that names none (Flow-GRPO, the Shapes demo's)."""


def _discover() -> dict[str, Registered]:
    for module in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
        importlib.import_module(f"{package.__name__}.{module}")
    # Flow-GRPO first (the default), then by name: the order of the CLI's choices and of a run's config.yaml.
    return {n: REGISTERED[n] for n in sorted(REGISTERED, key=lambda n: (n != DEFAULT, n))}


ALGORITHMS: dict[str, Registered] = _discover()


def build(name: str, section: Any) -> Algorithm:
    """The algorithm ``name`` built from its config section; an unknown name raises, listing the known ones."""
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {name!r}")
    return ALGORITHMS[name].build(section)
