"""Which steps of a rollout are stochastic: all but the last, or a window (Flow-GRPO-Fast) that may move (MixGRPO).

Steps outside the window are deterministic Euler steps (noise level 0): they are sampled but never trained, so a
narrow window trains fewer, chosen steps per rollout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SDEWindow:
    """A window of ``width`` SDE steps inside the steps ``[lo, hi)``, placed anew for each iteration.

    ``schedule`` "random" draws its place uniformly; "progressive" (MixGRPO) stays ``iters`` iterations at each
    place, moving by ``stride`` steps and rolling back to the start after the last place; "decay" shortens the stay
    linearly from ``iters`` to ``iters_min`` over one sweep. ``width`` 0: no window (every step but the last).
    """

    width: int
    lo: int
    hi: int
    schedule: str = "random"
    stride: int = 1
    iters: int = 1
    iters_min: int = 1

    def start(self, iteration: int, generator: torch.Generator | None = None) -> int:
        """The window's first step at ``iteration`` (random draws come from ``generator``)."""
        places = self.hi - self.width - self.lo + 1
        if self.schedule == "random":
            # No draw when the window has one place: a window over all steps replays plain Flow-GRPO exactly.
            return self.lo + (int(torch.randint(places, (1,), generator=generator)) if places > 1 else 0)
        positions = (places - 1) // self.stride + 1
        if self.schedule == "progressive":
            stays = [self.iters] * positions
        else:
            span = self.iters - self.iters_min
            stays = [round(self.iters - span * p / max(1, positions - 1)) for p in range(positions)]
        t = iteration % sum(stays)  # after the last position the window rolls back to the first
        p = 0
        while t >= stays[p]:
            t -= stays[p]
            p += 1
        return self.lo + p * self.stride

    def levels(self, num_steps: int, noise_level: float, iteration: int = 0,
               generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
        """The noise level of each of ``num_steps`` steps [T] for one rollout.

        ``noise_level`` inside the window (or on every step but the last without one), 0 elsewhere.
        """
        levels = torch.full((num_steps,), float(noise_level))
        levels[-1] = 0.0
        if self.width:
            start = self.start(iteration, generator)
            levels[:start] = 0.0
            levels[start + self.width :] = 0.0
        return levels
