"""Which SDE steps of a Flow-GRPO rollout decide the reward: a conditional-variance decomposition.

Every trained step's log-prob gradient is weighted by the trajectory's one advantage, so a step whose noise does
not move the reward adds only noise to the policy gradient. This script measures, for the shipped base model
and a training preset's rollout SDE, how much of the reward's variance each step's noise causes:

- per prompt, one trunk trajectory ``x_0 .. x_T`` (``x_0`` the initial noise);
- for each split ``k`` in 0..T-1, ``--continuations`` fresh-noise continuations from the trunk's state ``x_k``
  (the first ``k`` steps' noise fixed), scored by the judge reward; and as many fully independent rollouts;
- ``V(k) = E_prompt[Var(R | x_k)]`` (unbiased within-prompt variance) falls from the independent rollouts'
  variance ``V(-)`` to 0 at the deterministic last step. ``V(k) - V(k+1) = E[Var(E[R | x_{k+1}] | x_k)]`` is the
  variance step ``k``'s noise contributes; ``V(-) - V(0)`` is the initial noise's (which no step trains).

The same is reported for the strict pass. One trunk per prompt, so each row is an estimate over prompts.

Beside it, how much each step weighs in the update: on a fresh on-policy batch of the same prompts (``--continuations``
images each, group-normalised judge advantages), the norm of each step's policy-gradient term (its loss divided by
the number of trained steps, as ``train_step`` does), under the plain Flow-GRPO ratio and under GRPO-Guard's
(``grpo.guard``).

    python benchmarks/step_variance.py --prompts-per-category 8 --continuations 8

The default, ``--preset recipe``, is :func:`rewardflow.presets.shapes_recipe` with its 10-step sampler, which
``shapes_grpo_cpu`` had when the table in docs/results.md at 7635c1f was measured with ``--preset shapes_grpo_cpu``;
the demo preset and ``shapes_grpo`` now train on 6 steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform

import numpy as np
import torch

from rewardflow.algorithms import grpo
from rewardflow.algorithms.advantages import group_advantages
from rewardflow.presets import get_preset, shapes_recipe
from rewardflow.sampling.rollout import rollout
from rewardflow.sampling.windows import SDEWindow  # noqa: E402
from rewardflow.shapes.grammar import CATEGORIES
from rewardflow.shapes.prompts import all_prompts, is_held_out
from rewardflow.shapes.reward import ShapesJudgeReward
from rewardflow.shapes.tiny_dit import load_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="recipe", help="a preset name, or 'recipe' for shapes_recipe()")
    parser.add_argument("--checkpoint", default="base")
    parser.add_argument("--prompts-per-category", type=int, default=8)
    parser.add_argument("--continuations", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="", help="also write the table as JSON here")
    args = parser.parse_args()
    if args.continuations < 2:
        parser.error("--continuations must be >= 2 (a variance needs two samples)")
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = shapes_recipe() if args.preset == "recipe" else get_preset(args.preset)
    g = cfg.grpo
    policy = load_policy(args.checkpoint, autocast=cfg.model.autocast)
    sigmas = policy.schedule(g.num_steps, g.shift)
    levels = SDEWindow(0, 0, g.num_steps - 1).levels(g.num_steps, g.noise_level)  # every step but the last
    steps = len(levels)
    reward = ShapesJudgeReward(cfg.reward.extra_object_penalty)
    rng = np.random.default_rng(args.seed)
    prompts = []
    for category in CATEGORIES:
        pool = [p.text for p in all_prompts(category) if not is_held_out(p)]
        prompts += [
            pool[i]
            for i in rng.choice(
                len(pool), size=args.prompts_per_category, replace=len(pool) < args.prompts_per_category
            )
        ]
    m = args.continuations
    gen = torch.Generator().manual_seed(args.seed)

    def run(cond_rows: list[str], start: int, x_init: torch.Tensor | None) -> torch.Tensor:
        cond = policy.encode_prompts(cond_rows)
        traj = rollout(
            policy,
            cond,
            sigmas[start:],
            levels[start:],
            guidance_scale=g.guidance_scale,
            x_init=x_init,
            generator=gen,
            step=g.step,
        )
        return traj.xs

    def score(images: torch.Tensor, rows: list[str]) -> tuple[np.ndarray, np.ndarray]:
        out = reward(policy.decode(images), rows, [{} for _ in rows])
        return out.scores.numpy(), out.details["strict"].numpy()

    chunk = 32 // m * m or m  # whole prompts per chunk, about the presets' micro-batch
    per_chunk = chunk // m
    rows = {k: ([], []) for k in ["-", *range(steps)]}
    with policy.sampling():
        for c in range(0, len(prompts), per_chunk):
            group = prompts[c : c + per_chunk]
            trunk = run(group, 0, None)  # [P, T+1, ...]
            repeated = [p for p in group for _ in range(m)]
            for k in ["-", *range(steps)]:
                x_init = None if k == "-" else trunk[:, k].repeat_interleave(m, dim=0)
                xs = run(repeated, 0 if k == "-" else k, x_init)
                r, s = score(xs[:, -1], repeated)
                rows[k][0].append(r.reshape(len(group), m))
                rows[k][1].append(s.reshape(len(group), m))
            print(f"prompts {c + len(group)}/{len(prompts)}", flush=True)

    splits = ["-", *range(steps)]
    # Per-prompt unbiased variances [P] for each split; the prompts are in the same order for every split.
    per_prompt = {k: {n: np.concatenate(rows[k][i]).var(axis=1, ddof=1) for i, n in enumerate(("reward", "strict"))}
                  for k in splits}  # fmt: skip
    total = {n: float(per_prompt["-"][n].mean()) for n in ("reward", "strict")}
    table = []
    for i, k in enumerate(splits):
        row: dict = {"split": k, "sigma": None if k == "-" else float(sigmas[k])}
        for n in ("reward", "strict"):
            here = per_prompt[k][n]
            after = per_prompt[splits[i + 1]][n] if i + 1 < len(splits) else np.zeros_like(here)
            drop = here - after  # the variance this split's noise (initial noise, or step k) adds, per prompt
            row[f"{n}_var"] = float(here.mean())
            row[f"{n}_step_share"] = float(drop.mean()) / total[n]
            row[f"{n}_step_share_se"] = float(drop.std(ddof=1) / np.sqrt(len(drop))) / total[n]
        table.append(row)
    print(
        f"\n- Command: `python benchmarks/step_variance.py --preset {args.preset} --checkpoint {args.checkpoint} "
        f"--prompts-per-category {args.prompts_per_category} --continuations {m} --seed {args.seed}`"
    )
    print(
        f"- Machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{dt.date.today().isoformat()}"
    )
    print(f"- {len(prompts)} training prompts, {m} continuations per split; reward {reward.name}, noise levels "
          + ", ".join(f"{float(x):g}" for x in levels))  # fmt: skip
    print(
        "\n| noise | sigma -> next | E[Var(R \\| fixed)] before it | its share of Var(R) (+- s.e.) | "
        "its share of Var(strict) (+- s.e.) |"
    )
    print("|---|---|---|---|---|")
    for row in table:
        k = row["split"]
        name = "initial noise" if k == "-" else f"step {k}"
        sig = "" if k == "-" else f"{float(sigmas[k]):.3f} -> {float(sigmas[k + 1]):.3f}"
        shares = [f"{row[f'{n}_step_share']:.2f} +- {row[f'{n}_step_share_se']:.2f}" for n in ("reward", "strict")]
        print(f"| {name} | {sig} | {row['reward_var']:.4f} | {shares[0]} | {shares[1]} |")
    norms = step_gradient_norms(policy, g, prompts, m, reward, gen)
    print("\n| step | gradient norm, plain ratio | gradient norm, GRPO-Guard |")
    print("|---|---|---|")
    for j, (plain, guard) in norms.items():
        print(f"| {j} | {plain:.3g} | {guard:.3g} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"sigmas": [float(x) for x in sigmas], "table": table, "prompts": prompts,
                       "gradient_norms": {str(j): v for j, v in norms.items()}}, f, indent=1)  # fmt: skip


def step_gradient_norms(policy, g: grpo.GRPOConfig, prompts: list[str], m: int, reward, gen) -> dict:
    """Per trained step: the norm of its on-policy policy-gradient term, plain ratio and GRPO-Guard's."""
    cfg = dataclasses.replace(g, guard=True)  # keeps the rollout's means; the plain ratio needs none of it
    rows = [p for p in prompts for _ in range(m)]
    batch = grpo.collect(policy, policy.encode_prompts(rows), cfg, gen)
    scores = reward(policy.decode(batch.xs[:, -1]), rows, [{} for _ in rows]).scores
    adv = group_advantages(scores, torch.arange(len(prompts)).repeat_interleave(m), global_std=g.global_std)
    params = list(policy.trainable_parameters())
    out = {}
    for j in batch.trained_steps:
        norms = []
        for guard in (False, True):
            policy.module.zero_grad()
            for start in range(0, len(rows), g.micro_batch):
                part = slice(start, start + g.micro_batch)
                step, _ = grpo.step_terms(policy, batch, part, j, cfg, need_reference=False)
                if guard:
                    log_ratio = grpo.guard_log_ratio(step, batch.means[part, j])
                    weights = torch.full_like(log_ratio, 1.0 / float(batch.sigmas[j] - batch.sigmas[j + 1]))
                else:
                    log_ratio, weights = step.log_prob - batch.log_probs[part, j], None
                loss, _ = grpo.clipped_policy_loss(log_ratio, adv[part], g.clip_range, weights)
                (loss * len(step.log_prob) / len(rows) / len(batch.trained_steps)).backward()
            norms.append(float(torch.cat([p.grad.flatten() for p in params if p.grad is not None]).norm()))
        out[j] = tuple(norms)
    return out


if __name__ == "__main__":
    main()
