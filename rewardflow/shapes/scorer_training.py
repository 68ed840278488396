"""Training the ``shapes-score`` scorer (``rewardflow reward-model``): judge-labelled base samples and rendered scenes.

The scorer itself, and the rewards built on it, are in :mod:`rewardflow.shapes.scorer`; this module samples the base
model through the evaluation's generator, which is why it stands apart (the rewards must not depend on evaluation).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F

from rewardflow.data.prompts import load_prompts
from rewardflow.evaluate import EvalConfig, generate
from rewardflow.shapes.grammar import CATEGORIES
from rewardflow.shapes.prompts import random_prompt
from rewardflow.shapes.render import render
from rewardflow.shapes.scorer import ShapesScoreConfig, ShapesScorer, judge_labels, save_scorer
from rewardflow.shapes.tiny_dit import ShapesTokenizer, load_policy
from rewardflow.utils.configs import Count, Natural, NonNegative, Positive, Range, check_fields

log = logging.getLogger(__name__)


@dataclass
class ScoreTrainConfig:
    """Settings of ``rewardflow reward-model`` (the shipped scorer used the defaults, on the base shipped then).

    ``base_samples`` and ``held_out_samples`` come from the shipped base; the shipped scorer was made from the pooled
    base that was shipped before it (docs/pretraining.md says how to get it back) and has not been retrained, so the
    same command today makes a somewhat different scorer.
    """

    out: str = "runs/shapes_score/shapes_score.safetensors"
    model: ShapesScoreConfig = dataclasses.field(default_factory=ShapesScoreConfig)
    base_samples: Count = 6144
    """Samples of the shipped base model (training prompts), labelled by the judge."""
    held_out_samples: Count = 1440
    """Samples of the base model on the evaluation prompts, kept for the agreement report."""
    rendered: Count = 32768
    """Rendered scenes, half with their own prompt and half with another, labelled by the judge."""
    sample_steps: Count = 20
    """Euler steps of the base-model samples."""
    steps: Count = 4000
    """Optimizer steps of the scorer."""
    summary_weight: NonNegative = 1.0
    """Weight of the auxiliary smooth-L1 loss on the detector's counts in each image (:func:`detection_summary`);
    0 trains the score alone, as the first shipped scorer was."""
    batch_size: Annotated[int, Range(2)] = 128
    lr: Positive = 1e-3
    seed: int = 0
    threads: Natural = 0

    def __post_init__(self) -> None:
        check_fields(self, "reward-model")


@torch.no_grad()
def base_samples(prompts: list[str], steps: int, seed: int) -> torch.Tensor:
    """ODE samples of the shipped base model (CFG 4.5), images in [0, 1]."""
    cfg = EvalConfig(num_steps=steps, seed=seed, batch_size=256)
    return generate(load_policy("base"), prompts, cfg)


def rendered_pairs(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[str]]:
    """Rendered scenes, half with their own prompt and half with another prompt of a random category."""
    images, prompts = [], []
    for i in range(n):
        spec = random_prompt(rng, CATEGORIES[int(rng.integers(len(CATEGORIES)))])
        img, _ = render(spec, rng)
        images.append(img)
        other = spec if i % 2 == 0 else random_prompt(rng, CATEGORIES[int(rng.integers(len(CATEGORIES)))])
        prompts.append(other.text)
    arr = np.stack(images).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), prompts


def agreement(scores: torch.Tensor, labels: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """How well scores track the judge labels.

    Returns the Pearson correlation, and the share of same-prompt pairs with different labels that the
    scores order the same way (``pairs`` of them).
    """
    pearson = float(torch.corrcoef(torch.stack([scores, labels]))[0, 1])
    agree = total = 0
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault(p, []).append(i)
    for rows in by_prompt.values():
        for a in range(len(rows)):
            for b in range(a + 1, len(rows)):
                i, j = rows[a], rows[b]
                if labels[i] != labels[j]:
                    total += 1
                    agree += int((scores[i] - scores[j]) * (labels[i] - labels[j]) > 0)
    return {"pearson": pearson, "pair_agreement": agree / max(1, total), "pairs": total}


def train_scorer(cfg: ScoreTrainConfig) -> dict[str, Any]:
    """Train the scorer as configured, write it to ``cfg.out`` and return the held-out agreement report."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()
    train_prompts = [r.prompt for r in load_prompts("shapes:train")]
    eval_prompts = [r.prompt for r in load_prompts("shapes:eval")]
    pool_prompts = [train_prompts[i] for i in rng.integers(len(train_prompts), size=cfg.base_samples)]
    pool = base_samples(pool_prompts, cfg.sample_steps, cfg.seed)
    pool_labels, pool_summary = judge_labels(pool, pool_prompts)
    held_prompts = [eval_prompts[i % len(eval_prompts)] for i in range(cfg.held_out_samples)]
    held = base_samples(held_prompts, cfg.sample_steps, cfg.seed + 1)
    held_labels, _ = judge_labels(held, held_prompts)
    r_pool, r_prompts = rendered_pairs(rng, cfg.rendered)
    r_labels, r_summary = judge_labels(r_pool, r_prompts)
    log.info("base samples and rendered scenes drawn and judged in %.0fs", time.time() - t0)

    model = ShapesScorer(cfg.model)
    tok = ShapesTokenizer(cfg.model.vocabulary, cfg.model.max_prompt_tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    half = cfg.batch_size // 2
    for step in range(cfg.steps):
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.from_numpy(rng.integers(len(pool), size=half))
        ridx = torch.from_numpy(rng.integers(len(r_pool), size=cfg.batch_size - half))
        images = torch.cat([pool[idx], r_pool[ridx]])
        prompts = [pool_prompts[i] for i in idx.tolist()] + [r_prompts[i] for i in ridx.tolist()]
        labels = torch.cat([pool_labels[idx], r_labels[ridx]])
        logits, summary = model.score_and_summary(images, tok(prompts))
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        if cfg.summary_weight:
            target = torch.cat([pool_summary[idx], r_summary[ridx]])
            loss = loss + cfg.summary_weight * F.smooth_l1_loss(summary, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 or step == cfg.steps - 1:
            log.info("step %d loss %.4f lr %.2e (%.0fs)", step, loss.item(), lr, time.time() - t0)
    model.eval()
    with torch.no_grad():
        held_scores = torch.sigmoid(torch.cat([model(held[i : i + 256], tok(held_prompts[i : i + 256]))
                                               for i in range(0, len(held), 256)]))  # fmt: skip
    report = {
        **agreement(held_scores, held_labels, held_prompts),
        "held_out": "base-model samples on the evaluation prompts (never trained on)",
        "mean_score": float(held_scores.mean()),
        "mean_label": float(held_labels.mean()),
        "seconds": time.time() - t0,
        "config": dataclasses.asdict(cfg),
    }
    save_scorer(model, cfg.out, report=json.dumps({k: v for k, v in report.items() if k != "config"}))
    Path(cfg.out).with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    return report
