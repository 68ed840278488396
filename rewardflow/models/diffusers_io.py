"""What the diffusers adapters share: finding a local model folder, freezing a pipeline, saving LoRA weights."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from rewardflow.models.lora import TRAINED_ADAPTER, add_lora, has_lora


def check_model_dir(path: str | Path, pipeline: str, example: str) -> Path:
    """``path`` as a local diffusers pipeline folder of class ``pipeline``, or an error that says what to fetch.

    Raises:
        FileNotFoundError: no ``model_index.json`` there; the message names a model to download and how.
        ValueError: the folder holds another kind of pipeline.
    """
    root = Path(path)
    index = root / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"model.path {str(path)!r} is not a diffusers model folder (no model_index.json). Download the weights "
            f"once where the network allows, e.g. `huggingface-cli download {example} --local-dir {path}`, "
            "then point model.path at that folder."
        )
    kind = json.loads(index.read_text()).get("_class_name")
    if kind != pipeline:
        raise ValueError(f"model.path {str(path)!r} holds a {kind}, but this model kind needs a {pipeline}")
    return root


def freeze_all_but(pipe, net: str) -> None:
    """Every network of ``pipe`` but ``net`` (the VAE, the text encoders) frozen and in eval mode; no progress bars."""
    pipe.set_progress_bar_config(disable=True)
    for name, part in pipe.components.items():
        if name != net and hasattr(part, "requires_grad_"):
            part.requires_grad_(False).eval()


def save_lora(policy, directory: str | Path) -> Path:
    """The trained LoRA of ``policy.module`` in diffusers' layout, loadable by ``pipe.load_lora_weights``.

    The adapter's config (rank, alpha, targets) is saved with the weights, so the loaded scale is the trained one.

    Raises:
        ValueError: the policy is a full fine-tune (save ``policy.module.save_pretrained(...)`` instead).
    """
    from peft.utils import get_peft_model_state_dict

    if not has_lora(policy.module):
        raise ValueError("this policy has no LoRA adapters (a full fine-tune): use policy.module.save_pretrained")
    net = "unet" if policy.module is getattr(policy.pipe, "unet", None) else "transformer"
    policy.pipe.save_lora_weights(
        directory,
        **{
            f"{net}_lora_layers": get_peft_model_state_dict(policy.module, adapter_name=TRAINED_ADAPTER),
            f"{net}_lora_adapter_metadata": policy.module.peft_config[TRAINED_ADAPTER].to_dict(),
        },
    )
    return Path(directory)


def load_pipeline(
    pipeline_cls,
    path: str | Path,
    example: str,
    lora_targets: tuple[str, ...],
    lora_rank: int,
    lora_alpha: float,
    device,
    dtype,
    gradient_checkpointing: bool,
    net: str = "transformer",
):
    """A pipeline from a local folder with its denoising network ``net`` ready to train; returns (pipe, reference).

    ``lora_rank > 0``: LoRA on ``lora_targets`` (alpha defaults to 2 * rank), the reference is the network with
    adapters off (None). Otherwise every weight of the network trains against a frozen copy (the reference).
    """
    root = check_model_dir(path, pipeline_cls.__name__, example)
    pipe = pipeline_cls.from_pretrained(root, dtype=dtype, local_files_only=True).to(device)
    freeze_all_but(pipe, net)
    network = getattr(pipe, net)
    if gradient_checkpointing:
        network.enable_gradient_checkpointing()
    if lora_rank > 0:
        add_lora(network, lora_rank, lora_alpha or 2.0 * lora_rank, list(lora_targets))
        return pipe, None
    network.requires_grad_(True)
    return pipe, copy.deepcopy(network).requires_grad_(False).eval()


def load_lora(policy, directory: str | Path) -> None:
    """Load a LoRA saved by :func:`save_lora` (diffusers' layout) into the policy's trained adapter.

    Raises:
        ValueError: the policy has no LoRA adapters, or the file's adapter does not fit them (other layers, another
            rank): the message names the folder and the first mismatch.
    """
    import torch
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    if not has_lora(policy.module):
        raise ValueError("this policy has no LoRA adapters to load into (build it with lora_rank > 0)")
    net = "unet" if policy.module is getattr(policy.pipe, "unet", None) else "transformer"
    loaded = policy.pipe.lora_state_dict(directory)
    weights = loaded[0] if isinstance(loaded, tuple) else loaded
    state = {k.removeprefix(f"{net}."): v for k, v in weights.items() if k.startswith(f"{net}.")}
    own = get_peft_model_state_dict(policy.module, adapter_name=TRAINED_ADAPTER)
    problems = [f"{k} is not one of this policy's LoRA weights" for k in sorted(set(state) - set(own))]
    problems += [f"{k} is missing" for k in sorted(set(own) - set(state))]
    problems += [
        f"{k} has shape {tuple(v.shape)}, the policy's {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if problems:
        raise ValueError(
            f"LoRA in {str(directory)!r} does not fit this policy's adapters ({len(problems)} problems; first: "
            f"{problems[0]}): was it trained on another model or with another lora_rank?"
        )
    with torch.no_grad():
        set_peft_model_state_dict(policy.module, state, adapter_name=TRAINED_ADAPTER)
