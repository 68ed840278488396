"""The policy a run's ``model`` section describes, fresh or with a run folder's trained weights."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from rewardflow.config import TrainConfig, read_run_config
from rewardflow.models.config import ModelConfig
from rewardflow.models.protocol import FlowPolicy
from rewardflow.shapes.tiny_dit import compile_unavailable, load_policy
from rewardflow.utils.checkpoint import load_trainable

log = logging.getLogger(__name__)


def build_policy(model: ModelConfig, keep_reference: bool = True) -> FlowPolicy:
    """The policy a run trains, as its ``model`` section describes.

    ``keep_reference``: whether the algorithm ever evaluates the reference policy (``Algorithm.needs_reference``);
    without it a full fine-tune of a diffusers model goes without the frozen copy (LeapAlign on FLUX saves 24 GB).
    """
    policy = _load(model, keep_reference)
    policy.weights.merge_lora = model.merge_lora_rollouts
    if model.compile:
        reason = compile_unavailable()
        if reason:
            log.warning("model.compile: torch.compile cannot build code here (%s); the network runs eagerly", reason)
        policy.compile = not reason
    return policy


def _load(m: ModelConfig, keep_reference: bool = True) -> FlowPolicy:
    if m.kind == "tiny-dit":
        if m.lora_init != "gaussian":
            raise ValueError("model.lora_init is for the diffusers models (model.kind sd3, flux or sd1)")
        return load_policy(
            m.checkpoint,
            lora_rank=m.lora_rank,
            lora_alpha=m.lora_alpha,
            autocast=m.autocast,
            device=m.resolved_device(),
        )
    if m.kind == "sd3":
        from rewardflow.models.sd3 import load_sd3_policy as load
    elif m.kind == "flux":
        from rewardflow.models.flux import load_flux_policy as load
    else:
        from rewardflow.models.sd1 import load_sd1_policy as load
    extra = {"max_sequence_length": m.max_sequence_length} if m.max_sequence_length else {}
    return load(
        m.path,
        lora_rank=m.lora_rank,
        lora_alpha=m.lora_alpha,
        device=m.resolved_device(),
        dtype=getattr(torch, m.dtype),
        resolution=m.resolution or None,
        gradient_checkpointing=m.gradient_checkpointing,
        lora_targets=m.lora_targets,
        lora_init=m.lora_init,
        keep_reference=keep_reference,
        autocast=m.autocast,
        **extra,
    )


def load_trained_policy(run_dir: str | Path, device: str | None = None) -> tuple[FlowPolicy, TrainConfig]:
    """The policy of a run folder with its latest EMA checkpoint loaded, and the run's config.

    ``device`` overrides the run's ``model.device`` (a run trained on a GPU can be evaluated on a CPU).
    """
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a run folder (no config.yaml)")
    cfg = read_run_config(run)
    ckpts = sorted((run / "checkpoints").glob("iter_*.safetensors"))
    if not ckpts:
        raise FileNotFoundError(f"run folder {run} has no checkpoints/iter_*.safetensors yet")
    if device is not None:
        cfg.model = dataclasses.replace(cfg.model, device=device)  # re-checks the value
    policy = build_policy(cfg.model, cfg.method().needs_reference)
    load_trainable(list(policy.named_trainable_state()), ckpts[-1])
    return policy, cfg
