"""peft glue: add LoRA adapters to any ``nn.Module`` and switch them off for the reference policy."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


def add_lora(
    module: nn.Module, rank: int, alpha: float, target_modules: list[str], adapter_name: str = "default"
) -> nn.Module:
    """Inject a LoRA adapter (Gaussian-initialised A, zero B, so the model is unchanged at start).

    Only the adapter weights stay trainable.
    """
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, init_lora_weights="gaussian")
    module = inject_adapter_in_model(config, module, adapter_name=adapter_name)
    for name, param in module.named_parameters():
        param.requires_grad_("lora_" in name)
    return module


def _lora_layers(module: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


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
