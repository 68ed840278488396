"""Random diffusers pipelines built from config, offline (no download, no tokenizer files).

Tiny ones for the CPU tests; and the real SD3.5-Medium / FLUX.1-dev transformer and VAE architectures with random
weights (:func:`random_pipeline`, :func:`random_policy`) for the throughput benchmark and the GPU tier.

The tokenizers are character-level: a CLIP BPE tokenizer with no merges over the 256 byte characters, and a
T5 unigram tokenizer over lowercase letters, digits and punctuation. Saved with ``save_pretrained``, a folder
loads through the same ``from_pretrained`` code as a real model.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _byte_characters() -> list[str]:
    """GPT-2 / CLIP's printable stand-in for each byte, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b if b in printable else next(extra)) for b in range(256)]


def clip_tokenizer():
    """A character-level CLIP tokenizer (byte characters, no merges), built in memory."""
    from transformers import CLIPTokenizer

    chars = _byte_characters()
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    """A character-level T5 (unigram) tokenizer, built in memory."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,'\""]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def tiny_sd3_pipeline(seed: int = 0):
    """A StableDiffusion3Pipeline of about 0.4M parameters: 32x32 images, 16x16x4 latents, patch 2."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok, t5tok = clip_tokenizer(), t5_tokenizer()

    def clip():
        return CLIPTextModelWithProjection(
            CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           num_hidden_layers=2, projection_dim=32, max_position_embeddings=77,
                           bos_token_id=512, eos_token_id=513, pad_token_id=513)
        )  # fmt: skip

    t5 = T5EncoderModel(T5Config(vocab_size=len(t5tok), d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))  # fmt: skip
    vae = _tiny_vae()
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64,
        pos_embed_max_size=32,
    )  # fmt: skip
    with torch.no_grad():  # diffusers zero-initialises the output layer: randomise it so v depends on the input
        for name, p in transformer.named_parameters():
            if "proj_out" in name or "norm_out" in name:
                p.normal_(0, 0.05)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip(), tokenizer=tok, text_encoder_2=clip(), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5, tokenizer_3=t5tok,
    )  # fmt: skip


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A FluxPipeline of about 0.1M parameters: 32x32 images, 16x16x4 latents packed into 64 tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok, t5tok = clip_tokenizer(), t5_tokenizer()
    clip = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_hidden_layers=2, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                       pad_token_id=513)
    )  # fmt: skip
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5tok), d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))  # fmt: skip
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        guidance_embeds=guidance_embeds,
    )  # fmt: skip
    with torch.no_grad():  # randomise the zero-initialised output layer so that v depends on the input
        for name, p in transformer.named_parameters():
            if "proj_out" in name or "norm_out" in name:
                p.normal_(0, 0.05)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256, base_shift=0.5, max_shift=1.15
    )
    return FluxPipeline(
        scheduler=scheduler, vae=_tiny_vae(), text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
        tokenizer_2=t5tok, transformer=transformer,
    )  # fmt: skip


def _tiny_vae(shift_factor: float | None = 0.1):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=shift_factor, scaling_factor=1.5,
    )  # fmt: skip


def save_tiny_flux(path: Path, guidance_embeds: bool = True) -> Path:
    """:func:`tiny_flux_pipeline` saved as a diffusers folder at ``path``."""
    tiny_flux_pipeline(guidance_embeds=guidance_embeds).save_pretrained(path)
    return path


def save_tiny_sd3(path: Path) -> Path:
    """:func:`tiny_sd3_pipeline` saved as a diffusers folder at ``path``."""
    tiny_sd3_pipeline().save_pretrained(path)
    return path


def tiny_sd1_pipeline(seed: int = 0):
    """A StableDiffusionPipeline with a tiny epsilon-prediction UNet and SD 1.x's DDIM noise schedule."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = clip_tokenizer()
    clip = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_hidden_layers=2, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                       pad_token_id=513)
    )  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )  # fmt: skip
    with torch.no_grad():  # randomise the zero-initialised output layer so that eps depends on the input
        for name, p in unet.named_parameters():
            if "conv_out" in name:
                p.normal_(0, 0.05)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,
    )  # SD 1.x's betas; final alpha 1 so that DDIM ends on clean latents
    return StableDiffusionPipeline(
        vae=_tiny_vae(shift_factor=None), text_encoder=clip, tokenizer=tok, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def save_tiny_sd1(path: Path) -> Path:
    """:func:`tiny_sd1_pipeline` saved as a diffusers folder at ``path``."""
    tiny_sd1_pipeline().save_pretrained(path)
    return path


def save_tiny_clip(path: Path, aesthetic_head_width: int | None = 16) -> Path:
    """A tiny random ``CLIPModel`` with its tokenizer and processor (24 px images) saved at ``path``.

    With ``aesthetic_head_width`` it also holds a random LAION-style aesthetic head, so every CLIP-based reward
    (PickScore, CLIPScore, aesthetic) loads from the folder.
    """
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from rewardflow.rewards.clip import AESTHETIC_HEAD, aesthetic_head

    torch.manual_seed(0)
    tok = clip_tokenizer()
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_hidden_layers=2, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                          pad_token_id=513, projection_dim=16)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                              image_size=24, patch_size=8, projection_dim=16)  # fmt: skip
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}).save_pretrained(path)
    if aesthetic_head_width:
        head = aesthetic_head(aesthetic_head_width)
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(Path(path) / AESTHETIC_HEAD))
    return Path(path)


# The published configurations of the SD3.5-Medium and FLUX.1-dev transformers and their 16-channel VAE.
SD35M = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
             pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
             qk_norm="rms_norm")  # fmt: skip
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))  # fmt: skip
VAE16 = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             use_quant_conv=False, use_post_quant_conv=False)  # fmt: skip
# Prompt-embedding tokens and width, pooled width, the papers' guidance scale, per model and size.
EMBEDDINGS = {("sd3", "real"): (333, 4096, 2048, 4.5), ("flux", "real"): (512, 4096, 768, 3.5),
              ("sd3", "tiny"): (93, 64, 64, 4.5), ("flux", "tiny"): (16, 64, 32, 3.5)}  # fmt: skip


def random_init(module: torch.nn.Module) -> torch.nn.Module:
    """Random values everywhere (materialised from meta): matrices N(0, 0.02), norm weights 1, the rest N(0, 1e-2)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.02)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 1e-2)
        for b in module.buffers():
            if b.is_floating_point():
                b.normal_(0, 1e-2)
    return module


def random_pipeline(model: str, size: str, device: torch.device, dtype: torch.dtype):
    """An SD3 (``model="sd3"``) or FLUX pipeline with random weights, real-sized or tiny.

    ``size="real"`` has the SD3.5-M / FLUX.1-dev transformer and VAE (built on the meta device, materialised on
    ``device``), ``"tiny"`` the tiny test models.

    The text encoders are tiny either way: prompts come as random embeddings of the real shapes
    (:func:`random_conditioning`), since the encoders run once per prompt and cost no algorithm anything.
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel

    pipe = tiny_sd3_pipeline() if model == "sd3" else tiny_flux_pipeline()
    if size == "real":
        cls, config = (SD3Transformer2DModel, SD35M) if model == "sd3" else (FluxTransformer2DModel, FLUX_DEV)
        with torch.device("meta"):
            transformer, vae = cls(**config), AutoencoderKL(**VAE16)
        pipe.transformer = random_init(transformer.to(dtype).to_empty(device=device))
        pipe.vae = random_init(vae.to(dtype).to_empty(device=device))
        pipe.vae_scale_factor = 8
    return pipe.to(device=device, dtype=dtype)


def random_policy(pipe, model: str, mode: str, resolution: int, lora_rank: int = 32):
    """The library's policy over :func:`random_pipeline`'s ``pipe``, for LoRA or full fine-tuning.

    ``mode`` "lora": rank ``lora_rank``, alpha 2 * rank, on the adapter's usual targets; "full": every transformer
    weight trains, against a frozen reference copy.
    """
    import copy

    from rewardflow.models.flux import FLUX_LORA_TARGETS, FluxPolicy
    from rewardflow.models.lora import add_lora
    from rewardflow.models.sd3 import SD3_LORA_TARGETS, SD3Policy

    transformer = pipe.transformer
    transformer.requires_grad_(False)
    reference = None
    if mode == "lora":
        add_lora(
            transformer, lora_rank, 2.0 * lora_rank, list(SD3_LORA_TARGETS if model == "sd3" else FLUX_LORA_TARGETS)
        )
        transformer.to(dtype=pipe.vae.dtype)
    else:
        transformer.requires_grad_(True)
        reference = copy.deepcopy(transformer).requires_grad_(False)
    cls = SD3Policy if model == "sd3" else FluxPolicy
    return cls(pipe, reference=reference, resolution=resolution)


def random_conditioning(model: str, size: str, batch: int, device: torch.device, dtype: torch.dtype, seed: int = 1):
    """Random prompt embeddings of :data:`EMBEDDINGS`' shapes for ``batch`` rows (SD3 with a negative branch)."""
    from rewardflow.models.protocol import Conditioning

    tokens, width, pooled, _ = EMBEDDINGS[(model, size)]
    g = torch.Generator().manual_seed(seed)
    tensors = {"embeds": torch.randn(batch, tokens, width, generator=g).to(device, dtype),
               "pooled": torch.randn(batch, pooled, generator=g).to(device, dtype)}  # fmt: skip
    null = (
        {k: torch.randn(v.shape, generator=g).to(device, dtype) for k, v in tensors.items()} if model == "sd3" else {}
    )
    return Conditioning([f"prompt {i}" for i in range(batch)], tensors, null)
