"""The training bar, with a remaining time that counts what is left honestly.

tqdm's own estimate divides the remaining iterations by the rate seen so far, so the first iterations (torch.compile,
lazy initialisation) and every evaluation inside the loop stretch it: on the Shapes demo it read 5 hours for a run of
30 minutes. Here the iterations and the evaluations are timed apart: the estimate is the mean iteration after the
``warmup`` first ones times the iterations left, plus each evaluation still to come at the mean time of its kind
(the full prompt set, or the subset the intermediate ones use). Until an iteration after warm-up has been timed the
bar says so instead of guessing.
"""

from __future__ import annotations

from collections.abc import Callable

from tqdm import tqdm


def clock(seconds: float) -> str:
    """``H:MM:SS`` (or ``M:SS`` under an hour)."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class TrainProgress:
    """Iterations done / total and the remaining time, for the loop of :mod:`rewardflow.train`.

    ``evals_left(n)``: the evaluations still to come once ``n`` iterations are trained, as ``(full, subset)`` counts.
    Call :meth:`update` when an iteration's update is done, :meth:`evaluated` after each evaluation and
    :meth:`account` when the iteration (with its checkpoint) is over. The bar appears at the first update, after the
    evaluation of the base model.
    """

    def __init__(self, start: int, total: int, evals_left: Callable[[int], tuple[int, int]], warmup: int = 2,
                 enabled: bool = True) -> None:  # fmt: skip
        self.start, self.n, self.total, self.evals_left, self.warmup = start, start, total, evals_left, warmup
        self.enabled = enabled
        self.iterations: list[float] = []
        self.eval_times: dict[bool, list[float]] = {True: [], False: []}  # by "on the subset"
        self.bar: tqdm | None = None

    def remaining(self) -> float | None:
        """Seconds left (iterations and evaluations), or None until an iteration after warm-up has been timed."""
        steady = self.iterations[self.warmup :]
        if not steady:
            return None
        full, subset = self.evals_left(self.n)
        full_time = _mean(self.eval_times[False]) or 0.0
        subset_time = _mean(self.eval_times[True]) or full_time
        return (self.total - self.n) * sum(steady) / len(steady) + full * full_time + subset * subset_time

    def update(self, shown: dict[str, str]) -> None:
        """One more iteration's update done: advance the bar and show ``shown`` with the remaining time."""
        if self.bar is None:
            layout = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
            self.bar = tqdm(total=self.total, initial=self.start, desc="train", dynamic_ncols=True,
                            disable=not self.enabled, bar_format=layout)  # fmt: skip
        self.n += 1
        left = self.remaining()
        eta = "ETA after warm-up" if left is None else f"ETA {clock(left)}"
        self.bar.set_postfix_str(", ".join([*(f"{k}={v}" for k, v in shown.items()), eta]), refresh=False)
        self.bar.update(1)

    def evaluated(self, seconds: float, subset: bool) -> None:
        """An evaluation took ``seconds`` (``subset``: on the intermediate evaluations' subset of prompts)."""
        self.eval_times[subset].append(seconds)

    def account(self, seconds: float) -> None:
        """An iteration took ``seconds``, its evaluation left out."""
        self.iterations.append(seconds)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.enabled = False


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def phase(desc: str, total: int, enabled: bool = True, unit: str = "img") -> tqdm:
    """A bar for one phase (an evaluation's images), gone when it ends; the phase's result is logged after it."""
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, disable=not enabled)
