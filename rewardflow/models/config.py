"""The ``model`` section of a run: which model to fine-tune, where it runs and how it is trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from rewardflow.utils.configs import Natural, NonNegative, check_fields


@dataclass
class ModelConfig:
    """Which model to fine-tune and how."""

    kind: Literal["tiny-dit", "sd3", "flux", "sd1"] = "tiny-dit"
    """The Shapes tiny DiT, or a diffusers model from ``path``: Stable Diffusion 3 / 3.5, FLUX.1, or SD 1.x / 2.x
    (a VP UNet seen as a flow; docs/models.md)."""
    checkpoint: str = "base"
    """tiny-dit: a checkpoint path, or "base" for the shipped Shapes base model."""
    path: str = ""
    """sd3 / flux / sd1: the diffusers model: a local folder (model_index.json and its subfolders) or a Hub id,
    fetched through the Hub cache (with HF_HUB_OFFLINE=1, the cache only)."""
    resolution: Natural = 0
    """sd3 / flux: image side in pixels (0: the model's native size)."""
    max_sequence_length: Natural = 0
    """sd3 / flux: T5 tokens per prompt (0: the pipeline's default, 256 for SD3 and 512 for FLUX; Flow-GRPO's SD3.5
    scripts use 128)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """sd3 / flux / sd1: the frozen weights' dtype (LoRA weights and step math are float32 either way; with
    ``autocast`` the network computes in bfloat16)."""
    fsdp: bool = False
    """Full fine-tuning under torchrun: shard weights, gradients and optimizer state over the ranks with FSDP2
    (``fully_shard`` per block; bfloat16 compute with float32 reduction when ``dtype`` is bfloat16)."""
    gradient_checkpointing: bool = False
    """sd3 / flux: activation checkpointing in the transformer (less memory, one more forward per backward)."""
    lora_rank: Natural = 0
    """0 trains every weight (against a frozen reference copy); > 0 trains LoRA adapters of this rank."""
    lora_alpha: NonNegative = 0.0
    """LoRA scale numerator; 0 means 2 * rank."""
    lora_init: Literal["gaussian", "kaiming"] = "gaussian"
    """How LoRA's A starts (B starts at 0 either way): Gaussian (Flow-GRPO, DiffusionNFT) or peft's default
    Kaiming-uniform (DanceGRPO)."""
    lora_targets: tuple[str, ...] = ()
    """sd3 / flux / sd1: the module names LoRA goes on (suffixes, as peft matches them, e.g. ``to_q`` matches every
    block's ``attn.to_q``); empty: the adapter's default (every attention projection of both streams for SD3 and
    FLUX, ``to_q to_k to_v to_out.0`` for the SD UNet)."""
    merge_lora_rollouts: bool = False
    """LoRA: sample rollouts and evaluations with the adapter folded into the base weights (faster on large models;
    Flow-GRPO's on-policy ratio is then 1 within rounding, not bitwise; docs/models.md)."""
    autocast: bool = True
    """bfloat16 autocast for the network's forward (step math stays float32), where the hardware computes bfloat16
    natively: CUDA, or a CPU with AVX512-BF16 / AMX; on other CPUs the network runs in float32, since emulated
    bfloat16 is several times slower (``rewardflow.models.protocol.native_bf16``)."""
    compile: bool = False
    """tiny-dit: run the networks through ``torch.compile`` (on in ``shapes_grpo_cpu`` and ``shapes_grpo``): on 2 CPU
    cores in bf16 a 10-step Shapes iteration took 10.4 s instead of 13.3 (little gain in float32), after a first
    iteration of about 1.5 minutes that compiles (cached on disk for later runs). The on-policy ratio stays exactly 1
    (docs/models.md). Where nothing can be compiled it warns and runs eagerly."""
    device: str = "cpu"
    """Where the network runs: "cpu", "cuda", "cuda:N", or "auto" (CUDA when available). Sampling noise is
    drawn on the CPU either way, so a seed gives the same noise on every device."""

    def __post_init__(self) -> None:
        check_fields(self, "model")
        if self.kind not in ("tiny-dit", "sd3", "flux", "sd1"):
            raise ValueError(f"model.kind must be 'tiny-dit', 'sd3', 'flux' or 'sd1', got {self.kind!r}")
        if self.kind != "tiny-dit" and not self.path:
            raise ValueError(f"model.kind {self.kind!r} needs model.path, the local diffusers model folder")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.lora_targets and (self.kind == "tiny-dit" or not self.lora_rank):
            raise ValueError(
                "model.lora_targets names the LoRA layers of a diffusers model (model.kind sd3, flux or "
                "sd1) with model.lora_rank > 0; leave it empty otherwise"
            )
        if self.max_sequence_length and self.kind not in ("sd3", "flux"):
            raise ValueError(
                f"model.max_sequence_length is T5's token count for model.kind sd3 or flux (0: the "
                f"pipeline's default), got {self.max_sequence_length} for {self.kind!r}"
            )
        if self.lora_init not in ("gaussian", "kaiming"):
            raise ValueError(f"model.lora_init must be 'gaussian' or 'kaiming', got {self.lora_init!r}")
        if self.merge_lora_rollouts and not self.lora_rank:
            raise ValueError("model.merge_lora_rollouts folds LoRA adapters into the weights: set model.lora_rank > 0")
        if self.compile and self.kind != "tiny-dit":
            raise ValueError(f"model.compile is implemented for the tiny DiT only, not model.kind {self.kind!r}")
        if self.fsdp and self.lora_rank:
            raise ValueError("model.fsdp shards a full fine-tune: set model.lora_rank 0, or leave model.fsdp off")
        name, _, index = str(self.device).partition(":")
        if name not in ("cpu", "cuda", "auto") or (index and (name != "cuda" or not index.isdigit())):
            raise ValueError(f"model.device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {self.device!r}")

    def resolved_device(self) -> torch.device:
        """The torch device of ``device``; raises ValueError when CUDA is asked for and absent."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"model.device is {self.device!r} but torch sees no CUDA device; use 'cpu' or 'auto'")
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ValueError(f"model.device is {self.device!r} but torch sees {count} CUDA devices")
        return dev
