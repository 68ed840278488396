"""FLUX.1 behind :class:`~rewardflow.models.protocol.FlowPolicy`, through diffusers.

The policy is diffusers' ``FluxTransformer2DModel``; the VAE and the two text encoders (CLIP, whose pooled
output conditions the modulation, and T5, whose tokens the attention sees) come from the same ``FluxPipeline``
and stay frozen. Our latent ``x`` is the VAE latent [B, C, H, W]; the transformer sees it packed into 2x2
patches, [B, H/2 * W/2, 4C], with position ids per patch, as the pipeline does. FLUX takes ``sigma`` itself as
its timestep (it scales by 1000 inside).

Guidance: FLUX.1-dev is guidance-distilled: the scale goes into the model's guidance embedding and one pass
gives the guided velocity (``guidance="embedded"``, the default for such models). A model without the
embedding (FLUX.1-schnell, or a de-distilled one) uses true classifier-free guidance with a negative prompt
(``guidance="cfg"``).

The sampling grid is the pipeline's (:func:`flux_sigmas`): ``linspace(1, 1/T, T)`` through the scheduler's
resolution-dependent shift, ``mu`` linear in the number of image tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from rewardflow.models import diffusers_io as dio
from rewardflow.models.protocol import Conditioning, bf16_autocast, guided_velocity
from rewardflow.sampling.schedules import sd3_schedule


def flux_sigmas(scheduler_config, num_steps: int, latent_size: int) -> torch.Tensor:
    """The sigmas ``FluxPipeline`` samples on for ``num_steps`` at this (square, unpacked) latent size.

    As the pipeline: ``linspace(1, 1/T, T)`` given to the scheduler (unless the config sets ``use_flow_sigmas``),
    with ``mu`` from the packed token count ``(latent_size / 2)^2`` and the config's anchors.
    """
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = dict(scheduler_config)
    tokens = (latent_size // 2) ** 2
    mu = calculate_shift(tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))  # fmt: skip
    sigmas = None if cfg.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
    return dio.scheduler_sigmas(cfg, num_steps, sigmas=sigmas, mu=mu)


# The LoRA targets of the FLUX scripts (DanceGRPO, Flow-GRPO's refactor): attention projections of both stream kinds.
FLUX_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C]: each 2x2 patch becomes one token (channels, then the 2x2 offsets)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latents need an even height and width, got {h}x{w}")
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack` for a latent of height ``h`` and width ``w``."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def patch_ids(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Position ids [H/2 * W/2, 3] of the packed patches: (0, row, column), as FLUX's rotary embedding expects."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float().to(device)


class FluxPolicy:
    """FLUX.1 as a flow policy.

    Args:
        pipe: a ``FluxPipeline`` whose transformer is the trained network; its VAE and text encoders are frozen.
        reference: a frozen copy of the transformer for a full fine-tune; None with LoRA (adapters off).
        resolution: image side in pixels.
        guidance: "embedded" (guidance-distilled models: the scale is an input, one pass) or "cfg" (true CFG
            with ``negative_prompt``); default: "embedded" when the transformer has a guidance embedding.
        negative_prompt: the unconditional prompt for "cfg".
        max_sequence_length: T5 tokens per prompt.
        autocast: run the transformer under bfloat16 autocast (float32 weights, or float32 LoRA on bfloat16
            ones); step math stays float32.
    """

    sigma_max = 1.0  # a flow model: sampling starts from pure noise

    def __init__(
        self,
        pipe,
        reference: nn.Module | None = None,
        resolution: int = 1024,
        guidance: Literal["embedded", "cfg"] | None = None,
        negative_prompt: str = "",
        max_sequence_length: int = 512,
        autocast: bool = False,
    ) -> None:
        dio.attach_pipeline(self, pipe, "transformer", reference)
        embedded = bool(self.module.config.guidance_embeds)
        self.guidance = guidance or ("embedded" if embedded else "cfg")
        if self.guidance not in ("embedded", "cfg"):
            raise ValueError(f"guidance must be 'embedded' or 'cfg', got {self.guidance!r}")
        if self.guidance == "embedded" and not embedded:
            raise ValueError("guidance='embedded' needs a guidance-distilled transformer (config.guidance_embeds)")
        factor = pipe.vae_scale_factor * 2  # the VAE's downscaling, then 2x2 packing
        if resolution % factor:
            raise ValueError(f"resolution {resolution} must be a multiple of {factor} (VAE downscaling x 2x2 packing)")
        self.latent_size = resolution // pipe.vae_scale_factor
        self.negative_prompt, self.max_sequence_length, self.autocast = negative_prompt, max_sequence_length, autocast
        self._null: dict[str, torch.Tensor] | None = None  # the negative prompt's encoding ("cfg" only)

    device = property(dio.network_device)

    def schedule(self, num_steps: int, shift: float = 0.0) -> torch.Tensor:
        """The pipeline's sigmas at this resolution (:func:`flux_sigmas`).

        ``shift > 0``: a uniform grid with that fixed shift instead (DanceGRPO's).
        """
        if shift:
            return sd3_schedule(num_steps, shift)
        return flux_sigmas(self.pipe.scheduler.config, num_steps, self.latent_size)

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"embeds": embeds, "pooled": pooled}

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        return dio.encode_with_negative(self, prompts, cfg=self.guidance == "cfg")

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        net = self.weights.active()
        dtype = self.module.dtype
        h, w = x.shape[-2:]
        img_ids = patch_ids(h, w, x.device)
        embedded = self.guidance == "embedded"

        def forward(x: torch.Tensor, sig: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
            txt_ids = torch.zeros(tensors["embeds"].shape[1], 3, device=x.device)
            scale = torch.full_like(sig, guidance_scale) if embedded else None
            with bf16_autocast(x.device.type, self.autocast):
                out = net(
                    hidden_states=pack(x).to(dtype),
                    timestep=sig.to(dtype),  # FLUX's timestep is sigma (scaled by 1000 inside)
                    guidance=scale,
                    pooled_projections=tensors["pooled"].to(dtype),
                    encoder_hidden_states=tensors["embeds"].to(dtype),
                    txt_ids=txt_ids,
                    img_ids=img_ids,
                    return_dict=False,
                )[0]
            return unpack(out, h, w)

        return guided_velocity(forward, x, sigma, cond, 1.0 if embedded else guidance_scale)

    def noise(self, batch: int, generator: torch.Generator | None = None, sigma: float | None = None) -> torch.Tensor:
        return dio.draw_noise(
            (batch, self.module.config.in_channels // 4, self.latent_size, self.latent_size), generator, self.device
        )

    decode = dio.decode_with_vae


FLUX_SPEC = dio.ModelSpec(
    pipeline="FluxPipeline",
    net="transformer",
    lora_targets=FLUX_LORA_TARGETS,
    example="black-forest-labs/FLUX.1-dev",
    native_size=lambda pipe: pipe.default_sample_size * pipe.vae_scale_factor,
)


def load_flux_policy(path: str | Path, **options) -> FluxPolicy:
    """A FLUX.1 policy from a local diffusers folder, ready to fine-tune (options as for SD3)."""
    return dio.load_diffusers_policy(FLUX_SPEC, FluxPolicy, path, **options)
