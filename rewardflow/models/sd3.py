"""Stable Diffusion 3 / 3.5 behind :class:`~rewardflow.models.protocol.FlowPolicy`, through diffusers.

The policy is diffusers' ``SD3Transformer2DModel``; the VAE (with its scaling and shift factors) and the three
text encoders (two CLIPs and T5) come from the same ``StableDiffusion3Pipeline`` and stay frozen. Prompts are
encoded by the pipeline's own ``encode_prompt`` (once per distinct prompt of a batch, so a GRPO group of G
copies costs one encoding), with the negative prompt for CFG. The model is called with diffusers' timestep
``1000 * sigma`` and predicts the rectified-flow velocity ``eps - x0`` in our convention, so the sampling and
algorithm code is the one the tiny DiT runs. The sampling grid is the pipeline's (:func:`sd3_sigmas`). Only this
file (and the other adapters) import diffusers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rewardflow.models import diffusers_io as dio
from rewardflow.models.protocol import Conditioning, bf16_autocast, guided_velocity
from rewardflow.sampling.schedules import sd3_schedule

# Flow-GRPO's LoRA targets on SD3.5: every attention projection of the joint blocks, image and text streams.
SD3_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


def sd3_sigmas(scheduler_config, num_steps: int, latent_size: int, patch_size: int = 2) -> torch.Tensor:
    """The sigmas ``StableDiffusion3Pipeline`` samples on for ``num_steps`` at this latent size.

    The scheduler's own grid (its shift, ``shift_terminal``, ...); with ``use_dynamic_shifting`` the pipeline's
    ``mu`` for the image's token count, with the pipeline's defaults for anchors the config leaves out.
    """
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    cfg = dict(scheduler_config)
    kwargs = {}
    if cfg.get("use_dynamic_shifting"):
        tokens = (latent_size // patch_size) ** 2
        kwargs["mu"] = calculate_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                       cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))  # fmt: skip
    return dio.scheduler_sigmas(cfg, num_steps, **kwargs)


class SD3Policy:
    """SD3 / SD3.5 as a flow policy.

    Args:
        pipe: a ``StableDiffusion3Pipeline`` whose transformer is the trained network (LoRA adapters or all
            weights trainable); its VAE and text encoders are frozen.
        reference: a frozen copy of the transformer for a full fine-tune; None with LoRA (adapters off).
        resolution: image side in pixels (the latent is ``resolution / vae_scale_factor``).
        negative_prompt: the unconditional branch's prompt for CFG (SD3's default is empty).
        max_sequence_length: T5 tokens per prompt.
        autocast: run the transformer under bfloat16 autocast (float32 weights, or float32 LoRA on bfloat16
            ones); step math stays float32.
    """

    sigma_max = 1.0  # a flow model: sampling starts from pure noise

    def __init__(
        self,
        pipe,
        reference: nn.Module | None = None,
        resolution: int = 512,
        negative_prompt: str = "",
        max_sequence_length: int = 256,
        autocast: bool = False,
    ) -> None:
        dio.attach_pipeline(self, pipe, "transformer", reference)
        factor = pipe.vae_scale_factor
        if resolution % (factor * self.module.config.patch_size):
            raise ValueError(
                f"resolution {resolution} must be a multiple of {factor * self.module.config.patch_size} "
                "(the VAE's downscaling times the transformer's patch size)"
            )
        self.latent_size = resolution // factor
        self.negative_prompt, self.max_sequence_length, self.autocast = negative_prompt, max_sequence_length, autocast
        self._null: dict[str, torch.Tensor] | None = None

    device = property(dio.network_device)

    def schedule(self, num_steps: int, shift: float = 0.0) -> torch.Tensor:
        """The pipeline's sigmas (:func:`sd3_sigmas`); ``shift > 0``: a uniform grid with that fixed shift instead."""
        if shift:
            return sd3_schedule(num_steps, shift)
        return sd3_sigmas(self.pipe.scheduler.config, num_steps, self.latent_size, self.module.config.patch_size)

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"embeds": embeds, "pooled": pooled}

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        return dio.encode_with_negative(self, prompts)

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        net = self.weights.active()
        dtype = self.module.dtype

        def forward(x: torch.Tensor, sig: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
            with bf16_autocast(x.device.type, self.autocast):
                return net(
                    hidden_states=x.to(dtype),
                    timestep=1000.0 * sig,  # diffusers' SD3 timestep convention
                    encoder_hidden_states=tensors["embeds"].to(dtype),
                    pooled_projections=tensors["pooled"].to(dtype),
                    return_dict=False,
                )[0]

        return guided_velocity(forward, x, sigma, cond, guidance_scale)

    def noise(self, batch: int, generator: torch.Generator | None = None, sigma: float | None = None) -> torch.Tensor:
        return dio.draw_noise(
            (batch, self.module.config.in_channels, self.latent_size, self.latent_size), generator, self.device
        )

    decode = dio.decode_with_vae


SD3_SPEC = dio.ModelSpec(
    pipeline="StableDiffusion3Pipeline",
    net="transformer",
    lora_targets=SD3_LORA_TARGETS,
    example="stabilityai/stable-diffusion-3.5-medium",
    native_size=lambda pipe: pipe.transformer.config.sample_size * pipe.vae_scale_factor,
)


def load_sd3_policy(path: str | Path, **options) -> SD3Policy:
    """An SD3 / SD3.5 policy from a local diffusers folder, ready to fine-tune.

    Options (LoRA rank and alpha, device, dtype, resolution, gradient checkpointing, and the policy's own) as in
    :func:`rewardflow.models.diffusers_io.load_diffusers_policy`; LoRA goes on :data:`SD3_LORA_TARGETS`.
    """
    return dio.load_diffusers_policy(SD3_SPEC, SD3Policy, path, **options)
