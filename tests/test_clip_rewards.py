"""PickScore, CLIPScore and the aesthetic predictor on tiny random CLIP models saved to disk (no download)."""

import json

import numpy as np
import pytest
import torch

from rewardflow.models.tiny_diffusers import save_tiny_clip
from rewardflow.rewards import build_reward, differentiable_rewards
from rewardflow.rewards.clip import ClipPreprocess, convert_aesthetic_head
from rewardflow.rewards.config import RewardConfig

PROMPTS = ["a red cube", "two dogs"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "model")


def test_preprocessing_matches_the_clip_image_processor(clip_dir):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    ours = ClipPreprocess(json.loads((clip_dir / "preprocessor_config.json").read_text()))
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 10), size=(40, 48), mode="bilinear")  # not noise
    image = (smooth[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    theirs = processor(images=image, return_tensors="pt")["pixel_values"]
    mine = ours(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
    assert mine.shape == theirs.shape == (1, 3, 24, 24)
    assert (mine - theirs).abs().mean() < 0.02  # PIL's and torch's antialiased bicubic differ slightly


def test_pickscore_and_clipscore_equal_their_formulas_and_carry_gradient(clip_dir):
    from transformers import CLIPModel

    cfg = RewardConfig(names=("pickscore", "clipscore"), pickscore_model=str(clip_dir), clip_model=str(clip_dir))
    reward = build_reward(cfg)
    assert reward.differentiable and {"pickscore", "clipscore", "aesthetic"} <= set(differentiable_rewards())
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = reward(images, PROMPTS, [{}, {}])
    model = CLIPModel.from_pretrained(clip_dir)
    pixels = reward.rewards[0].preprocess(images.detach())
    img = model.get_image_features(pixel_values=pixels).pooler_output
    tokens = reward.rewards[0].tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
    txt = model.get_text_features(**tokens).pooler_output
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert torch.allclose(out.components["clipscore"], cos, atol=1e-5)
    assert torch.allclose(out.components["pickscore"], model.logit_scale.exp() * cos / 26, atol=1e-5)
    out.scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_aesthetic_head_and_its_conversion(clip_dir, tmp_path):
    reward = build_reward(RewardConfig(names=("aesthetic",), aesthetic_model=str(clip_dir)))
    images = torch.rand(3, 3, 32, 32, requires_grad=True)
    scores = reward(images, ["", "", ""], [{}] * 3).scores
    assert scores.shape == (3,)
    scores.sum().backward()
    assert images.grad.abs().sum() > 0
    original = {f"layers.{j}.{kind}": torch.randn(4, 4) for j in (0, 2, 4, 6, 7) for kind in ("weight", "bias")}
    torch.save(original, tmp_path / "head.pth")
    from safetensors.torch import load_file

    converted = load_file(str(convert_aesthetic_head(tmp_path / "head.pth", tmp_path)))
    assert torch.equal(converted["4.bias"], original["layers.7.bias"])
    assert torch.equal(converted["1.weight"], original["layers.2.weight"])


def test_missing_reward_models_say_what_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download yuvalkirstain/PickScore_v1"):
        build_reward(RewardConfig(names=("pickscore",)))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="aesthetic_head.safetensors"):
        build_reward(RewardConfig(names=("aesthetic",), aesthetic_model=str(tmp_path)))
