"""peft glue: add LoRA adapters to any ``nn.Module``, switch them off (the reference policy), keep a second one.

The trained adapter is named ``"default"`` (peft's default name); DiffusionNFT's old policy is an adapter
``"old"`` on the same layers.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

TRAINED_ADAPTER = "default"
OLD_ADAPTER = "old"


def add_lora(
    module: nn.Module,
    rank: int,
    alpha: float,
    target_modules: list[str],
    adapter_name: str = TRAINED_ADAPTER,
    init: str = "gaussian",
) -> nn.Module:
    """Inject a LoRA adapter: B zero, so the model is unchanged at start; A Gaussian, or Kaiming-uniform (``init``).

    Only the adapter weights stay trainable, and they are float32 whatever the base weights' dtype (peft casts the
    layer's input to them and the result back): AdamW steps of a 3e-4 learning rate would be lost in bfloat16
    adapters, and the official scripts train float32 adapters too.
    """
    from peft import LoraConfig, inject_adapter_in_model  # peft (and transformers) load only when LoRA is used

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules,
                        init_lora_weights="gaussian" if init == "gaussian" else True)  # fmt: skip
    module = inject_adapter_in_model(config, module, adapter_name=adapter_name)
    for name, param in module.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" in name and param.dtype != torch.float32:
            param.data = param.data.float()
    return module


def _lora_layers(module: nn.Module) -> list[Any]:
    # A model can only hold peft layers once peft is imported: without it, there is nothing to look for.
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    return [] if tuners is None else [m for m in module.modules() if isinstance(m, tuners.BaseTunerLayer)]


def has_lora(module: nn.Module) -> bool:
    """Whether ``module`` carries peft adapters."""
    return bool(_lora_layers(module))


@torch.no_grad()
def add_adapter_copy(module: nn.Module, source: str, name: str) -> None:
    """Add adapter ``name`` to every layer that has adapter ``source``, as a frozen copy of it.

    ``source`` stays the active adapter and keeps its ``requires_grad``.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = {n: m for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)}
    first = next(iter(layers.values()))
    config = LoraConfig(
        r=first.r[source], lora_alpha=first.lora_alpha[source], target_modules=list(layers), init_lora_weights=False
    )
    with warnings.catch_warnings():  # peft warns that the model gets a second adapter: that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, module, adapter_name=name)
    params = dict(module.named_parameters())
    for n, p in params.items():
        if f".{name}." in n:  # the copy takes the source's dtype too (float32 adapters on a bfloat16 base)
            p.data = params[n.replace(f".{name}.", f".{source}.")].detach().clone()
            p.requires_grad_(False)
    for layer in layers.values():
        layer.set_adapter(source)  # peft activates the newest adapter; keep the trained one active


@contextmanager
def use_adapter(module: nn.Module, name: str, back_to: str) -> Iterator[None]:
    """Run with adapter ``name`` active (frozen) inside the context, then with ``back_to`` (trainable) again."""
    layers = _lora_layers(module)
    for layer in layers:
        layer.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_adapter(back_to)


@contextmanager
def merged_adapters(module: nn.Module) -> Iterator[None]:
    """Run with each LoRA layer's active adapter folded into its base weight (for sampling without gradient).

    Inside the context every LoRA layer's base weight is a new tensor ``W + scale B A`` (summed in float32,
    stored in W's dtype) and the adapter branch is bypassed, so a forward pass costs what the base model's does.
    On exit the original weight tensors are put back as they were: peft's own ``merge`` / ``unmerge`` would
    subtract the delta again, which does not give W back bit for bit, and the reference policy (adapters off)
    would drift a little every iteration. While inside, the adapted layers' weights exist twice.
    """
    layers = [layer for layer in _lora_layers(module) if not layer.disable_adapters]
    swapped: list[tuple[nn.Module, nn.Parameter]] = []
    try:
        with torch.no_grad():
            for layer in layers:
                base = layer.get_base_layer()
                weight = base.weight
                delta = sum(layer.get_delta_weight(name).float() for name in layer.active_adapters)
                swapped.append((base, weight))
                base.weight = nn.Parameter((weight.float() + delta).to(weight.dtype), requires_grad=False)
                layer.enable_adapters(False)
        yield
    finally:
        for base, weight in swapped:
            base.weight = weight
        for layer in layers:
            layer.enable_adapters(True)


@contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Run the base model: every LoRA layer is bypassed inside the context.

    Raises:
        ValueError: the module has no adapters (a full fine-tune needs a frozen reference copy instead).
    """
    layers = _lora_layers(module)
    if not layers:
        raise ValueError("the model has no LoRA adapters; a full fine-tune needs a frozen reference copy")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
