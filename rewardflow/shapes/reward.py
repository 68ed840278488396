"""The Shapes-world judge as a reward, and as the evaluation's judge (per-category accuracy, histograms)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch

from rewardflow.data.prompts import PromptRecord, check_prompts
from rewardflow.shapes.grammar import CATEGORIES, COLORS, SHAPES, parse_prompt
from rewardflow.shapes.judge import Verdict, judge_images
from rewardflow.types import RewardOutput


class ShapesJudgeReward:
    """Partial-credit judge score minus a penalty per unrequested object.

    GenEval's semantics never penalise objects the prompt did not ask for, and a tuned model learns to
    scatter extra shapes (the prototype's single-object prompts went from 0.9 to ~2 detections per image).
    ``extra_object_penalty`` per extra detection (blobs included) removes that incentive; 0 gives the
    plain GenEval-style partial credit. The score can fall below 0.

    Details: ``partial`` (judge score in [0, 1]), ``strict`` and ``clean`` (0/1), ``extra`` (count).
    """

    name = "shapes-judge"

    def __init__(self, extra_object_penalty: float = 0.25) -> None:
        if extra_object_penalty < 0:
            raise ValueError(f"reward.extra_object_penalty must be >= 0, got {extra_object_penalty}")
        self.extra_object_penalty = extra_object_penalty

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        specs = [parse_prompt(p) for p in prompts]
        verdicts = judge_images(specs, images.detach().float().cpu().numpy())
        partial = torch.tensor([v.score for v in verdicts], dtype=torch.float32)
        extra = torch.tensor([v.extra for v in verdicts], dtype=torch.float32)
        return RewardOutput(
            scores=partial - self.extra_object_penalty * extra,
            details={
                "partial": partial,
                "strict": torch.tensor([v.strict for v in verdicts], dtype=torch.float32),
                "clean": torch.tensor([v.clean for v in verdicts], dtype=torch.float32),
                "extra": extra,
            },
        )

    def check_prompts(self, records: list[PromptRecord], source: str) -> None:
        """Every prompt must be in the Shapes grammar (the judge reads what it asks for from the words)."""
        check_prompts(records, source, parse_prompt)

    def report(self, records: list[PromptRecord], images: torch.Tensor, samples_per_prompt: int) -> dict[str, Any]:
        """:func:`summarize` of the judge's verdicts on ``images`` (each record's samples in a row)."""
        prompts = [r.prompt for r in records for _ in range(samples_per_prompt)]
        verdicts = judge_images([parse_prompt(p) for p in prompts], images.float().cpu().numpy())
        return summarize(records, verdicts, samples_per_prompt)


def summarize(records: list[PromptRecord], verdicts: list[Verdict], samples_per_prompt: int) -> dict[str, Any]:
    """The evaluation report (JSON-ready) from one verdict per image, images grouped by prompt record."""
    if len(verdicts) != len(records) * samples_per_prompt:
        raise ValueError(
            f"got {len(verdicts)} verdicts for {len(records)} prompts x {samples_per_prompt} samples; they must match"
        )
    by_cat: dict[str, list[Verdict]] = {}
    held: dict[bool, list[Verdict]] = {True: [], False: []}
    by_pair: dict[str, dict[str, list[bool]]] = {}
    for r, rec in enumerate(records):
        spec = parse_prompt(rec.prompt)
        cat = rec.metadata.get("category") or spec.category
        mine = verdicts[r * samples_per_prompt : (r + 1) * samples_per_prompt]
        by_cat.setdefault(cat, []).extend(mine)
        held[bool(rec.metadata.get("held_out", False))].extend(mine)
        if len(spec.objects) == 2:
            pair = "/".join(sorted(o.shape for o in spec.objects))
            by_pair.setdefault(cat, {}).setdefault(pair, []).extend(v.strict for v in mine)
    cats = [c for c in CATEGORIES if c in by_cat]
    strict = {c: float(np.mean([v.strict for v in by_cat[c]])) for c in cats}
    clean = {c: float(np.mean([v.clean for v in by_cat[c]])) for c in cats}
    detections = [d for v in verdicts for d in v.detections]
    colors = Counter(d.color for d in detections if d.is_object)
    shapes = Counter(d.shape for d in detections if d.is_object)
    return {
        "overall": float(np.mean(list(strict.values()))),
        "categories": strict,
        "clean_overall": float(np.mean(list(clean.values()))),
        "clean_categories": clean,
        "num_prompts": len(records),
        "samples_per_prompt": samples_per_prompt,
        "mean_score": float(np.mean([v.score for v in verdicts])),
        "held_out_strict": float(np.mean([v.strict for v in held[True]])) if held[True] else None,
        "seen_strict": float(np.mean([v.strict for v in held[False]])) if held[False] else None,
        "detections_per_image": {c: float(np.mean([len(v.detections) for v in by_cat[c]])) for c in cats},
        # Strict accuracy of the two-object prompts split by their (unordered) pair of shapes: the shapes the
        # model draws alike fail together, in every category that names two objects.
        "shape_pairs": {
            c: {pair: float(np.mean(ok)) for pair, ok in sorted(by_pair[c].items())} for c in cats if c in by_pair
        },
        "histogram": {
            "colors": {c: colors.get(c, 0) for c in COLORS},
            "shapes": {s: shapes.get(s, 0) for s in SHAPES},
            "blobs": sum(1 for d in detections if not d.is_object),
        },
    }
