"""Slow tier: does each Shapes training preset raise the judge's accuracy, end to end (``pytest -m slow``)?

Each test runs the preset itself through ``rewardflow.train`` (its algorithm, sampler, learning rate, KL,
EMA and evaluation CFG unchanged) on a narrow task: four prompts of one category that the base model gets right
a third to a half of the time, trained and evaluated on the same prompts (48 fixed-noise samples each, 20 Euler
steps). Only the batch (8 prompts per iteration) and the number of iterations are smaller than the preset's.
The accuracy over the whole evaluation set, and how it moves with time, is what ``benchmarks/study.py``
measures (docs/results.md); these tests check that each preset's training moves the judge's score the right way
on a task where a gain is measurable in a minute or two.

The online methods train on counting prompts against the judge's reward. The direct-gradient presets optimise
the learned ``shapes-score``, and a gradient of it can only teach what it knows: they train on two-object
prompts, the category where it agrees best with the judge (docs/shapes_world.md has the agreement per
category; on counting it is close to chance), for fewer iterations, since optimising it for longer turns
against the judge (the direct study in docs/results.md). Their tests check both that reward and the judge (the
truth it stands in for). About 15 minutes on 2 cores.
"""

from __future__ import annotations

import json

import pytest

from rewardflow.config import apply_overrides
from rewardflow.presets import get_preset
from rewardflow.train import train

pytestmark = pytest.mark.slow

COUNTING = ["three squares", "three circles", "three triangles", "two squares"]
TWO_OBJECTS = ["a circle and a square", "a circle and a triangle", "a square and a circle", "a triangle and a circle"]

# preset: (prompts, iterations, minimum gain in strict accuracy). Calibration (2026-11-23, fifth session, one
# seed, one thread per run, two runs at a time): on counting after 30 iterations from 0.354 (0.432 CFG-free for
# NFT), Flow-GRPO 0.568, Fast 0.573, Dance 0.427, Mix 0.490, NFT 0.557. The margins are about half of each gain.
# Run by pytest alone on 2 threads (other reduction orders, so other trajectories): NFT 0.557, Fast 0.495, Mix 0.448.
# The direct presets on two-object prompts after 20 iterations from 0.359: DRaFT-1 0.406, DRaFT-LV 0.391,
# LeapAlign 0.385, AlignProp 0.349, ReFL 0.354, the learned reward 0.704 -> 0.752-0.764 for all; after 30
# iterations DRaFT-1 and DRaFT-LV 0.380, ReFL 0.318 (learned reward 0.79-0.80: hacked). A retrained shapes-score
# with better agreement (docs/results.md) moved the judge by -1.0 to +4.7 points as well, method by method in
# another order. The judge's change is within one draw's noise (about 3-4 points here) for every direct preset,
# so those cases are non-strict xfails: the "raises the judge" is not shown for them.
# Sixth session, the presets unchanged for 30 iterations and judged on 384 two-object samples: ReFL +5.4, DRaFT-1
# +3.6, LeapAlign +2.8, AlignProp +0.5 points (standard error about 2.5): the same verdict.
CASES = {
    "shapes_grpo_cpu": (COUNTING, 30, 0.10),
    "shapes_grpo_fast_cpu": (COUNTING, 30, 0.10),
    "shapes_dance_cpu": (COUNTING, 30, 0.035),
    "shapes_mix_cpu": (COUNTING, 30, 0.07),
    "shapes_nft_cpu": (COUNTING, 30, 0.06),
    **{p: (TWO_OBJECTS, 20, 0.02) for p in ("shapes_draft_cpu", "shapes_draft_lv_cpu", "shapes_refl_cpu",
                                             "shapes_alignprop_cpu", "shapes_leapalign_cpu")},
}  # fmt: skip
JUDGE_GAIN_WITHIN_NOISE = pytest.mark.xfail(
    strict=False, reason="a direct preset's judge gain is within the noise of one draw (-1 to +5 points measured)"
)


def narrow(preset: str, run_dir, prompts_file, iterations: int):
    """The preset on the narrow task: its own prompts, a smaller batch, fewer iterations, one evaluation."""
    return apply_overrides(
        get_preset(preset),
        [f"run_dir={run_dir}", f"train_prompts={prompts_file}", f"eval.prompts={prompts_file}",
         "balance_prompts_by=''", "prompts_per_iter=8", f"iterations={iterations}", f"save_every={iterations}",
         "eval_every=0", "eval.samples_per_prompt=48", "eval.num_steps=20"],
    )  # fmt: skip


@pytest.mark.parametrize(
    "preset", [pytest.param(p, marks=JUDGE_GAIN_WITHIN_NOISE) if CASES[p][0] is TWO_OBJECTS else p for p in CASES]
)
def test_preset_raises_the_judges_accuracy(preset, tmp_path):
    prompts, iterations, margin = CASES[preset]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    run = train(narrow(preset, tmp_path / "run", prompts_file, iterations))
    before = json.loads((run / "eval" / "iter_00000.json").read_text())
    after = json.loads((run / "eval" / f"iter_{iterations:05d}.json").read_text())
    print(f"{preset}: strict {before['overall']:.3f} -> {after['overall']:.3f}, {before.get('rewards')} -> "
          f"{after.get('rewards')}")  # fmt: skip
    if before.get("rewards"):  # a direct-gradient preset: the learned reward it optimises rose
        name = next(iter(before["rewards"]))
        assert after["rewards"][name] > before["rewards"][name] + 0.02, (before["rewards"], after["rewards"])
    assert after["overall"] >= before["overall"] + margin, (before["overall"], after["overall"])
