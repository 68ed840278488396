"""The reward-hacking rule of the run report: pure functions on the metrics a run records.

:func:`hacking_warnings` is the reward-hacking rule the page shows at its top; docs/report.md explains it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

MIN_REWARD_RISE = 0.02
"""Training reward rise (last quarter of iterations minus first quarter, in reward units) that counts as rising."""
MAX_EVAL_DROP = 0.03
"""How far the last evaluation may sit below the best one (accuracy, 0-1) before a rising reward is suspect."""
MAX_DIVERSITY_DROP = 0.15
"""Relative fall of the evaluation's ``diversity`` from the base (iteration 0) that is flagged (0.15: 15%)."""
MAX_COLOUR_SHARE_RISE = 0.15
"""Rise of one colour's share of an evaluation's detected colours over the base's that is flagged (0.15: 15 points)."""


# ----------------------------------------------------------------------------------------------------------------
# The reward-hacking rule (pure functions on metric lists)


def reward_trend(rewards: Sequence[float]) -> float | None:
    """Mean of the last quarter of ``rewards`` minus the mean of the first quarter (None under two values).

    A quarter is at least one value, so two iterations compare the second with the first.
    """
    values = [float(r) for r in rewards if is_finite_number(r)]
    if len(values) < 2:
        return None
    q = max(1, len(values) // 4)
    return sum(values[-q:]) / q - sum(values[:q]) / q


def hacking_warnings(
    train_rewards: Sequence[float],
    evals: Sequence[tuple[int, float]],
    diversity: Sequence[tuple[int, float]] = (),
    colours: Sequence[tuple[int, dict[str, float]]] = (),
    *,
    score_name: str = "eval strict accuracy",
    min_reward_rise: float = MIN_REWARD_RISE,
    max_eval_drop: float = MAX_EVAL_DROP,
    max_diversity_drop: float = MAX_DIVERSITY_DROP,
    max_colour_share_rise: float = MAX_COLOUR_SHARE_RISE,
) -> list[str]:
    """Warnings (plain sentences; empty when nothing is suspect) about reward hacking in a run.

    Rule 1, reward up and held-out score down: the training reward rose, that is :func:`reward_trend` (mean of
    the last quarter of iterations minus the mean of the first quarter) is at least ``min_reward_rise``
    (default 0.02 reward units), while the last evaluation is below the best evaluation by more than
    ``max_eval_drop`` (default 0.03, i.e. 3 accuracy points) or below the base evaluation (the first one,
    iteration 0) at all. It needs at least two training iterations and two evaluations.

    Rule 2, diversity falling: the last evaluation's diversity is lower than the base's by more than
    ``max_diversity_drop`` of it (default 0.15, i.e. a 15% fall). It is checked whatever the reward did, and
    only when the evaluations carry a diversity value.

    Rule 3, palette collapsing: one colour's share of all colours detected in the last evaluation exceeds its
    share in the base's by more than ``max_colour_share_rise`` (default 0.15, i.e. 15 points). GenEval-style
    judges do not score the colour of objects whose colour the prompt leaves free, so a policy may drift there to
    the colours the detector reads best; pixel diversity barely shows it (docs/results.md). Checked only when
    the evaluations carry a colour histogram.

    Args:
        train_rewards: the mean training reward of each iteration, in order.
        evals: ``(iteration, held-out score)`` of each evaluation, in order; the first is the base.
        diversity: ``(iteration, diversity)`` of each evaluation that has one, in order.
        colours: ``(iteration, {colour: detections})`` of each evaluation that has a colour histogram, in order.
        score_name: what the held-out score is, for the sentences.
        min_reward_rise: see rule 1.
        max_eval_drop: see rule 1.
        max_diversity_drop: see rule 2.
        max_colour_share_rise: see rule 3.
    """
    out: list[str] = []
    rise = reward_trend(train_rewards)
    evals = [(int(i), float(v)) for i, v in evals if is_finite_number(v)]
    if rise is not None and rise >= min_reward_rise and len(evals) >= 2:
        (base_it, base), (last_it, last) = evals[0], evals[-1]
        best_it, best = max(evals, key=lambda e: e[1])
        below_best, below_base = best - last > max_eval_drop, last < base
        if below_best or below_base:
            reasons = []
            if below_best:
                reasons.append(f"{best - last:.3f} below its best ({best:.3f} at iteration {best_it})")
            if below_base:
                reasons.append(f"below the base ({base:.3f} at iteration {base_it})")
            out.append(
                f"Possible reward hacking: the training reward rose by {rise:+.3f} (mean of the last quarter of "
                f"iterations against the first quarter) while the held-out {score_name} ended at {last:.3f} "
                f"(iteration {last_it}), " + " and ".join(reasons) + "."
            )
    diversity = [(int(i), float(v)) for i, v in diversity if is_finite_number(v)]
    if len(diversity) >= 2:
        (base_it, base), (last_it, last) = diversity[0], diversity[-1]
        if base > 0 and (base - last) / base > max_diversity_drop:
            out.append(
                f"Diversity is falling: the evaluation samples' diversity went from {base:.3f} (iteration "
                f"{base_it}) to {last:.3f} (iteration {last_it}), {100 * (base - last) / base:.0f}% lower; "
                f"more than {100 * max_diversity_drop:.0f}% suggests the policy is collapsing onto fewer images."
            )
    shares = [(int(i), _shares(h)) for i, h in colours]
    shares = [(i, h) for i, h in shares if h]
    if len(shares) >= 2:
        (base_it, base), (last_it, last) = shares[0], shares[-1]
        colour = max(last, key=lambda c: last[c] - base.get(c, 0.0))
        was, now = base.get(colour, 0.0), last[colour]
        if now - was > max_colour_share_rise:
            out.append(
                f"The palette is collapsing: {colour} went from {100 * was:.0f}% of the detected colours (iteration "
                f"{base_it}) to {100 * now:.0f}% (iteration {last_it}). Prompts that leave the colour free do not "
                "score it, so the policy may be drifting to the colours the judge reads best; look at the samples."
            )
    return out


def _shares(histogram: dict[str, float]) -> dict[str, float]:
    """Each colour's share of a histogram's detections ({} when it has none)."""
    counts = {str(c): float(n) for c, n in histogram.items() if is_finite_number(n) and n >= 0}
    total = sum(counts.values())
    return {c: n / total for c, n in counts.items()} if total > 0 else {}


def warnings_from_metrics(records: Sequence[dict[str, Any]], **thresholds: float) -> list[str]:
    """:func:`hacking_warnings` on the records of a ``metrics.jsonl`` (iteration and evaluation records)."""
    train, evals = split_records(records)
    name, scores = headline_series(evals)
    diversity = [(e["iteration"], v) for e in evals if (v := scalar_of(e.get("eval/diversity"))) is not None]
    colours = [(e["iteration"], h["colors"]) for e in evals if isinstance(h := e.get("eval/histogram"), dict)
               and isinstance(h.get("colors"), dict)]  # fmt: skip
    return hacking_warnings(
        [t["reward"] for t in train if "reward" in t], scores, diversity, colours, score_name=name, **thresholds
    )


def split_records(records: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training iteration records, evaluation records), each sorted by iteration."""
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    train = [r for r in records if not any(k.startswith("eval/") for k in r)]
    key = lambda r: r.get("iteration", 0)  # noqa: E731
    return sorted(train, key=key), sorted(evals, key=key)


def headline_series(evals: Sequence[dict[str, Any]]) -> tuple[str, list[tuple[int, float]]]:
    """The held-out score the warning follows: strict accuracy when judged, else the first evaluation reward."""
    if evals and all(is_finite_number(e.get("eval/overall")) for e in evals):
        return "eval strict accuracy", [(e["iteration"], e["eval/overall"]) for e in evals]
    names = [n for e in evals for n in (e.get("eval/rewards") or {})]
    if names:
        name = names[0]
        return f"eval {name}", [
            (e["iteration"], e["eval/rewards"][name])
            for e in evals
            if is_finite_number((e.get("eval/rewards") or {}).get(name))
        ]
    return "eval score", []


# ----------------------------------------------------------------------------------------------------------------
# Small helpers


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def scalar_of(value: Any) -> float | None:
    """A number, or the mean of a mapping's numbers (a per-category field), or None."""
    if is_finite_number(value):
        return float(value)
    if isinstance(value, dict):
        nums = [float(v) for v in value.values() if is_finite_number(v)]
        return sum(nums) / len(nums) if nums else None
    return None
