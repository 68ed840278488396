"""Named, complete training configurations. Each function returns a fresh TrainConfig."""

from __future__ import annotations

from collections.abc import Callable

from rewardflow.algorithms.grpo import GRPOConfig
from rewardflow.config import ModelConfig, OptimConfig, TrainConfig
from rewardflow.evaluate import EvalConfig


def shapes_grpo_cpu() -> TrainConfig:
    """Flow-GRPO on the shipped Shapes base, sized for 2 CPU cores and 20 minutes (the README demo).

    Full fine-tune at lr 5e-5: the prototype found that the papers' LoRA rate (3e-4) destroys a full
    fine-tune of a tiny model and 2e-4 degrades it; here 1e-4 lost 2-6 points within 25 iterations
    (docs/results.md). 16 prompts x 8 images per iteration, CFG 4.5, a = 0.7, 10 rollout steps (9 trained),
    clip 1e-4. Two changes from the paper's GenEval run, both for wall-clock on 2 cores: no KL term
    (beta 0 skips the reference forward, ~20% of an iteration; the KL to the base is still measured by the
    benchmark) and 4 optimizer steps per iteration instead of 2. Without the KL anchor the accuracy peaks
    near iteration 60 and then collapses, so do not run this preset much longer (use ``shapes_grpo``).
    Training prompts are drawn category-balanced, like the evaluation set, instead of by their share of the
    file (39% position).
    """
    return TrainConfig(
        run_dir="runs/shapes_grpo_cpu",
        iterations=60,
        prompts_per_iter=16,
        group_size=8,
        balance_prompts_by="category",
        save_every=30,
        # Flow-GRPO folds the EMA in every 8 optimizer steps over thousands of steps; a run of a few hundred
        # steps needs every step, or the evaluated weights lag far behind the trained ones.
        ema_every=1,
        model=ModelConfig(checkpoint="base", lora_rank=0, autocast=True),
        optim=OptimConfig(lr=5e-5),
        grpo=GRPOConfig(micro_batch=32, optimizer_steps=4, kl_beta=0.0),
        eval=EvalConfig(samples_per_prompt=4),
    )


def shapes_grpo() -> TrainConfig:
    """The longer Flow-GRPO run (180 iterations, about an hour on 2 CPU cores), with the paper's KL.

    ``shapes_grpo_cpu`` continued to 180 iterations without a KL term peaked at iteration 60 (+5.1 points)
    and then collapsed (0.467 strict at 180, greens and blues gone, counting halved; docs/results.md). This
    preset therefore keeps the paper's anchor: code-form KL with beta 0.04 and 2 optimizer steps per
    iteration. Its full 180-iteration result is not measured yet (docs/results.md has what was).
    """
    cfg = shapes_grpo_cpu()
    cfg.run_dir = "runs/shapes_grpo"
    cfg.iterations = 180
    cfg.eval_every = 30
    cfg.grpo = GRPOConfig(micro_batch=32, optimizer_steps=2, kl_beta=0.04)
    return cfg


def shapes_grpo_smoke() -> TrainConfig:
    """Two tiny iterations with a tiny evaluation: checks the whole pipeline in about a minute."""
    cfg = shapes_grpo_cpu()
    cfg.run_dir = "runs/shapes_grpo_smoke"
    cfg.iterations = 2
    cfg.prompts_per_iter = 2
    cfg.group_size = 4
    cfg.save_every = 1
    cfg.grpo = GRPOConfig(num_steps=4, micro_batch=4, optimizer_steps=2)
    cfg.eval = EvalConfig(prompts="shapes:eval", samples_per_prompt=1, num_steps=4)
    return cfg


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "shapes_grpo_cpu": shapes_grpo_cpu,
    "shapes_grpo": shapes_grpo,
    "shapes_grpo_smoke": shapes_grpo_smoke,
}


def get_preset(name: str) -> TrainConfig:
    """The preset of that name. Raises ValueError listing the presets when it is unknown."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
    return PRESETS[name]()
