"""Prompt sets of the Shapes world: random prompts per category, and the fixed train / evaluation split.

Held-out combinations (never in the training set, present in the evaluation set) make RL gains on the
evaluation set a measure of generalisation:

- colour-shape pairs ``HELD_OUT_PAIRS`` (in ``colors`` and ``color_attr``),
- ordered (shape, relation, shape) triples ``HELD_OUT_TRIPLES`` (in ``position``),
- count-shape pairs ``HELD_OUT_COUNTS`` (in ``counting``).

``single_object`` and ``two_object`` have only 3 and 6 distinct prompts, so their 30-prompt evaluation lists
repeat prompts (each repeat gets its own seeds).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from rewardflow.shapes.grammar import CATEGORIES, COLORS, NUMBERS, RELATIONS, SHAPES, ObjectSpec, PromptSpec

HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("yellow", "circle"), ("purple", "triangle"), ("green", "square")}
)
HELD_OUT_TRIPLES: frozenset[tuple[str, str, str]] = frozenset(
    {("triangle", "above", "circle"), ("square", "right of", "triangle"), ("circle", "below", "square")}
)
HELD_OUT_COUNTS: frozenset[tuple[int, str]] = frozenset({(4, "triangle")})
EVAL_PROMPTS_PER_CATEGORY = 30
# Flow-GRPO's GenEval training mix, position : counting : attr : colors : two : single = 7:5:3:1:1:0, with
# single_object given a small share so that every category is seen.
TRAIN_MIX: dict[str, int] = {
    "position": 7,
    "counting": 5,
    "color_attr": 3,
    "colors": 1,
    "two_object": 1,
    "single_object": 1,
}


def all_prompts(category: str) -> list[PromptSpec]:
    """Every prompt of a category (colours distinct within color_attr, shapes distinct in two-object ones)."""
    one = ObjectSpec
    if category == "single_object":
        return [PromptSpec((one(s),)) for s in SHAPES]
    if category == "colors":
        return [PromptSpec((one(s, c),)) for c in COLORS for s in SHAPES]
    if category == "counting":
        return [PromptSpec((one(s, None, n, True),)) for n in NUMBERS.values() for s in SHAPES]
    pairs = [(a, b) for a, b in itertools.permutations(SHAPES, 2)]
    if category == "two_object":
        return [PromptSpec((one(a), one(b))) for a, b in pairs]
    if category == "position":
        return [PromptSpec((one(a), one(b)), r) for a, b in pairs for r in RELATIONS]
    if category == "color_attr":
        return [PromptSpec((one(a, ca), one(b, cb))) for a, b in pairs for ca, cb in itertools.permutations(COLORS, 2)]
    raise ValueError(f"category {category!r} is not one of {', '.join(CATEGORIES)}")


def is_held_out(spec: PromptSpec) -> bool:
    """Whether a prompt uses a combination reserved for evaluation."""
    if any((o.color, o.shape) in HELD_OUT_PAIRS for o in spec.objects):
        return True
    if spec.relation and (spec.objects[0].shape, spec.relation, spec.objects[1].shape) in HELD_OUT_TRIPLES:
        return True
    return any(o.exact and (o.count, o.shape) in HELD_OUT_COUNTS for o in spec.objects)


def random_prompt(rng: np.random.Generator, category: str | None = None) -> PromptSpec:
    """A uniformly drawn prompt of a category (or of a uniformly drawn category)."""
    if category is None:
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    options = all_prompts(category)
    return options[int(rng.integers(len(options)))]


def eval_prompts(seed: int = 0) -> list[PromptSpec]:
    """The fixed evaluation set: 30 prompts per category, every held-out combination included."""
    rng = np.random.default_rng(seed)
    out: list[PromptSpec] = []
    for category in CATEGORIES:
        options = all_prompts(category)
        held = [p for p in options if is_held_out(p)]
        seen = [p for p in options if not is_held_out(p)]
        if len(options) <= EVAL_PROMPTS_PER_CATEGORY:
            chosen = list(itertools.islice(itertools.cycle(options), EVAL_PROMPTS_PER_CATEGORY))
        else:
            n_held = min(len(held), EVAL_PROMPTS_PER_CATEGORY // 3)
            picks_held = rng.choice(len(held), size=n_held, replace=False)
            picks_seen = rng.choice(len(seen), size=EVAL_PROMPTS_PER_CATEGORY - n_held, replace=False)
            chosen = [held[i] for i in sorted(picks_held)] + [seen[i] for i in sorted(picks_seen)]
        out.extend(chosen)
    return out


def train_prompts() -> list[PromptSpec]:
    """The training set: every non-held-out prompt, repeated per category to follow ``TRAIN_MIX``.

    Categories have very different sizes (3 single-object prompts, 150+ colour-binding ones), so each
    category's prompts are repeated until its share of the list is close to its mix weight.
    """
    pools = {c: [p for p in all_prompts(c) if not is_held_out(p)] for c in CATEGORIES}
    unit = max(len(pools[c]) / TRAIN_MIX[c] for c in CATEGORIES)
    out: list[PromptSpec] = []
    for category in CATEGORIES:
        pool = pools[category]
        target = int(round(unit * TRAIN_MIX[category]))
        out.extend(itertools.islice(itertools.cycle(pool), max(target, len(pool))))
    return out


def prompt_file_lines(specs: list[PromptSpec]) -> list[str]:
    """JSON lines for a prompt file: prompt, category and whether it is a held-out combination."""
    return [
        json.dumps({"prompt": s.text, "category": s.category, "held_out": is_held_out(s)}, sort_keys=True)
        for s in specs
    ]


def write_shipped_prompt_files(folder: str | Path) -> None:
    """(Re)write ``train.jsonl`` and ``eval.jsonl`` (what ships in ``rewardflow/shapes/data``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("\n".join(prompt_file_lines(train_prompts())) + "\n")
    (folder / "eval.jsonl").write_text("\n".join(prompt_file_lines(eval_prompts())) + "\n")
