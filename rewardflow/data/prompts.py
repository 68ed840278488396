"""Prompt files and the grouped prompt sampler.

A prompt file is plain text (one prompt per line; blank lines and lines starting with ``#`` are skipped)
or JSON lines (one object per line with a ``"prompt"`` string; every other key is per-prompt metadata
handed to the reward). ``shapes:train`` and ``shapes:eval`` name the Shapes world's shipped sets.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

# Shipped prompt sets: name -> (package, file). The OCR sets are Flow-GRPO-style text-rendering prompts
# (the target text in double quotes), made from 60 phrases x 8 templates, 64 held out for evaluation.
SHIPPED = {
    "shapes:train": ("rewardflow.shapes", "data/train.jsonl"),
    "shapes:eval": ("rewardflow.shapes", "data/eval.jsonl"),
    "ocr:train": ("rewardflow.data", "ocr_train.txt"),
    "ocr:eval": ("rewardflow.data", "ocr_eval.txt"),
}


@dataclass(frozen=True)
class PromptRecord:
    """A prompt and its metadata (e.g. ``category``)."""

    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)


def resolve_prompt_path(source: str) -> Path:
    """A file path, or the path of a shipped set (``shapes:train``, ``shapes:eval``, ``ocr:train``, ``ocr:eval``)."""
    if source in SHIPPED:
        package, name = SHIPPED[source]
        return Path(str(resources.files(package) / name))
    if source.split(":")[0] in ("shapes", "ocr") and ":" in source:
        raise ValueError(f"prompt set {source!r} is unknown; shipped sets are {', '.join(SHIPPED)}")
    return Path(source)


def load_prompts(source: str) -> list[PromptRecord]:
    """Read a prompt file (.txt or .jsonl) or a shipped set.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds no prompt, or a line is malformed (the message names file and line).
    """
    path = resolve_prompt_path(source)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    records: list[PromptRecord] = []
    jsonl = path.suffix == ".jsonl"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"prompt file {path} is not UTF-8 text (byte {err.start}): give a .txt or .jsonl file"
        ) from err
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or (not jsonl and line.startswith("#")):
            continue
        if not jsonl:
            records.append(PromptRecord(line))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise ValueError(f"{path}:{lineno}: each line must be an object with a non-empty 'prompt' string")
        records.append(PromptRecord(obj["prompt"].strip(), {k: v for k, v in obj.items() if k != "prompt"}))
    if not records:
        raise ValueError(f"prompt file {path} holds no prompts")
    return records


def check_prompts(records: list[PromptRecord], source: str, parse: Any) -> None:
    """Run ``parse`` on every prompt, re-raising its error with the prompt's position in ``source``."""
    for i, rec in enumerate(records, start=1):
        try:
            parse(rec.prompt)
        except ValueError as err:
            raise ValueError(f"{source}: prompt {i}: {err}") from err


class GroupedPromptSampler:
    """Draws ``prompts_per_iter`` prompts per iteration and repeats each ``group_size`` times.

    The draw for iteration ``k`` depends only on (seed, k), so every rank builds the same global batch and a
    resumed run sees the same prompts. Each rank takes a contiguous slice of the ``P * G`` rows; a group may
    span ranks (advantages are computed after gathering rewards).

    ``balance_by`` names a metadata key (e.g. ``"category"``): every value of it is then drawn equally often
    in expectation, whatever its share of the file; empty draws every prompt with equal probability.
    """

    def __init__(
        self,
        records: list[PromptRecord],
        prompts_per_iter: int,
        group_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        balance_by: str = "",
    ) -> None:
        if prompts_per_iter < 1 or group_size < 1:
            raise ValueError(f"prompts_per_iter ({prompts_per_iter}) and group_size ({group_size}) must be >= 1")
        if (prompts_per_iter * group_size) % world_size:
            raise ValueError(
                f"prompts_per_iter x group_size = {prompts_per_iter * group_size} "
                f"must be a multiple of world_size {world_size}"
            )
        self.records, self.p, self.g = records, prompts_per_iter, group_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.weights = None
        if balance_by:
            missing = [i for i, r in enumerate(records, start=1) if balance_by not in r.metadata]
            if missing:
                raise ValueError(
                    f"balance_prompts_by={balance_by!r}, but prompt {missing[0]} (and {len(missing) - 1} more) "
                    f"has no {balance_by!r} metadata; use a JSON-lines prompt file with that key, or leave it empty"
                )
            values = [str(r.metadata[balance_by]) for r in records]
            counts = Counter(values)
            self.weights = np.array([1.0 / (len(counts) * counts[v]) for v in values])

    def global_batch(self, iteration: int) -> tuple[list[PromptRecord], np.ndarray]:
        """All ``P * G`` rows of an iteration and their group ids (0..P-1), groups contiguous."""
        rng = np.random.default_rng([self.seed, iteration])
        n = len(self.records)
        picks = rng.choice(n, size=self.p, replace=n < self.p, p=self.weights)
        rows = [self.records[int(i)] for i in picks for _ in range(self.g)]
        return rows, np.repeat(np.arange(self.p), self.g)

    def batch(self, iteration: int) -> tuple[list[PromptRecord], np.ndarray]:
        """This rank's rows of an iteration and their (global) group ids."""
        rows, groups = self.global_batch(iteration)
        per = len(rows) // self.world_size
        sl = slice(self.rank * per, (self.rank + 1) * per)
        return rows[sl], groups[sl]
