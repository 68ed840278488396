"""Does a Shapes model place the two objects of a position prompt the asked way round? By shape pair.

The evaluation's position score mixes two skills: drawing both asked shapes, and putting them in the asked
relation. This script separates them, and splits them by the unordered pair of shapes, because the pairs differ:
at 7-11 pixels a model's circles and squares are easy to confuse, triangles are not.

- **Samples**: the evaluation sampler (40 Euler steps, shift 3, CFG 4.5) on the evaluation set's position prompts,
  ``--samples-per-prompt`` each, with initial noise from ``--seed`` (not the evaluation's own seed, so the
  samples are new ones). For each: the strict pass, whether both asked shapes were detected, and, given both,
  whether some pair of them stands in the asked relation.
- **Denoising loss with the objects swapped**: on ``--scenes`` rendered position scenes, the rectified-flow loss
  with the true prompt and with the two objects swapped ("a square left of a circle" for a scene of "a circle
  left of a square"), per sigma. A model that ignores word order scores both alike.

    python benchmarks/position_direction.py --checkpoint base --samples-per-prompt 8
    python benchmarks/position_direction.py --checkpoint runs/shapes_grpo_cpu   # a run folder's latest EMA

docs/pretraining.md ("Which shape pairs the direction fails on") has the measured tables.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch

from rewardflow.data.prompts import load_prompts
from rewardflow.evaluate import EvalConfig, generate
from rewardflow.shapes.grammar import parse_prompt
from rewardflow.shapes.judge import judge_images
from rewardflow.shapes.prompts import random_prompt
from rewardflow.shapes.render import relation_holds, render
from rewardflow.shapes.tiny_dit import load_policy


def load(checkpoint: str):
    if os.path.isdir(checkpoint):
        from rewardflow.build import load_trained_policy

        return load_trained_policy(checkpoint, device="cpu")[0]
    return load_policy(checkpoint, autocast=True)


def pair_name(spec) -> str:
    shapes = sorted({spec.objects[0].shape, spec.objects[1].shape})
    return "/".join(shapes) if len(shapes) == 2 else "same shape"


def direction_by_pair(policy, samples_per_prompt: int, seed: int, max_prompts: int | None) -> dict:
    cfg = dataclasses.replace(EvalConfig(), seed=seed)
    records = [r for r in load_prompts(cfg.prompts) if r.metadata.get("category") == "position"][:max_prompts]
    prompts = [r.prompt for r in records for _ in range(samples_per_prompt)]
    return tally([parse_prompt(p) for p in prompts], generate(policy, prompts, cfg).numpy())


def tally(specs: list, images: np.ndarray) -> dict:
    """Per shape pair (and "all"): samples, strict pass, both shapes drawn, and the asked relation given both."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for spec, verdict in zip(specs, judge_images(specs, images)):
        objects = [d for d in verdict.detections if d.is_object]
        first = [d for d in objects if d.shape == spec.objects[0].shape]
        second = [d for d in objects if d.shape == spec.objects[1].shape]
        pairs = [(a, b) for a in first for b in second if a is not b]
        for key in ("all", pair_name(spec)):
            c = counts[key]
            c["samples"] += 1
            c["strict"] += bool(verdict.strict)
            c["both"] += bool(pairs)
            c["asked"] += any(relation_holds(spec.relation, a.box, b.box) for a, b in pairs)
    return {
        key: {
            "samples": c["samples"],
            "strict": c["strict"] / c["samples"],
            "both_drawn": c["both"] / c["samples"],
            "pairs": c["both"],
            "asked": c["asked"],
            "asked_given_both": c["asked"] / c["both"] if c["both"] else None,
        }
        for key, c in sorted(counts.items())
    }


def swapped(text: str) -> str:
    """The position prompt ``text`` with its two objects exchanged, in the grammar's canonical form."""
    spec = parse_prompt(text)
    if spec.relation is None:
        raise ValueError(f"not a position prompt: {text!r}")
    return dataclasses.replace(spec, objects=spec.objects[::-1]).text


def swap_loss(policy, scenes: int, sigmas: list[float]) -> list[dict]:
    rng = np.random.default_rng(1)
    specs = [random_prompt(rng, "position") for _ in range(scenes)]
    images = np.stack([render(s, rng)[0] for s in specs]).astype(np.float32) / 127.5 - 1.0
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    net = policy.weights.active().eval()
    texts = {"true": [s.text for s in specs], "swapped": [swapped(s.text) for s in specs]}
    tokens = {name: policy.tokenizer(t) for name, t in texts.items()}
    rows = []
    for sigma in sigmas:
        x = (1 - sigma) * x0 + sigma * eps
        loss = {}
        for name, tok in tokens.items():
            with torch.no_grad():
                chunks = [(x[i : i + 128], tok[i : i + 128]) for i in range(0, scenes, 128)]
                v = torch.cat([net(xc, torch.full((len(xc),), sigma), tc) for xc, tc in chunks])
            loss[name] = (v.float() - (eps - x0)).pow(2).mean().item()
        rows.append({"sigma": sigma, **loss, "increase": loss["swapped"] / loss["true"] - 1.0})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="base", help="'base', a tiny-DiT .safetensors file or a run folder")
    ap.add_argument("--samples-per-prompt", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7, help="initial noise of the samples (the evaluation uses another)")
    ap.add_argument("--max-prompts", type=int, default=None, help="only the first N position prompts (smoke runs)")
    ap.add_argument("--scenes", type=int, default=512, help="rendered scenes for the swapped-prompt loss")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy = load(args.checkpoint)
    result = {
        "checkpoint": args.checkpoint,
        "seed": args.seed,
        "by_pair": direction_by_pair(policy, args.samples_per_prompt, args.seed, args.max_prompts),
        "swap_loss": swap_loss(policy, args.scenes, [0.95, 0.85, 0.7, 0.5, 0.3]),
    }
    print(f"{args.checkpoint}: {args.samples_per_prompt} samples per position prompt, seed {args.seed}")
    print("| shape pair | samples | strict | both drawn | pairs | asked relation, given both |")
    print("|---|---|---|---|---|---|")
    for key, r in result["by_pair"].items():
        asked = "-" if r["asked_given_both"] is None else f"{r['asked_given_both']:.2f}"
        print(f"| {key} | {r['samples']} | {r['strict']:.2f} | {r['both_drawn']:.2f} | {r['pairs']} | {asked} |")
    print("denoising loss, true prompt -> objects swapped:")
    for r in result["swap_loss"]:
        print(f"  sigma {r['sigma']}: {r['true']:.4f} -> {r['swapped']:.4f} ({100 * r['increase']:+.1f}%)")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
