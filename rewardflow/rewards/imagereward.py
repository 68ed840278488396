"""ImageReward (Xu et al. 2023) on transformers' BLIP, from a local folder converted from the published checkpoint.

The model: a BLIP ViT-L/16 image encoder, the BLIP text encoder (BERT-base with cross-attention to the image
tokens) and a 5-layer MLP on the text encoder's first output token.

The score, as ImageReward's ``score``: the prompt is tokenised by the BLIP BERT tokenizer (``padding="max_length"``,
``truncation``, ``max_length=35``; the ids go in as the tokenizer gives them, ``[CLS]`` first), the image is resized
(shortest side to 224, bicubic), centre-cropped to 224 and normalised with the CLIP mean / std, the text encoder
attends to every image token, and the head's output ``r`` on token 0 becomes ``(r - 0.16717362830052426) /
1.0333394966054072``. transformers' ``BlipForImageTextRetrieval`` builds its image-text-matching input the same way
(the tokenizer's ids unchanged, the head on token 0).

The published ``ImageReward.pt`` converts once with :func:`convert_imagereward_checkpoint` into a transformers
``BlipForImageTextRetrieval`` folder plus ``imagereward_head.safetensors``; the folder also needs the
``bert-base-uncased`` tokenizer with BLIP's two added tokens (docs/rewards.md). The reward is differentiable in the
image: preprocessing runs in torch and gradients flow through the vision tower, the cross-attention and the head.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rewardflow.rewards.clip import ClipPreprocess
from rewardflow.types import RewardOutput

IMAGEREWARD_HEAD = "imagereward_head.safetensors"
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_LENGTH = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The original MLP is Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear: its Linear layers are
# ``mlp.layers.{0,2,4,6,7}``; ours are 0-4 of a Sequential without the dropouts (identities at evaluation).
_HEAD_LAYERS = (0, 2, 4, 6, 7)
# Keys of ImageReward.pt that scoring does not use (BLIP's contrastive projections, an ITM head, BERT's position-id
# buffer); they are skipped. Any other key must belong to the configured model.
_UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.", "blip.itm_head.")
_UNUSED_KEYS = ("blip.text_encoder.embeddings.position_ids",)


def imagereward_blip_config():
    """The transformers ``BlipConfig`` of ImageReward's BLIP: ViT-L/16 at 224 and BERT-base with cross-attention.

    The vision tower is BLIP's ViT (exact GELU, LayerNorm eps 1e-6, biased fused qkv); the text tower is BLIP's
    ``med_config.json`` (BERT-base: 12 layers of width 768, 12 heads, vocabulary 30524 = bert-base-uncased plus
    [DEC] and [ENC]) whose cross-attention reads the 1024-wide image tokens. Dropouts are 0 (evaluation).
    """
    from transformers import BlipConfig

    text = dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=1024, intermediate_size=3072,
                num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512, hidden_act="gelu",
                layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
                bos_token_id=30522, sep_token_id=102)  # fmt: skip
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=224, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6,
                  attention_dropout=0.0)  # fmt: skip
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=256)


def imagereward_head(width: int = 768) -> nn.Sequential:
    """ImageReward's MLP without its dropouts: width -> 1024 -> 128 -> 64 -> 16 -> 1, no activations."""
    return nn.Sequential(nn.Linear(width, 1024), nn.Linear(1024, 128), nn.Linear(128, 64), nn.Linear(64, 16),
                         nn.Linear(16, 1))  # fmt: skip


def _vision_names(layers: int) -> dict[str, str]:
    """BLIP's original ViT names (under ``blip.visual_encoder.``) to transformers' ``BlipVisionModel`` names."""
    names = {
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "norm.weight": "post_layernorm.weight",
        "norm.bias": "post_layernorm.bias",
    }
    parts = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
             "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # fmt: skip
    for i in range(layers):
        for src, dst in parts.items():
            for kind in ("weight", "bias"):
                names[f"blocks.{i}.{src}.{kind}"] = f"encoder.layers.{i}.{dst}.{kind}"
    return {f"blip.visual_encoder.{k}": f"vision_model.{v}" for k, v in names.items()}


def _imagereward_names(model) -> dict[str, str]:
    """Every ImageReward.pt key the forward pass needs, mapped to its ``BlipForImageTextRetrieval`` name.

    BLIP's text encoder (its ``med.py``) uses the BERT names transformers' ``BlipTextModel`` keeps, so those map
    one to one.
    """
    names = _vision_names(model.config.vision_config.num_hidden_layers)
    names |= {f"blip.text_encoder.{k}": f"text_encoder.{k}" for k in model.text_encoder.state_dict()}
    return names


def _read_checkpoint(pt_path: str | Path) -> dict[str, torch.Tensor]:
    obj = torch.load(pt_path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{pt_path} is not an ImageReward state dict: expected a dict of tensors (keys blip.visual_encoder.*, "
            f"blip.text_encoder.*, mlp.layers.*), got {type(obj).__name__}"
            + (f" with keys {sorted(map(str, obj))[:5]}" if isinstance(obj, dict) else "")
        )
    return obj


def convert_imagereward_checkpoint(
    pt_path: str | Path, out_dir: str | Path, blip_config=None, dtype: torch.dtype = torch.float32
) -> Path:
    """Writes the published ``ImageReward.pt`` as a transformers BLIP folder plus ``imagereward_head.safetensors``.

    Read with ``torch.load(weights_only=True)``: tensors only, no code runs. Every key the forward pass needs must be
    there with the right shape; unknown keys are refused, unused ones (BLIP's ``vision_proj`` / ``text_proj``, BERT's
    ``position_ids``) skipped. Errors are ``ValueError`` naming the key. The retrieval model's own contrastive
    projections are written from the checkpoint when it has them, its ITM head as zeros: scoring uses neither.

    Args:
        pt_path: ``ImageReward.pt``, a state dict.
        out_dir: the folder to write ``config.json``, ``model.safetensors`` and the head to (created if needed).
        blip_config: the transformers ``BlipConfig`` (default :func:`imagereward_blip_config`).
        dtype: the dtype floating-point weights are stored in.

    Returns:
        ``out_dir``.
    """
    from safetensors.torch import save_file
    from transformers import BlipForImageTextRetrieval

    config = imagereward_blip_config() if blip_config is None else blip_config
    state = _read_checkpoint(pt_path)
    with torch.device("meta"):
        model = BlipForImageTextRetrieval(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = _imagereward_names(model)
    head_names = {
        f"mlp.layers.{j}.{kind}": f"{i}.{kind}" for i, j in enumerate(_HEAD_LAYERS) for kind in ("weight", "bias")
    }
    head = imagereward_head(config.text_config.hidden_size)
    head_shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}

    skipped = set(_UNUSED_KEYS) | {k for k in state if k.startswith(_UNUSED_PREFIXES)}
    unknown = sorted(set(state) - set(names) - set(head_names) - skipped)
    if unknown:
        raise ValueError(
            f"checkpoint key {unknown[0]!r} is not part of the configured ImageReward model ({len(unknown)} unknown "
            f"keys: {unknown[:5]}); allowed: the BLIP vision and text encoder keys of the config, mlp.layers."
            f"{{{','.join(map(str, _HEAD_LAYERS))}}}.*, and the unused {', '.join(_UNUSED_PREFIXES)}*"
        )
    missing = [k for k in (*names, *head_names) if k not in state]
    if missing:
        raise ValueError(
            f"checkpoint has no key {missing[0]!r} ({len(missing)} missing keys: {missing[:5]}), which scoring "
            "needs; check that the checkpoint and the config (layers, widths) match"
        )

    def take(src: str, dst: str, want: tuple[int, ...]) -> torch.Tensor:
        tensor = state[src]
        if tuple(tensor.shape) != want:
            raise ValueError(
                f"checkpoint key {src!r} has shape {tuple(tensor.shape)}, the config needs {want} ({dst})"
            )
        return tensor.to(dtype if tensor.is_floating_point() else tensor.dtype).contiguous()

    converted = {dst: take(src, dst, shapes[dst]) for src, dst in names.items()}
    for dst in ("vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias"):
        src = f"blip.{dst}"
        converted[dst] = take(src, dst, shapes[dst]) if src in state else torch.zeros(shapes[dst], dtype=dtype)
    for dst in ("itm_head.weight", "itm_head.bias"):
        converted[dst] = torch.zeros(shapes[dst], dtype=dtype)
    head_state = {dst: take(src, dst, head_shapes[dst]) for src, dst in head_names.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    model.config.dtype = dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_file(head_state, str(out / IMAGEREWARD_HEAD))
    return out


class ImageRewardReward:
    """ImageReward's normalised score (about -2 to 2; higher is better), differentiable in the image."""

    name = "imagereward"
    differentiable = True

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, BlipForImageTextRetrieval

        from rewardflow.utils.hub import converted_model

        what = (f"ImageReward converted to transformers BLIP (config.json, model.safetensors, {IMAGEREWARD_HEAD}, "
                "the BERT tokenizer)")  # fmt: skip
        how = ("download ImageReward.pt from THUDM/ImageReward, run "
               "rewardflow.rewards.imagereward.convert_imagereward_checkpoint(pt, DIR), save the bert-base-uncased "
               "tokenizer with [DEC] and [ENC] added into DIR")  # fmt: skip
        fix = "save bert-base-uncased's there with [DEC] and [ENC] added, as docs/rewards.md shows"
        root = converted_model(path, "reward.imagereward_model", "imagereward", ("config.json", IMAGEREWARD_HEAD),
                               what, how, ("BERT", ("tokenizer.json", "vocab.txt"), fix))  # fmt: skip
        model = BlipForImageTextRetrieval.from_pretrained(root, local_files_only=True)
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
        vocab = model.config.text_config.vocab_size
        if len(self.tokenizer) > vocab:
            raise ValueError(
                f"the tokenizer in {root} has {len(self.tokenizer)} tokens, more than the text encoder's vocabulary "
                f"({vocab}); ImageReward's is bert-base-uncased plus [DEC] and [ENC] (30524)"
            )
        self.head = imagereward_head(model.config.text_config.hidden_size)
        self.head.load_state_dict(load_file(str(root / IMAGEREWARD_HEAD)))
        self.head.to(device).eval().requires_grad_(False)
        size = model.config.vision_config.image_size
        self.preprocess = ClipPreprocess(
            {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size},
             "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}
        ).to(device)  # fmt: skip

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        device = self.preprocess.mean.device
        pixels = self.preprocess(images.to(device))
        image_embeds = self.model.vision_model(pixel_values=pixels.to(self.model.dtype)).last_hidden_state
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        # No tensor of the text path can go under no_grad: the text encoder's output depends on the image
        # through its cross-attention. Its weights are frozen; only the image receives gradient.
        text = self.model.text_encoder(
            input_ids=tokens["input_ids"].to(device),
            attention_mask=tokens["attention_mask"].to(device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device),
        )
        raw = self.head(text.last_hidden_state[:, 0].float()).squeeze(-1)
        return RewardOutput(scores=(raw - SCORE_MEAN) / SCORE_STD, details={"raw": raw.detach()})
