"""The sampler's settings, shared by every section that samples: each algorithm's and the evaluation's.

Each section extends :class:`SamplerConfig` with its own defaults (training rollouts use few steps, the evaluation
more: Flow-GRPO's denoising reduction), so the three fields mean the same everywhere and are checked in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rewardflow.utils.configs import Count, Guidance, NonNegative, check_fields


@dataclass
class SamplerConfig:
    """How a section samples: the number of steps, the grid they are taken on, and the CFG scale."""

    SECTION: ClassVar[str] = "sampler"
    """The section's name in messages (``grpo``, ``eval``, ...)."""
    num_steps: Count = 10
    """Sampler steps (training rollouts use few; the evaluation more)."""
    shift: NonNegative = 0.0
    """The sampling grid: 0 is the model's own (the sigmas its diffusers pipeline samples on for ``num_steps``,
    from the scheduler config in the model folder; the Shapes world's uniform grid shifted by 3 for the tiny DiT);
    > 0 is ``linspace(1, 0, T + 1)`` with this fixed shift for any model (DanceGRPO's grid, shift 3)."""
    guidance_scale: Guidance = 4.5
    """CFG scale in sampling and in the training forward (1.0 = no CFG)."""

    def __post_init__(self) -> None:
        check_fields(self, self.SECTION)
