"""Fixed-seed evaluation on the Shapes world: per-category strict and clean accuracy, histograms, grids.

``overall`` is the mean of the category accuracies (GenEval's convention), ``clean_overall`` the same for
clean passes (strict and nothing unrequested). The histograms of detected colours and shapes, the blob count
and the mean number of detections per image make reward hacking (extra objects, colour collapse) visible;
``shape_pairs`` splits the prompts that name two objects by their pair of shapes (which pairs the model confuses).

Two measures need no judge and no download, so they are reported for any model: ``diversity``, the mean over
prompts of the mean pairwise RMS pixel distance between that prompt's samples (a collapse to one image per
prompt drives it to 0), and ``drift``, the mean RMS pixel distance from the base model's images for the same
prompts and initial noise (how far training moved the samples). Both on images average-pooled to at most 64
pixels a side, in [0, 1] units.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from rewardflow.data.prompts import load_prompts
from rewardflow.models.protocol import FlowPolicy
from rewardflow.rewards import REWARDS, build_judge, build_reward
from rewardflow.rewards.config import RewardConfig
from rewardflow.rewards.multi import WeightedRewards
from rewardflow.sampling.config import SamplerConfig
from rewardflow.sampling.ode import SOLVERS, solve_ode
from rewardflow.sampling.rollout import rollout
from rewardflow.utils import distributed
from rewardflow.utils.checkpoint import load_safetensors_checked, save_safetensors_atomic
from rewardflow.utils.configs import Count, Natural
from rewardflow.utils.progress import phase


@dataclass
class EvalConfig(SamplerConfig):
    """Evaluation settings: deterministic ODE sampling with fixed initial noise.

    ``num_steps``, ``shift``, ``guidance_scale``: :class:`~rewardflow.sampling.config.SamplerConfig` (40 steps).
    """

    SECTION = "eval"
    num_steps: Count = 40
    prompts: str = "shapes:eval"
    samples_per_prompt: Count = 4
    seed: int = 20261122
    batch_size: Count = 120
    rewards: tuple[str, ...] = ()
    """Registered rewards scored on the evaluation images besides the judge (their means in the report's
    ``rewards``), e.g. the learned reward a direct-gradient run optimises, to see it next to the truth."""
    solver: str = "euler"
    """The deterministic sampler: euler, heun or dpm2 (``rewardflow.sampling.ode.SOLVERS``)."""
    subset_every: Natural = 0
    """Evaluations between the first and the last score only every k-th prompt of the set, each with the initial
    noise it has in the full set (0: the full set every time): points for the curves at a k-th of the cost."""
    judge: bool = True
    """Judge the images with the Shapes judge (the prompts must be in its grammar); off for prompts of the
    world at large, which are then scored by ``rewards`` only."""

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [n for n in self.rewards if n not in REWARDS]
        if unknown:
            raise ValueError(f"eval.rewards has unknown rewards {unknown}; registered rewards: {', '.join(REWARDS)}")
        if self.solver not in SOLVERS:
            raise ValueError(f"eval.solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if not self.judge and not self.rewards:
            raise ValueError("eval.judge is off and eval.rewards is empty: the evaluation would score nothing")


def headline(report: dict[str, Any]) -> str:
    """One line of an evaluation report: strict and clean accuracy (when judged), then each reward's mean."""
    parts = [f"strict {report['overall']:.3f}  clean {report['clean_overall']:.3f}"] if "overall" in report else []
    parts += [f"{n} {v:.3f}" for n, v in report.get("rewards", {}).items()]
    return "  ".join(parts)


def shard_rows(rows: int, batch_size: int, rank: int, world: int) -> tuple[range, int, int]:
    """``rank``'s rows of an evaluation of ``rows`` images over ``world`` ranks, the batch size, the most batches.

    Whole batches, dealt in contiguous runs as evenly as the ranks allow (a rank holds ``floor`` or ``ceil`` of
    ``batches / world``). With at least ``world`` batches of ``batch_size`` each rank samples exactly the batches one
    process would, so the images and the report are the same bit for bit; with fewer, the batch shrinks to
    ``ceil(rows / world)`` so that every rank samples (the same images as one process with that ``eval.batch_size``).
    A rank gets no rows only when there are fewer rows than ranks.
    """
    size = max(1, min(batch_size, -(-rows // world)))
    batches = -(-rows // size)
    lo, hi = rank * batches // world, (rank + 1) * batches // world
    return range(min(rows, lo * size), min(rows, hi * size)), size, -(-batches // world)


@torch.no_grad()
def generate(
    policy: FlowPolicy,
    prompts: list[str],
    cfg: EvalConfig,
    noise: torch.Tensor | None = None,
    rows: range | None = None,
    batch_size: int = 0,
    batches: int = 0,
    progress: str = "",
) -> torch.Tensor:
    """ODE samples [N, 3, H, W] in [0, 1] for ``prompts`` (only those in ``rows``, when given).

    The initial noise is drawn once for all prompts from ``cfg.seed`` (or given), so results do not depend on the
    batch size or on which rows are sampled. ``batch_size``: instead of ``cfg.batch_size``. ``batches``: run at
    least this many batches, repeating the first batch of the whole set for the missing ones and discarding them
    (every rank of a sharded model must run the same forward passes). ``progress``: a bar with this label counts
    the images sampled.
    """
    sigmas = policy.schedule(cfg.num_steps, cfg.shift)
    if noise is None:
        noise = policy.noise(len(prompts), torch.Generator(device="cpu").manual_seed(cfg.seed), float(sigmas[0]))
    rows = range(len(prompts)) if rows is None else rows
    size = batch_size or cfg.batch_size
    spans = [(s, min(s + size, rows.stop)) for s in range(rows.start, rows.stop, size)]
    real = len(spans)
    # A rank without rows of its own runs one batch anyway, for the shape of its (empty) result.
    spans += [(0, min(size, len(prompts)))] * max(batches - real, 0 if real else 1)
    zeros = torch.zeros(cfg.num_steps)
    images = []
    bar = phase(progress, len(rows), enabled=bool(progress))
    with policy.sampling():
        for i, (lo, hi) in enumerate(spans):
            cond = policy.encode_prompts(prompts[lo:hi])
            x = noise[lo:hi]
            if cfg.solver == "euler":
                final = rollout(policy, cond, sigmas, zeros, guidance_scale=cfg.guidance_scale, x_init=x).final
            else:
                velocity = lambda x, s, c=cond: policy.velocity(x, s, c, cfg.guidance_scale)  # noqa: E731
                final = solve_ode(velocity, x, sigmas, cfg.solver)
            if i < real or i == 0:  # a rank without rows decodes one batch, for the shape of its empty result
                images.append(policy.decode(final).cpu()[: hi - lo if i < real else 0])
            bar.update(hi - lo if i < real else 0)
    bar.close()
    return torch.cat(images)


def pooled(images: torch.Tensor) -> torch.Tensor:
    """Images [N, 3, H, W] average-pooled to at most 64 pixels a side, flattened [N, D] (float32).

    What ``drift`` compares; a run keeps its base model's (``eval/base_pooled.safetensors``, float16).
    """
    factor = max(1, -(-max(images.shape[-2:]) // 64))
    x = torch.nn.functional.avg_pool2d(images.float(), factor, ceil_mode=True) if factor > 1 else images.float()
    return x.flatten(1)


def diversity(pooled_images: torch.Tensor, samples_per_prompt: int) -> float | None:
    """Mean over prompts of the mean pairwise RMS distance between the prompt's samples (None for 1 sample).

    ``pooled_images`` [N, D]: :func:`pooled` images, each prompt's samples in a row.
    """
    if samples_per_prompt < 2:
        return None
    x = pooled_images
    x = x.view(-1, samples_per_prompt, x.shape[1])
    d = torch.cdist(x, x) / x.shape[-1] ** 0.5  # [P, S, S] RMS distances
    pairs = samples_per_prompt * (samples_per_prompt - 1)
    return float((d.sum(dim=(1, 2)) / pairs).mean())


def drift(pooled_images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean RMS distance between each image and the reference of the same prompt and noise (both ``pooled``)."""
    a, b = pooled_images, reference.float()
    if a.shape != b.shape:
        raise ValueError(
            f"drift needs the base's images under the same settings: {tuple(a.shape)} vs {tuple(b.shape)}"
        )
    return float(((a - b).pow(2).mean(dim=1).sqrt()).mean())


REFERENCE_FORMAT = "rewardflow-eval-reference"


def _identity(cfg: EvalConfig) -> str:
    """The settings that decide the evaluation images (not how they are scored or batched)."""
    keep = ("prompts", "samples_per_prompt", "num_steps", "shift", "guidance_scale", "seed", "solver")
    return json.dumps({k: getattr(cfg, k) for k in keep}, sort_keys=True)


def save_reference(path: Path, cfg: EvalConfig, pooled_images: torch.Tensor) -> None:
    """Keep the base model's :func:`pooled` evaluation images (float16) for later ``drift``."""
    save_safetensors_atomic({"pooled": pooled_images.half()}, path,
                            {"format": REFERENCE_FORMAT, "settings": _identity(cfg)})  # fmt: skip


def load_reference(path: Path, cfg: EvalConfig) -> torch.Tensor | None:
    """The base's pooled images if ``path`` holds them for these settings, else None (drift is then omitted)."""
    if not path.is_file():
        return None
    tensors, meta = load_safetensors_checked(path, REFERENCE_FORMAT)
    try:
        saved = json.loads(meta.get("settings", ""))
    except ValueError:
        return None
    # Run folders written when grids were scaled by hand name a sigma_max (1 for the flow models they ran).
    saved.pop("sigma_max", None)
    return tensors["pooled"] if json.dumps(saved, sort_keys=True) == _identity(cfg) else None


def format_table(report: dict[str, Any]) -> str:
    """The report as a readable text table: per category strict / clean, then the other measures."""
    lines = []
    if "categories" in report:
        lines.append(f"{'category':<16}{'strict':>8}{'clean':>8}")
        for cat, acc in report["categories"].items():
            lines.append(f"{cat:<16}{acc:>8.3f}{report['clean_categories'][cat]:>8.3f}")
        lines.append(f"{'overall':<16}{report['overall']:>8.3f}{report['clean_overall']:>8.3f}")
    for name, value in report.get("rewards", {}).items():
        lines.append(f"{'reward ' + name:<24}{value:>8.4f}")
    for key in ("diversity", "drift"):
        if report.get(key) is not None:
            lines.append(f"{key:<24}{report[key]:>8.4f}")
    return "\n".join(lines)


def eval_rewards(cfg: EvalConfig, reward_cfg: RewardConfig | None = None) -> WeightedRewards | None:
    """``cfg.rewards`` built with ``reward_cfg``'s settings (a run's own: its model folders, its learned reward)."""
    if not cfg.rewards:
        return None
    return build_reward(dataclasses.replace(reward_cfg or RewardConfig(), names=cfg.rewards, weights=()))


class EvalImages(NamedTuple):
    """What an evaluation keeps of its images."""

    pooled: torch.Tensor
    """[N, D] every image :func:`pooled` (diversity, drift, the base's reference)."""
    samples: torch.Tensor
    """[k, 3, H, W] the first sample of every third prompt, at most 48 (the run's sample grid)."""


def evaluate(
    policy: FlowPolicy,
    cfg: EvalConfig,
    reward_cfg: RewardConfig | None = None,
    rewards: WeightedRewards | None = None,
    reference: torch.Tensor | None = None,
    world: distributed.World | None = None,
    lockstep: bool = False,
    subset: bool = False,
    progress: str = "",
) -> tuple[dict[str, Any], EvalImages]:
    """Sample ``samples_per_prompt`` images per prompt, judge and score them; returns (report, images).

    ``cfg.rewards`` score the same images: ``rewards`` when given (built once by :func:`eval_rewards`, as the
    training loop does, since reward models load slowly), else built here from ``reward_cfg``. ``reference``:
    the base model's :func:`pooled` images under the same settings, for ``drift``.

    ``world``: under torchrun every rank calls this; each samples and scores its share of the images
    (:func:`shard_rows`), and the scores, pooled images and the grid's samples are gathered, so rank 0's report is
    the one a single process writes (the other ranks return an empty report). ``lockstep``: the ranks run the
    same number of forward passes (a model sharded with FSDP, whose forwards gather weights from every rank).
    ``subset``: score only every ``cfg.subset_every``-th prompt, each with the noise (and the ``reference`` rows) it
    has in the full set. ``progress``: a bar with this label counts the images sampled (on the main rank).
    """
    records = load_prompts(cfg.prompts)
    judge = build_judge(reward_cfg or RewardConfig()) if cfg.judge else None
    if judge is not None:
        judge.check_prompts(records, cfg.prompts)
    per = cfg.samples_per_prompt
    noise = None
    if subset and cfg.subset_every > 1:
        kept = range(0, len(records), cfg.subset_every)
        image_rows = torch.tensor([p * per + s for p in kept for s in range(per)])
        sigma = float(policy.schedule(cfg.num_steps, cfg.shift)[0])
        noise = policy.noise(len(records) * per, torch.Generator(device="cpu").manual_seed(cfg.seed), sigma)
        noise = noise[image_rows.to(noise.device)]
        reference = None if reference is None else reference[image_rows]
        records = [records[i] for i in kept]
    prompts = [r.prompt for r in records for _ in range(per)]
    metadata = [r.metadata for r in records for _ in range(per)]
    if world is None:
        rows, size, batches = range(len(prompts)), cfg.batch_size, 0
    else:
        rows, size, batches = shard_rows(len(prompts), cfg.batch_size, world.rank, world.size)
    shown = progress if world is None or world.main else ""
    images = generate(policy, prompts, cfg, noise, rows=rows, batch_size=size, batches=batches if lockstep else 0,
                      progress=shown)  # fmt: skip
    grid = range(0, len(prompts), per * 3)[:48]
    local = {"pooled": pooled(images), "samples": images[[i - rows.start for i in grid if i in rows]]}
    if judge is not None:  # the Shapes judge's images are 32 pixels a side: every one goes to the judge
        local["images"] = images
    if cfg.rewards:  # scored in the sampling batches: the scores do not depend on how the rows were shared out
        scorer = (rewards or eval_rewards(cfg, reward_cfg)) if len(rows) else None  # no rows: no reward model call
        parts: dict[str, list[torch.Tensor]] = {n: [torch.zeros(0)] for n in cfg.rewards}
        for lo in range(rows.start, rows.stop, size):
            at = slice(lo, min(lo + size, rows.stop))
            with torch.no_grad():
                scored = scorer(images[at.start - rows.start : at.stop - rows.start], prompts[at], metadata[at])
            for n in cfg.rewards:
                parts[n].append(scored.components[n].detach().float().cpu())
        local |= {f"reward/{n}": torch.cat(p) for n, p in parts.items()}
    every = {k: distributed.gather_ragged(v) for k, v in local.items()}
    if world is not None and not world.main:  # rank 0 writes the report: the others need not judge every image
        return {}, EvalImages(every["pooled"], every["samples"])
    report: dict[str, Any] = {"num_prompts": len(records), "samples_per_prompt": per}
    if judge is not None:
        report = judge.report(records, every["images"], per)
    if cfg.rewards:
        report["rewards"] = {n: every[f"reward/{n}"].mean().item() for n in cfg.rewards}
    report["diversity"] = diversity(every["pooled"], per)
    if reference is not None:
        report["drift"] = drift(every["pooled"], reference)
    report["settings"] = {
        "num_steps": cfg.num_steps,
        "shift": cfg.shift,
        "guidance_scale": cfg.guidance_scale,
        "solver": cfg.solver,
        "seed": cfg.seed,
        "prompts": cfg.prompts,
        **({"subset_every": cfg.subset_every} if noise is not None else {}),
    }
    return report, EvalImages(every["pooled"], every["samples"])
