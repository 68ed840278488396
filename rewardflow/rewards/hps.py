"""HPS v2.1 (Wu et al., "Human Preference Score v2") as a transformers ``CLIPModel``.

HPS v2.1 is an open_clip ViT-H-14 fine-tuned on human preferences. Its score is the cosine of the L2-normalised
image and prompt embeddings (HPSv2 computes ``image_features @ text_features.T`` on normalised features, with no
logit scale), so it lies around 0.2-0.35 for ordinary images.

The published ``HPS_v2.1_compressed.pt`` is an open_clip state dict; :func:`convert_open_clip_checkpoint` renames
it once into a transformers ``CLIPModel`` folder (``config.json`` and safetensors weights). The folder also needs the
CLIP tokenizer and ``preprocessor_config.json`` of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (docs/rewards.md gives
the commands). Preprocessing is open_clip's: shortest side to 224 by bicubic, centre crop, OpenAI CLIP mean / std,
done in torch by :class:`~rewardflow.rewards.clip.ClipPreprocess` so the reward is differentiable.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rewardflow.rewards.clip import _ClipScorer
from rewardflow.types import RewardOutput

# transformers' CLIPTextModel pools the text at the first ``eos_token_id`` unless that id is 2, its legacy value, in
# which case it pools at the largest token id (open_clip's argmax). 49407 is <|endoftext|> of the CLIP tokenizer.
LEGACY_EOS_TOKEN_ID = 2


def vit_h_14_config():
    """The transformers ``CLIPConfig`` of open_clip's ViT-H-14 (the HPS v2.1 backbone).

    Both towers use exact GELU (open_clip's ViT-H-14 is not a quick-GELU model); the text tower pools at
    <|endoftext|> (49407), which is where open_clip's argmax pooling lands whether prompts are padded with 0
    (open_clip) or with <|endoftext|> (the Hugging Face tokenizer of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
    """
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                          num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                          projection_dim=1024, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                              image_size=224, patch_size=14, hidden_act="gelu", projection_dim=1024)  # fmt: skip
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=1024)


def _open_clip_names(config) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every open_clip key the given config needs: ``{open_clip name: (how, transformers names)}``.

    ``how`` is ``copy``, ``transpose`` (open_clip's projections are ``width x dim`` matrices used as ``x @ proj``)
    or ``qkv`` (the fused in-projection of ``nn.MultiheadAttention``, split in three: q, k, v).
    """
    names: dict[str, tuple[str, tuple[str, ...]]] = {}

    def same(src: str, dst: str) -> None:
        names[src] = ("copy", (dst,))

    def tower(src: str, dst: str, layers: int) -> None:
        for i in range(layers):
            s, d = f"{src}.resblocks.{i}", f"{dst}.encoder.layers.{i}"
            for kind in ("weight", "bias"):
                names[f"{s}.attn.in_proj_{kind}"] = ("qkv", tuple(f"{d}.self_attn.{p}_proj.{kind}" for p in "qkv"))
                same(f"{s}.ln_1.{kind}", f"{d}.layer_norm1.{kind}")
                same(f"{s}.attn.out_proj.{kind}", f"{d}.self_attn.out_proj.{kind}")
                same(f"{s}.ln_2.{kind}", f"{d}.layer_norm2.{kind}")
                same(f"{s}.mlp.c_fc.{kind}", f"{d}.mlp.fc1.{kind}")
                same(f"{s}.mlp.c_proj.{kind}", f"{d}.mlp.fc2.{kind}")

    same("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight")
    same("visual.class_embedding", "vision_model.embeddings.class_embedding")
    same("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight")
    tower("visual.transformer", "vision_model", config.vision_config.num_hidden_layers)
    for kind in ("weight", "bias"):
        same(f"visual.ln_pre.{kind}", f"vision_model.pre_layrnorm.{kind}")
        same(f"visual.ln_post.{kind}", f"vision_model.post_layernorm.{kind}")
        same(f"ln_final.{kind}", f"text_model.final_layer_norm.{kind}")
    names["visual.proj"] = ("transpose", ("visual_projection.weight",))
    same("token_embedding.weight", "text_model.embeddings.token_embedding.weight")
    same("positional_embedding", "text_model.embeddings.position_embedding.weight")
    tower("transformer", "text_model", config.text_config.num_hidden_layers)
    names["text_projection"] = ("transpose", ("text_projection.weight",))
    same("logit_scale", "logit_scale")
    return names


def _read_state_dict(pt_path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an open_clip checkpoint, ``{"state_dict": {...}}`` or a bare state dict, ``module.`` stripped."""
    obj = torch.load(pt_path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{pt_path} is not an open_clip state dict: expected a dict of tensors, or {{'state_dict': dict of "
            f"tensors}}, got {type(obj).__name__}"
            + (f" with keys {sorted(map(str, obj))[:5]}" if isinstance(obj, dict) else "")
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def convert_open_clip_checkpoint(
    pt_path: str | Path, out_dir: str | Path, config=None, dtype: torch.dtype = torch.float32
) -> Path:
    """Writes an open_clip CLIP checkpoint (e.g. ``HPS_v2.1_compressed.pt``) as a transformers ``CLIPModel`` folder.

    Read with ``torch.load(weights_only=True)``: tensors only, no code runs. Every key the config needs must be
    there with the right shape, and no other key may be: a mismatch raises ``ValueError`` naming the key.

    Args:
        pt_path: the checkpoint, ``{"state_dict": {name: tensor}}`` or a bare state dict; names may start with
            ``module.``.
        out_dir: the folder to write ``config.json`` and ``model.safetensors`` to (created if needed).
        config: the transformers ``CLIPConfig`` of the architecture (default :func:`vit_h_14_config`).
        dtype: the dtype floating-point weights are stored in.

    Returns:
        ``out_dir``.
    """
    from transformers import CLIPModel

    config = vit_h_14_config() if config is None else config
    eos = config.text_config.eos_token_id
    if eos == LEGACY_EOS_TOKEN_ID or not isinstance(eos, int):
        raise ValueError(
            f"config.text_config.eos_token_id is {eos!r}; give the tokenizer's <|endoftext|> id (49407 for the CLIP "
            f"tokenizer), at which transformers pools the text. {LEGACY_EOS_TOKEN_ID} is transformers' legacy "
            "marker for pooling at the largest token id, which breaks as soon as the vocabulary has added tokens."
        )
    state = _read_state_dict(pt_path)
    names = _open_clip_names(config)
    unknown = sorted(set(state) - set(names))
    if unknown:
        raise ValueError(
            f"checkpoint key {unknown[0]!r} is not part of the configured open_clip model "
            f"({len(unknown)} unknown keys: {unknown[:5]}); check that the checkpoint and the config (layers, "
            "architecture) match"
        )
    missing = [k for k in names if k not in state]
    if missing:
        raise ValueError(
            f"checkpoint has no key {missing[0]!r} ({len(missing)} missing keys: {missing[:5]}), which the "
            "configured model needs; check that the checkpoint and the config (layers, architecture) match"
        )
    with torch.device("meta"):
        model = CLIPModel(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted: dict[str, torch.Tensor] = {}
    for src, (how, dsts) in names.items():
        target = shapes[dsts[0]]
        want = (3 * target[0], *target[1:]) if how == "qkv" else (target[::-1] if how == "transpose" else target)
        tensor = state[src]
        if tuple(tensor.shape) != want:
            raise ValueError(
                f"checkpoint key {src!r} has shape {tuple(tensor.shape)}, the config needs {want} (for {dsts[0]!r})"
            )
        parts = tensor.chunk(3, dim=0) if how == "qkv" else (tensor.t() if how == "transpose" else tensor,)
        for dst, part in zip(dsts, parts):
            converted[dst] = part.to(dtype if part.is_floating_point() else part.dtype).contiguous()
    model.load_state_dict(converted, strict=True, assign=True)
    model.config.dtype = dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return out


class HPSReward(_ClipScorer):
    """HPS v2.1: the cosine of the image and prompt embeddings of the preference-tuned ViT-H-14 (differentiable)."""

    name = "hps"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        from rewardflow.utils.hub import converted_model

        how = ("download HPS_v2.1_compressed.pt from xswu/HPSv2 and the tokenizer and preprocessor_config.json of "
               "laion/CLIP-ViT-H-14-laion2B-s32B-b79K into DIR, run "
               "rewardflow.rewards.hps.convert_open_clip_checkpoint(pt, DIR)")  # fmt: skip
        fix = ("`hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K --include '*token*' vocab.json merges.txt "
               "preprocessor_config.json --local-dir DIR` (vocab.json comes with merges.txt)")  # fmt: skip
        what = "HPS v2.1 as a transformers CLIP model"
        tokenizer = ("CLIP", ("tokenizer.json", "vocab.json"), fix)
        root = converted_model(path, "reward.hps_model", self.name, ("config.json",), what, how, tokenizer)
        super().__init__(root, self.name, "xswu/HPSv2", device)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        return RewardOutput(scores=self.cosine(images, prompts))
