"""What the diffusers adapters share: loading a local model folder, noise and decoding, saving and loading LoRA."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rewardflow.models.lora import TRAINED_ADAPTER, add_lora, has_lora
from rewardflow.models.protocol import Conditioning
from rewardflow.models.weights import PolicyWeights


def check_model_dir(path: str | Path, pipeline: str, example: str) -> Path:
    """``path`` (a local folder or a Hub id) as a diffusers pipeline folder of class ``pipeline``.

    A Hub id is fetched through the Hub cache (:func:`rewardflow.utils.hub.model_folder`; offline: the cache only).

    Raises:
        FileNotFoundError: not found, or no ``model_index.json`` there; the message names a model to download.
        ValueError: the folder holds another kind of pipeline.
    """
    from rewardflow.utils.hub import model_folder

    root = model_folder(path, "model.path", pipeline=True, example=example)
    index = root / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"model.path {str(path)!r} is not a diffusers model folder (no model_index.json). Give a Hub id such as "
            f"{example!r}, or download one once where the network allows (`hf download {example} --local-dir "
            f"{path}`) and point model.path at that folder."
        )
    kind = json.loads(index.read_text()).get("_class_name")
    if kind != pipeline:
        raise ValueError(f"model.path {str(path)!r} holds a {kind}, but this model kind needs a {pipeline}")
    return root


def encode_distinct(
    prompts: list[str],
    encode: Callable[[list[str]], dict[str, torch.Tensor]],
    null: dict[str, torch.Tensor] | None,
) -> Conditioning:
    """Conditioning for ``prompts``, encoding each distinct prompt once (a GRPO group of G copies costs one).

    ``null``: the negative prompt's tensors (batch 1, encoded once by the adapter), repeated for every row; None
    for a model without an unconditional branch.
    """
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("encode_prompts needs a non-empty list of prompt strings")
    distinct = list(dict.fromkeys(prompts))
    where = {p: i for i, p in enumerate(distinct)}
    with torch.no_grad():
        tensors = encode(distinct)
    rows = torch.tensor([where[p] for p in prompts], device=next(iter(tensors.values())).device)
    repeated = {k: v.expand(len(prompts), *v.shape[1:]) for k, v in (null or {}).items()}
    return Conditioning(list(prompts), {k: v[rows] for k, v in tensors.items()}, repeated)


def encode_with_negative(policy: Any, prompts: list[str], cfg: bool = True) -> Conditioning:
    """``prompts`` through ``policy._encode`` (:func:`encode_distinct`), with the negative prompt's encoding for CFG.

    The negative prompt never changes: it is encoded once and kept on the policy (``policy._null``); ``cfg`` False
    (a guidance-distilled FLUX) needs none.
    """
    if cfg and policy._null is None:
        with torch.no_grad():
            policy._null = policy._encode([policy.negative_prompt])
    return encode_distinct(prompts, policy._encode, policy._null)


def scheduler_sigmas(config, num_steps: int, **kwargs) -> torch.Tensor:
    """The sigmas [num_steps + 1] (float32, ending at 0) that a diffusers scheduler of this config samples on.

    A fresh scheduler of the config's class is set with ``diffusers``' own ``retrieve_timesteps``, given what a
    pipeline's ``__call__`` gives it (``kwargs``: FLUX's custom ``sigmas`` and ``mu``, a dynamic-shifting SD3's
    ``mu``), so the shift, ``use_dynamic_shifting``, ``shift_terminal`` and the rest come from the config itself.
    """
    import diffusers
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    config = dict(config)
    scheduler = getattr(diffusers, config.get("_class_name", "FlowMatchEulerDiscreteScheduler")).from_config(config)
    retrieve_timesteps(scheduler, num_steps, "cpu", **kwargs)
    return scheduler.sigmas.float()


def draw_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normal latents drawn on the generator's device (the CPU for a seeded run), moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def decode_latents(vae, x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] from clean latents: undo the VAE's scaling and shift, decode (differentiable)."""
    latents = x / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0.0, 1.0)


def attach_pipeline(policy: Any, pipe: Any, net: str, reference: torch.nn.Module | None) -> None:
    """Give an adapter its pipeline, its trained network ``pipe.<net>`` (``policy.module``) and the weights' interface.

    :class:`~rewardflow.models.weights.PolicyWeights` answers the policy's weight methods (trainable, reference, old).
    """
    policy.pipe, policy.module = pipe, getattr(pipe, net)
    policy.weights = PolicyWeights(policy.module, reference)
    policy.weights.expose_on(policy)


def network_device(policy: Any) -> torch.device:
    """Where an adapter's network runs (an adapter's ``device`` property)."""
    return next(policy.module.parameters()).device


def decode_with_vae(policy: Any, x: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] from clean latents through the pipeline's VAE (an adapter's ``decode``).

    Differentiable, for the direct-gradient methods.
    """
    return decode_latents(policy.pipe.vae, x)


def freeze_all_but(pipe, net: str) -> None:
    """Every network of ``pipe`` but ``net`` (the VAE, the text encoders) frozen and in eval mode; no progress bars."""
    pipe.set_progress_bar_config(disable=True)
    for name, part in pipe.components.items():
        if name != net and isinstance(part, torch.nn.Module):
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


@dataclass(frozen=True)
class ModelSpec:
    """What differs between the diffusers adapters when loading: the pipeline, the network, where to get it."""

    pipeline: str  # diffusers pipeline class name, also the model_index.json class it must match
    net: str  # the pipeline attribute that is trained ("transformer" or "unet")
    lora_targets: tuple[str, ...]
    example: str  # a hub id to name in the "download it" message
    native_size: Callable  # pipe -> default resolution in pixels


def load_diffusers_policy(
    spec: ModelSpec,
    policy_cls,
    path: str | Path,
    lora_rank: int = 0,
    lora_alpha: float = 0.0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    resolution: int | None = None,
    gradient_checkpointing: bool = False,
    lora_targets: tuple[str, ...] = (),
    lora_init: str = "gaussian",
    keep_reference: bool = True,
    **policy_kwargs,
):
    """A ``policy_cls`` around the pipeline in a local folder, its network ready to train. Nothing is downloaded.

    ``lora_rank > 0``: LoRA on ``lora_targets`` (module name suffixes, as peft matches them; empty: the spec's
    targets), alpha defaulting to 2 * rank, A initialised by ``lora_init``; the reference is the network with
    adapters off. Otherwise every weight of the network trains against a frozen copy (none with
    ``keep_reference=False``, for a run that never uses the reference). ``resolution`` defaults to
    the model's native size; ``policy_kwargs`` go to the policy (negative prompt, sequence length, autocast, ...).
    """
    import diffusers

    root = check_model_dir(path, spec.pipeline, spec.example)
    pipe = getattr(diffusers, spec.pipeline).from_pretrained(root, dtype=dtype, local_files_only=True).to(device)
    freeze_all_but(pipe, spec.net)
    network = getattr(pipe, spec.net)
    if gradient_checkpointing:
        network.enable_gradient_checkpointing()
    reference = None
    if lora_rank > 0:
        add_lora(network, lora_rank, lora_alpha or 2.0 * lora_rank, list(lora_targets or spec.lora_targets),
                 init=lora_init)  # fmt: skip
    else:
        network.requires_grad_(True)
        if keep_reference:
            reference = copy.deepcopy(network).requires_grad_(False).eval()
    size = resolution or spec.native_size(pipe)
    return policy_cls(pipe, reference=reference, resolution=size, **policy_kwargs)


def load_lora(policy, directory: str | Path) -> None:
    """Load a LoRA saved by :func:`save_lora` (diffusers' layout) into the policy's trained adapter.

    Raises:
        ValueError: the policy has no LoRA adapters, or the file's adapter does not fit them (other layers, another
            rank): the message names the folder and the first mismatch.
    """
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
