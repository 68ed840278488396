"""Slow tier: does each Shapes training preset raise the judge's accuracy, end to end (``pytest -m slow``)?

Each test runs the preset itself through ``rewardflow.train`` (its algorithm, sampler, learning rate, KL, EMA and
evaluation CFG unchanged) on a narrow task: four counting prompts that the base model gets right a quarter to a
third of the time. Only the batch (8 prompts
per iteration) and the number of iterations are smaller than the preset's. The online presets train against the
judge's reward and are judged on the prompts they trained on (48 fixed-noise samples each, 20 Euler steps). The
direct-gradient presets train against the learned ``shapes-count`` (which must rise too) and are judged on the
evaluation set's 30 counting prompts (16 samples each): nine distinct prompts, five of which they never train on
("four triangles" is in no training set). The accuracy over the whole evaluation set, and how it moves with time, is
what ``benchmarks/study.py`` measures (docs/results.md); these tests check that each preset's training moves the
judge's score the right way on a task where a gain is measurable in a few minutes. About 40 minutes on 2 cores (the
five direct cases took 28 minutes on an AVX2 VM, about 8 on the AMX VM with DRaFT-1 and DRaFT-LV on their 4-step
grid).
"""

from __future__ import annotations

import json

import pytest

from rewardflow.config import apply_overrides
from rewardflow.data.prompts import load_prompts
from rewardflow.presets import get_preset
from rewardflow.train import train

pytestmark = pytest.mark.slow

COUNTING = ["three squares", "three circles", "three triangles", "two squares"]

# preset: (iterations, minimum gain in strict accuracy). Measured on the shipped base (2026-12-07, 2-core AMD EPYC
# VM, `pytest -m slow -n 2`, one run each): Flow-GRPO 0.250 -> 0.453, Fast 0.240 -> 0.536, Dance 0.240 -> 0.349,
# Mix 0.240 -> 0.297, NFT 0.292 -> 0.594. The margins are about half of each gain (other reduction orders give other
# trajectories: docs/results.md at 7635c1f).
CASES = {
    "shapes_grpo_cpu": (30, 0.10),
    "shapes_grpo_fast_cpu": (30, 0.10),
    "shapes_dance_cpu": (30, 0.035),
    "shapes_mix_cpu": (30, 0.03),
    "shapes_nft_cpu": (30, 0.06),
}
# The direct presets against shapes-count, 20 iterations, judged on the 30 counting evaluation prompts x 16.
# Measured on the shipped base (2026-12-07, same VM, `pytest -m slow -n 2`), from 0.342: DRaFT-1 0.394, DRaFT-LV
# 0.431, ReFL 0.377, AlignProp 0.375, LeapAlign 0.408; shapes-count 0.734 -> 0.80-0.82 in every run. DRaFT-1 and
# DRaFT-LV train on a 4-step grid, whose one trained step sits where counts are still open. The margins are about
# half of the smaller gain over two seeds.
DIRECT = {
    "shapes_draft_cpu": (20, 0.035),
    "shapes_draft_lv_cpu": (20, 0.065),
    "shapes_refl_cpu": (20, 0.025),
    "shapes_alignprop_cpu": (20, 0.03),
    "shapes_leapalign_cpu": (20, 0.03),
}
CASES.update(DIRECT)


def narrow(preset: str, run_dir, prompts_file, iterations: int, eval_prompts=None, samples: int = 48):
    """The preset on the narrow task: its own prompts, a smaller batch, fewer iterations, one evaluation."""
    return apply_overrides(
        get_preset(preset),
        [f"run_dir={run_dir}", f"train_prompts={prompts_file}", f"eval.prompts={eval_prompts or prompts_file}",
         "balance_prompts_by=''", "prompts_per_iter=8", f"iterations={iterations}", f"save_every={iterations}",
         "eval_every=0", f"eval.samples_per_prompt={samples}", "eval.num_steps=20"],
    )  # fmt: skip


@pytest.mark.parametrize("preset", list(CASES))
def test_preset_raises_the_judges_accuracy(preset, tmp_path):
    iterations, margin = CASES[preset]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(COUNTING) + "\n")
    direct = preset in DIRECT
    eval_prompts = None
    if direct:  # judged on the evaluation set's 30 counting prompts
        eval_prompts = tmp_path / "counting_eval.txt"
        eval_prompts.write_text(
            "".join(f"{r.prompt}\n" for r in load_prompts("shapes:eval") if r.metadata["category"] == "counting")
        )
    cfg = narrow(preset, tmp_path / "run", prompts_file, iterations, eval_prompts, 16 if direct else 48)
    run = train(cfg)
    before = json.loads((run / "eval" / "iter_00000.json").read_text())
    after = json.loads((run / "eval" / f"iter_{iterations:05d}.json").read_text())
    print(f"{preset}: strict {before['overall']:.3f} -> {after['overall']:.3f}, {before.get('rewards')} -> "
          f"{after.get('rewards')}")  # fmt: skip
    if direct:  # the learned reward it optimises rose
        name = cfg.reward.names[0]
        assert after["rewards"][name] > before["rewards"][name] + 0.02, (before["rewards"], after["rewards"])
    assert after["overall"] >= before["overall"] + margin, (before["overall"], after["overall"])
