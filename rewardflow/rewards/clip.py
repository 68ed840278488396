"""CLIP-based rewards from a local transformers model folder: PickScore, CLIPScore, and the LAION aesthetic predictor.

All three are differentiable (the direct-gradient methods can back-propagate them): images in [0, 1] are
resized, cropped and normalised in torch exactly as the model's ``CLIPImageProcessor`` describes (shortest
side to ``size`` with bicubic, centre crop ``crop_size``, ``image_mean`` / ``image_std`` from the folder's
``preprocessor_config.json``), instead of the processor's PIL path, which would cut the gradient.

- PickScore (Kirstain et al.): ``logit_scale.exp() * cos(image, text)``, divided by 26 as Flow-GRPO and
  DiffusionNFT do so that it lies near [0, 1]; the model is ``yuvalkirstain/PickScore_v1`` with the
  processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
- CLIPScore: the cosine of the image and prompt embeddings (any CLIP model, e.g. ``openai/clip-vit-large-patch14``).
- LAION aesthetic predictor v2: the L2-normalised image embedding of CLIP ViT-L/14 through a 5-layer MLP head
  (768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations) whose weights are a safetensors file ``aesthetic_head``
  in the folder; the published ``.pth`` converts with ``convert_aesthetic_head``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rewardflow.types import RewardOutput


def _model_dir(path: str | Path, reward: str, example: str) -> Path:
    """The reward's model folder: ``path`` itself, or the Hub model of that id (through the Hub cache)."""
    from rewardflow.utils.hub import model_folder

    field = {"pickscore": "reward.pickscore_model", "clipscore": "reward.clip_model", "hps": "reward.hps_model",
             "aesthetic": "reward.aesthetic_model"}.get(reward, f"reward {reward!r}'s model path")  # fmt: skip
    root = model_folder(path, field, example=example) if path else None
    if root is None or not (root / "config.json").is_file():
        raise FileNotFoundError(
            f"reward {reward!r} needs a transformers model folder or Hub id (config.json, weights, tokenizer and "
            f"preprocessor_config.json), got {str(path)!r}. E.g. {example!r}, or fetch it once where the network "
            f"allows (`hf download {example} --local-dir DIR`) and set the reward's model path to DIR."
        )
    return root


class ClipPreprocess(nn.Module):
    """Differentiable CLIP preprocessing of [B, 3, H, W] images in [0, 1], from a ``preprocessor_config.json``."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        size = config.get("size", {})
        self.size = int(size.get("shortest_edge", size.get("height", 224)) if isinstance(size, dict) else size)
        crop = config.get("crop_size", self.size)
        self.crop = (int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) else (int(crop), int(crop))
        self.register_buffer("mean", torch.tensor(config.get("image_mean", [0.48145466, 0.4578275, 0.40821073])))
        self.register_buffer("std", torch.tensor(config.get("image_std", [0.26862954, 0.26130258, 0.27577711])))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        short, long = (h, w) if h <= w else (w, h)
        long = int(self.size * long / short)  # the processor truncates the long side
        new = (self.size, long) if h <= w else (long, self.size)
        x = F.interpolate(images.float(), size=new, mode="bicubic", antialias=True, align_corners=False)
        top, left = (new[0] - self.crop[0]) // 2, (new[1] - self.crop[1]) // 2
        x = x[..., top : top + self.crop[0], left : left + self.crop[1]]
        return (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)


class _ClipScorer:
    """A CLIP model, its tokenizer and its preprocessing, loaded from ``path`` (frozen, eval mode)."""

    differentiable = True

    def __init__(self, path: str | Path, reward: str, example: str, device: str | torch.device = "cpu") -> None:
        from transformers import AutoTokenizer, CLIPModel

        root = _model_dir(path, reward, example)
        self.model = CLIPModel.from_pretrained(root, local_files_only=True).to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
        processor = root / "preprocessor_config.json"
        config = json.loads(processor.read_text()) if processor.is_file() else {}
        self.preprocess = ClipPreprocess(config).to(device)

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = self.preprocess.mean.device
        pixels = self.preprocess(images.to(device))
        image = self.model.get_image_features(pixel_values=pixels).pooler_output
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            text = self.model.get_text_features(**tokens.to(device)).pooler_output
        return F.cosine_similarity(image.float(), text.float(), dim=-1)


class PickScoreReward(_ClipScorer):
    """PickScore / 26: ``exp(logit_scale) cos(image, prompt) / 26``."""

    name = "pickscore"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        super().__init__(path, self.name, "yuvalkirstain/PickScore_v1", device)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        cos = self.cosine(images, prompts)
        return RewardOutput(scores=self.model.logit_scale.exp().float() * cos / 26.0, details={"cosine": cos.detach()})


class ClipScoreReward(_ClipScorer):
    """CLIPScore: the cosine between the image and prompt embeddings."""

    name = "clipscore"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        super().__init__(path, self.name, "openai/clip-vit-large-patch14", device)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        return RewardOutput(scores=self.cosine(images, prompts))


AESTHETIC_HEAD = "aesthetic_head.safetensors"


def aesthetic_head(width: int) -> nn.Sequential:
    """The LAION aesthetic predictor v2's MLP (its dropouts are identities at evaluation)."""
    return nn.Sequential(nn.Linear(width, 1024), nn.Linear(1024, 128), nn.Linear(128, 64), nn.Linear(64, 16),
                         nn.Linear(16, 1))  # fmt: skip


def convert_aesthetic_head(pth: str | Path, out_dir: str | Path) -> Path:
    """The published ``sac+logos+ava1-l14-linearMSE.pth`` (a state dict) as ``out_dir/aesthetic_head.safetensors``.

    Read with ``torch.load(weights_only=True)``: tensors only, no code runs.
    """
    from safetensors.torch import save_file

    state = torch.load(pth, map_location="cpu", weights_only=True)
    # The original names its Linear layers layers.0, .2, .4, .6, .7 (dropouts in between).
    linear = sorted({k.split(".")[1] for k in state if k.startswith("layers.")}, key=int)
    renamed = {f"{i}.{kind}": state[f"layers.{j}.{kind}"] for i, j in enumerate(linear) for kind in ("weight", "bias")}
    path = Path(out_dir) / AESTHETIC_HEAD
    save_file({k: v.contiguous() for k, v in renamed.items()}, str(path))
    return path


class AestheticReward:
    """The LAION aesthetic predictor v2 (scores about 1-10) on a CLIP vision tower's normalised image embedding."""

    name = "aesthetic"
    differentiable = True

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        from safetensors.torch import load_file
        from transformers import CLIPVisionModelWithProjection

        root = _model_dir(path, self.name, "openai/clip-vit-large-patch14")
        if not (root / AESTHETIC_HEAD).is_file():
            raise FileNotFoundError(
                f"reward 'aesthetic' needs {root / AESTHETIC_HEAD}: convert the LAION predictor's .pth with "
                "rewardflow.rewards.clip.convert_aesthetic_head(pth, folder)"
            )
        vision = CLIPVisionModelWithProjection.from_pretrained(root, local_files_only=True)
        self.vision = vision.to(device).eval().requires_grad_(False)
        self.head = aesthetic_head(vision.config.projection_dim)
        self.head.load_state_dict(load_file(str(root / AESTHETIC_HEAD)))
        self.head.to(device).eval().requires_grad_(False)
        processor = root / "preprocessor_config.json"
        self.preprocess = ClipPreprocess(json.loads(processor.read_text()) if processor.is_file() else {}).to(device)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        pixels = self.preprocess(images.to(self.preprocess.mean.device))
        embeds = self.vision(pixel_values=pixels).image_embeds.float()
        return RewardOutput(scores=self.head(F.normalize(embeds, dim=-1)).squeeze(-1))
