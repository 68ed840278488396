"""Pretraining the tiny DiT on rendered Shapes scenes with the rectified-flow loss.

Every step draws fresh scenes (prompts uniform over categories, then uniform within one), noise levels
from a logit-normal distribution (SD3's choice: most weight on the middle of the path), and drops 10% of
prompts to the empty prompt so that classifier-free guidance works. Checkpoints of the raw weights and of
their EMA are written every ``save_every`` steps so that the shipped base can be chosen by evaluation,
never blindly (an EMA taken across the loss cliff where shapes become crisp is broken).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

from rewardflow.models.protocol import bf16_autocast
from rewardflow.shapes.grammar import CATEGORIES
from rewardflow.shapes.prompts import random_prompt
from rewardflow.shapes.render import render
from rewardflow.shapes.tiny_dit import ShapesTokenizer, TinyDiT, TinyDiTConfig, load_tiny_dit, save_tiny_dit
from rewardflow.utils.checkpoint import load_state, prune_states, save_state_atomic, state_files
from rewardflow.utils.configs import (
    Count,
    Natural,
    NonNegative,
    Positive,
    Probability,
    Range,
    check_fields,
    config_differences,
    from_dict,
)
from rewardflow.utils.ema import EMA

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    """Settings of ``rewardflow pretrain`` (the shipped base: two stages, docs/pretraining.md, "Reproduce")."""

    out_dir: str = "runs/pretrain"
    model: TinyDiTConfig = field(default_factory=TinyDiTConfig)
    steps: Count = 10_000
    batch_size: Count = 128
    lr: NonNegative = 4e-4
    warmup_steps: Natural = 300
    min_lr_ratio: Probability = 0.1
    weight_decay: NonNegative = 0.0
    grad_clip: Positive = 1.0
    cfg_dropout: Annotated[float, Range(0, 1, high_open=True)] = 0.1
    ema_decay: Annotated[float, Range(0, 1, high_open=True)] = 0.999
    save_every: Count = 500
    log_every: Count = 50
    seed: int = 0
    autocast: bool = True
    """bfloat16 autocast for the network where the CPU computes it natively (the loss stays float32)."""
    resume: bool = False
    """Continue the pretraining in ``out_dir`` from its newest complete state (its settings must be these, but for
    ``steps``); without it ``out_dir`` must be new or empty."""
    init: str | None = None
    """Start from the weights of this tiny-DiT checkpoint (its architecture replaces ``model``, except that
    ``--model.mask-padding``, which has no weights, switches the padding mask on; any other ``--model`` field set to
    something other than its default and the checkpoint's value is an error (a field at its default cannot be told
    from one left out, so it is not checked); the optimizer, EMA and schedule start afresh) instead of random ones:
    a second stage of pretraining."""
    category_weights: Annotated[tuple[float, ...] | None, Range(0)] = None
    """How often each category is drawn, relative to the others, in the order of ``CATEGORIES``:
    single_object, two_object, counting, colors, position, color_attr. None: uniformly."""

    def __post_init__(self) -> None:
        check_fields(self, "pretrain")
        weights = self.category_weights
        if weights is not None and (len(weights) != len(CATEGORIES) or sum(weights) <= 0):
            raise ValueError(
                f"pretrain.category_weights must be {len(CATEGORIES)} non-negative numbers, not all zero, one per "
                f"category in the order {list(CATEGORIES)}; got {list(weights)}"
            )


def scene_batch(
    rng: np.random.Generator, batch: int, category_weights: tuple[float, ...] | None = None
) -> tuple[torch.Tensor, list[str]]:
    """Rendered scenes as float images in [-1, 1] [B, 3, 32, 32] and their prompts.

    Categories are drawn uniformly, or in proportion to ``category_weights`` (one per ``CATEGORIES`` entry).
    """
    p = None if category_weights is None else np.asarray(category_weights, dtype=np.float64) / sum(category_weights)
    images, prompts = [], []
    for _ in range(batch):
        # The uniform draw keeps the random calls of the run behind the shipped base (docs/pretraining.md).
        k = rng.integers(len(CATEGORIES)) if p is None else rng.choice(len(CATEGORIES), p=p)
        spec = random_prompt(rng, CATEGORIES[int(k)])
        img, _ = render(spec, rng)
        images.append(img)
        prompts.append(spec.text)
    arr = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), prompts


def flow_matching_loss(
    model: TinyDiT, x0: torch.Tensor, tokens: torch.Tensor, generator: torch.Generator, autocast: bool
) -> torch.Tensor:
    """Rectified-flow loss ``|v(x_sigma) - (eps - x0)|^2`` with logit-normal sigma."""
    eps = torch.randn(x0.shape, generator=generator)
    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=generator))
    s = sigma[:, None, None, None]
    x = (1 - s) * x0 + s * eps
    with bf16_autocast("cpu", autocast):
        v = model(x, sigma, tokens)
    return (v.float() - (eps - x0)).pow(2).mean()


def _lr(cfg: PretrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def check_out_dir(out: Path, cfg: PretrainConfig) -> None:
    """Refuse an output folder that cannot take this run, before anything is written.

    A folder that is a file; one holding a run without ``--resume``; a resumed folder whose recorded settings differ
    from ``cfg`` (but for ``steps``, ``out_dir``, and how often it logs and saves).
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"pretrain.out_dir {out} is a file; pick another --out-dir")
    held = out.is_dir() and any(out.iterdir())
    if held and not cfg.resume:
        raise FileExistsError(f"pretrain.out_dir {out} is not empty; pick another --out-dir or pass --resume")
    if not held or not cfg.resume:
        return
    saved_path = out / "pretrain_config.json"
    try:
        saved = from_dict(PretrainConfig, json.loads(saved_path.read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"cannot resume: {saved_path} is missing or not a pretraining config ({err})") from err
    ignore = ("out_dir", "steps", "resume", "log_every", "save_every")
    differ = config_differences(saved, cfg, ignore=ignore)
    if differ:
        raise ValueError(
            f"cannot resume {out}: these settings differ from its pretrain_config.json: {', '.join(differ)} (resume "
            "with the settings it started with; only --steps may grow)"
        )


def pretrain(cfg: PretrainConfig) -> Path:
    """Run pretraining; returns the output folder (checkpoints ``step_XXXXX.safetensors`` and ``ema_XXXXX``)."""
    torch.manual_seed(cfg.seed)
    # Before the output folder is touched: a missing or broken --init checkpoint fails here.
    model = load_tiny_dit(cfg.init) if cfg.init else TinyDiT(cfg.model)
    if cfg.init:
        asked = config_differences(TinyDiTConfig(), cfg.model, ignore=("mask_padding",))
        clash = sorted(set(asked) & set(config_differences(model.config, cfg.model)))
        if clash:
            name = clash[0]
            raise ValueError(
                f"pretrain.model.{name} is {getattr(cfg.model, name)!r} but the --init checkpoint has "
                f"{getattr(model.config, name)!r}: under --init the checkpoint decides the architecture, and only "
                "model.mask_padding may be switched on"
            )
    if cfg.model.mask_padding and not model.config.mask_padding:
        model.config = dataclasses.replace(model.config, mask_padding=True)
    out = Path(cfg.out_dir)
    recorded = dataclasses.replace(cfg, model=model.config)  # the architecture trained, also under --init
    check_out_dir(out, recorded)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain_config.json").write_text(json.dumps(dataclasses.asdict(recorded), indent=2))
    tokenizer = ShapesTokenizer(model.config.vocabulary, model.config.max_prompt_tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(list(model.parameters()), decay=lambda k: min(cfg.ema_decay, (1.0 + k) / (10.0 + k)))
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = 0
    states = state_files(out) if cfg.resume else []
    if cfg.resume and not states and (out / "train_state.pt").exists():
        raise ValueError(f"cannot resume {out}: its train_state.pt has no checksum; start a new --out-dir "
                         "(its checkpoints can seed it through --init)")  # fmt: skip
    for path in states:
        try:
            state = load_state(path)  # checked against its SHA-256: a damaged state is skipped, the previous used
        except ValueError as err:
            log.warning("%s; trying the previous state", err)
            continue
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        rng.bit_generator.state = json.loads(state["numpy_rng"])
        gen.set_state(state["torch_rng"])
        start = int(state["step"])
        log.info("resumed pretraining at step %d from %s", start, path)
        break
    else:
        if states:  # every state damaged: starting over would overwrite the checkpoints
            raise ValueError(f"cannot resume {out}: none of its states is complete (see the messages above)")
    log.info("tiny DiT: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    running, t0 = 0.0, time.time()
    for step in range(start, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        x0, prompts = scene_batch(rng, cfg.batch_size, cfg.category_weights)
        tokens = tokenizer(prompts)
        drop = torch.rand(len(prompts), generator=gen) < cfg.cfg_dropout
        tokens[drop] = 0
        loss = flow_matching_loss(model, x0, tokens, gen, cfg.autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.step()
        running += loss.item()
        done = step + 1
        if done % cfg.log_every == 0:
            rec = {"step": done, "loss": running / cfg.log_every, "grad_norm": float(grad_norm), "lr": _lr(cfg, step)}
            rec["seconds"] = time.time() - t0
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            log.info("step %d loss %.4f (%.1fs)", done, rec["loss"], rec["seconds"])
            running = 0.0
        if done % cfg.save_every == 0 or done == cfg.steps:
            meta = {"step": str(done)}
            save_tiny_dit(model, out / f"step_{done:05d}.safetensors", **meta)
            with ema.swapped():
                save_tiny_dit(model, out / f"ema_{done:05d}.safetensors", **meta, ema_decay=str(cfg.ema_decay))
            state = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "ema": ema.state_dict(),
                "numpy_rng": json.dumps(rng.bit_generator.state),
                "torch_rng": gen.get_state(),
                "step": done,
            }
            save_state_atomic(state, out / f"state_{done:05d}.pt")
            prune_states(out, keep=2)
    return out
