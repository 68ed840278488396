"""Direct reward gradients through sampling: DRaFT (full, -K, -LV), ReFL and AlignProp.

Papers: Clark et al., "Directly Fine-Tuning Diffusion Models on Differentiable Rewards" (DRaFT, arXiv
2309.17400); Xu et al., ImageReward (ReFL, arXiv 2304.05977); Prabhudesai et al., AlignProp (arXiv
2310.03739); ported to rectified flows with deterministic Euler sampling.

Every method samples with the Euler ODE, lets the reward's gradient reach the model through some steps
(:mod:`rewardflow.sampling.grad`) and minimises ``-r`` (or a hinge ``relu(margin - r)``):

- ``draft``: the last ``k`` steps carry gradient, through the model and the latent chain between them;
  ``k = num_steps`` is full backprop (DRaFT), ``k = 1`` is DRaFT-1.
- ``draft-lv``: DRaFT-LV. The sample is drawn without gradient, re-noised ``lv_samples`` times to the last
  grid sigma and denoised in one step with gradient each; with ``lv_include_base`` the ordinary last step is
  one more term (FlowBP's choice; the SD reimplementations keep only the re-noised terms).
- ``refl``: ReFL. Sampling stops at a random step among the last ``refl_last``; the reward is computed on that
  step's one-step clean prediction ``x - sigma v``, with one model call's gradient.
- ``alignprop``: AlignProp's randomised truncation: the first grad-carrying step is drawn uniformly in
  ``[alignprop_min, num_steps)`` each micro-batch (a random K).

Every model call that carries gradient is checkpointed (``checkpointing``), so memory grows with the number
of such steps by one latent each, not by one network's activations. The reward must be differentiable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from rewardflow.algorithms.direct import DirectConfig, Gen, MicroBatchLoss, bind_velocity, register_direct, reward_loss
from rewardflow.models.protocol import Conditioning, FlowPolicy
from rewardflow.rewards.protocol import RewardFn
from rewardflow.sampling.grad import Velocity, renoised_last_step, stopped_euler, truncated_euler
from rewardflow.utils.configs import Count, Natural

METHODS = ("draft", "draft-lv", "refl", "alignprop")


@dataclass
class DraftConfig(DirectConfig):
    """Settings of the DRaFT family (defaults: DRaFT-1 scaled to the Shapes world)."""

    SECTION = "draft"
    method: Literal["draft", "draft-lv", "refl", "alignprop"] = "draft"
    k: Count = 1
    """``draft``: how many of the last steps carry gradient (``num_steps``: full backprop)."""
    lv_samples: Count = 2
    """``draft-lv``: re-noised gradient samples per image (DRaFT uses 2)."""
    lv_include_base: bool = True
    """``draft-lv``: also train the ordinary last step of the real trajectory."""
    refl_last: Count = 5
    """``refl``: the stop step is drawn among the last this many steps (ImageReward: the last 10 of 40)."""
    alignprop_min: Natural = 10
    """``alignprop``: the first grad-carrying step is drawn in ``[alignprop_min, num_steps)``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"draft.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        # The fields of the chosen method must fit the grid (the others are not used).
        m, steps = self.method, self.num_steps
        if m == "draft" and not 1 <= self.k <= steps:
            raise ValueError(f"draft.k must be in [1, draft.num_steps = {steps}], got {self.k}")
        if m == "refl" and not 1 <= self.refl_last <= steps:
            raise ValueError(f"draft.refl_last must be in [1, draft.num_steps = {steps}], got {self.refl_last}")
        if m == "alignprop" and not 0 <= self.alignprop_min < steps:
            raise ValueError(
                f"draft.alignprop_min must be in [0, draft.num_steps = {steps}), got {self.alignprop_min}"
            )

    def sample(
        self,
        velocity: Velocity,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        generator: torch.Generator | None,
        choices: torch.Generator | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The samples whose rewards make one micro-batch's loss, and the real sample of its trajectory.

        Each scored sample carries its method's gradient path; the real sample is detached (it is what the judge
        monitors and the sample grids show). ``generator`` draws noise (DRaFT-LV's), ``choices`` the steps
        (AlignProp's truncation, ReFL's stop; ``generator`` when None).
        """
        choices = generator if choices is None else choices
        steps = self.num_steps
        if self.method in ("draft", "alignprop"):
            start = steps - self.k
            if self.method == "alignprop":
                start = int(torch.randint(self.alignprop_min, steps, (1,), generator=choices))
            x0 = truncated_euler(velocity, x, sigmas, grad_from=start)
            return [x0], x0.detach()
        if self.method == "refl":
            stop = int(torch.randint(steps - self.refl_last, steps, (1,), generator=choices))
            prediction, real = stopped_euler(velocity, x, sigmas, stop)
            return [prediction], real
        last = truncated_euler(velocity, x, sigmas, grad_from=steps - 1)  # the real sample, last step with grad
        extra = renoised_last_step(velocity, last, float(sigmas[-2]), self.lv_samples, generator)
        return ([last, *extra] if self.lv_include_base else extra), last.detach()

    def describe(self) -> str:
        return f"{self.method} through {self.num_steps} Euler steps"


def draft_loss(reward_fn: RewardFn, cfg: DraftConfig) -> MicroBatchLoss:
    """The per-micro-batch loss of ``cfg.method``: mean over images and gradient samples of the reward loss.

    The logged reward is that of the first scored sample: the real one, except for ReFL (its clean
    prediction) and DRaFT-LV without the base term (a re-noised one).
    """

    def loss_fn(policy: FlowPolicy, cond: Conditioning, metadata: list[dict], generator: Gen, choices: Gen):
        velocity = bind_velocity(policy, cond, cfg.guidance_scale, cfg.checkpointing)
        sigmas = policy.schedule(cfg.num_steps, cfg.shift)
        x = policy.noise(len(cond), generator, float(sigmas[0]))
        samples, real = cfg.sample(velocity, x, sigmas, generator, choices)
        outs = [reward_fn(policy.decode(x), cond.prompts, metadata) for x in samples]
        loss = torch.stack([reward_loss(o.scores, cfg.hinge).mean() for o in outs]).mean()
        return loss, real, outs[0], {}

    return loss_fn


register_direct("draft", DraftConfig, draft_loss)
