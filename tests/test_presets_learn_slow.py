"""Slow tier: does each Shapes training preset raise the judge's accuracy, end to end (``pytest -m slow``)?

Each test runs the preset itself through ``rewardflow.train`` (its algorithm, sampler, learning rate, KL,
EMA and evaluation CFG unchanged) on a narrow task: four prompts of one category that the base model gets right
a third to a half of the time, trained and evaluated on the same prompts (48 fixed-noise samples each, 20 Euler
steps). Only the batch (8 prompts per iteration) and the number of iterations are smaller than the preset's.
The accuracy over the whole evaluation set, and how it moves with time, is what ``benchmarks/study.py``
measures (docs/results.md); these tests check that each preset's training moves the judge's score the right way
on a task where a gain is measurable in a minute or two.

All of them train on counting prompts: the online methods against the judge's reward, the direct-gradient
presets against the learned ``shapes-score`` (checked too: it must rise), which since the seventh session
agrees with the judge best on counting (docs/shapes_world.md has the agreement per category). The direct
presets train for fewer iterations, since optimising the learned reward for longer turns against the judge
(the direct study in docs/results.md). About 15 minutes on 2 cores.
"""

from __future__ import annotations

import json

import pytest

from rewardflow.config import apply_overrides
from rewardflow.presets import get_preset
from rewardflow.train import train

pytestmark = pytest.mark.slow

COUNTING = ["three squares", "three circles", "three triangles", "two squares"]

# preset: (iterations, minimum gain in strict accuracy). Calibration (2026-11-23, fifth session, one
# seed, one thread per run, two runs at a time): on counting after 30 iterations from 0.354 (0.432 CFG-free for
# NFT), Flow-GRPO 0.568, Fast 0.573, Dance 0.427, Mix 0.490, NFT 0.557. The margins are about half of each gain.
# Run by pytest alone on 2 threads (other reduction orders, so other trajectories): NFT 0.557, Fast 0.495, Mix 0.448.
# The direct presets after 20 iterations on counting, with the seventh session's shapes-score (trained with the
# detector-count head; one draw each, pytest's two threads): base 0.354 -> DRaFT-1 0.375, DRaFT-LV 0.385, ReFL
# 0.370, AlignProp 0.385, LeapAlign 0.422, the learned reward 0.612 -> 0.70-0.76. Margins about half of each gain.
# With the earlier shapes-score (agreement 64% on counting pairs) none of them raised the judge on counting, and
# on two-object prompts their changes (-1 to +5 points) were within one draw's noise; with this one, two-object
# gives -3.1 to 0 (docs/results.md).
CASES = {
    "shapes_grpo_cpu": (30, 0.10),
    "shapes_grpo_fast_cpu": (30, 0.10),
    "shapes_dance_cpu": (30, 0.035),
    "shapes_mix_cpu": (30, 0.07),
    "shapes_nft_cpu": (30, 0.06),
    "shapes_draft_cpu": (20, 0.01),
    "shapes_draft_lv_cpu": (20, 0.015),
    "shapes_refl_cpu": (20, 0.008),
    "shapes_alignprop_cpu": (20, 0.015),
    "shapes_leapalign_cpu": (20, 0.03),
}


def narrow(preset: str, run_dir, prompts_file, iterations: int):
    """The preset on the narrow task: its own prompts, a smaller batch, fewer iterations, one evaluation."""
    return apply_overrides(
        get_preset(preset),
        [f"run_dir={run_dir}", f"train_prompts={prompts_file}", f"eval.prompts={prompts_file}",
         "balance_prompts_by=''", "prompts_per_iter=8", f"iterations={iterations}", f"save_every={iterations}",
         "eval_every=0", "eval.samples_per_prompt=48", "eval.num_steps=20"],
    )  # fmt: skip


@pytest.mark.parametrize("preset", list(CASES))
def test_preset_raises_the_judges_accuracy(preset, tmp_path):
    iterations, margin = CASES[preset]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(COUNTING) + "\n")
    run = train(narrow(preset, tmp_path / "run", prompts_file, iterations))
    before = json.loads((run / "eval" / "iter_00000.json").read_text())
    after = json.loads((run / "eval" / f"iter_{iterations:05d}.json").read_text())
    print(f"{preset}: strict {before['overall']:.3f} -> {after['overall']:.3f}, {before.get('rewards')} -> "
          f"{after.get('rewards')}")  # fmt: skip
    if before.get("rewards"):  # a direct-gradient preset: the learned reward it optimises rose
        name = next(iter(before["rewards"]))
        assert after["rewards"][name] > before["rewards"][name] + 0.02, (before["rewards"], after["rewards"])
    assert after["overall"] >= before["overall"] + margin, (before["overall"], after["overall"])
