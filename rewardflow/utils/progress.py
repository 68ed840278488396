"""The training bar, with a remaining time that counts what is left honestly.

tqdm's own estimate divides the remaining iterations by the rate seen so far, so the first iterations (torch.compile,
lazy initialisation) and every evaluation inside the loop stretch it: on the Shapes demo it read 5 hours for a run of
30 minutes. Here the iterations and the evaluations are timed apart: the estimate is the mean iteration after the
``warmup`` first ones times the iterations left, plus the images of the evaluations still to come (the full prompt
set, or the subset the intermediate ones use) at the time per image the evaluations took. Until an iteration after
warm-up has been timed the bar says so instead of guessing.
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

    ``images_left(n)``: the evaluation images still to sample once ``n`` iterations are trained. Call :meth:`update`
    when an iteration's update is done, :meth:`evaluated` after each evaluation and :meth:`account` when the
    iteration (with its checkpoint) is over. The bar appears at the first update, after the base model's evaluation.
    """

    def __init__(self, start: int, total: int, images_left: Callable[[int], int], warmup: int = 2,
                 enabled: bool = True) -> None:  # fmt: skip
        self.start, self.n, self.total, self.images_left, self.warmup = start, start, total, images_left, warmup
        self.enabled = enabled
        self.iterations: list[float] = []
        self.evaluations: list[tuple[float, int]] = []  # (seconds, images)
        self.bar: tqdm | None = None

    def seconds_per_image(self) -> float:
        """Of the evaluations so far; the first one (warming up its own shapes) only while it is the only one."""
        timed = self.evaluations[1:] or self.evaluations
        images = sum(n for _, n in timed)
        return sum(t for t, _ in timed) / images if images else 0.0

    def remaining(self) -> float | None:
        """Seconds left (iterations and evaluations), or None until an iteration after warm-up has been timed."""
        steady = self.iterations[self.warmup :]
        if not steady:
            return None
        return (self.total - self.n) * sum(steady) / len(steady) + self.images_left(self.n) * self.seconds_per_image()

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

    def evaluated(self, seconds: float, images: int) -> None:
        """An evaluation of ``images`` images took ``seconds``."""
        self.evaluations.append((seconds, images))

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
