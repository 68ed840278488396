"""The OCR reward on real rendered text (clean and noisy), offline, with rapidocr's shipped models."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from rewardflow.data.prompts import load_prompts
from rewardflow.rewards import build_reward
from rewardflow.rewards.config import RewardConfig
from rewardflow.rewards.ocr import ocr_score, target_text

pytest.importorskip("rapidocr")


def render(text: str, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Black text on white, 256 x 64, Pillow's bundled font, plus Gaussian pixel noise; [3, H, W] in [0, 1]."""
    image = Image.new("RGB", (256, 64), "white")
    ImageDraw.Draw(image).text((10, 16), text, fill="black", font=ImageFont.load_default(size=28))
    pixels = np.asarray(image).astype(np.float32)
    pixels += np.random.default_rng(seed).normal(0.0, noise, pixels.shape)
    return torch.from_numpy(np.clip(pixels, 0, 255) / 255).permute(2, 0, 1).float()


def test_target_text_and_score_by_hand():
    assert target_text('A sign that says "OPEN 24 HOURS"') == "OPEN 24 HOURS"
    with pytest.raises(ValueError, match="double quotes in the prompt, got 'a sign'"):
        target_text("a sign")
    assert ocr_score("Open 24 hours", "OPEN 24 HOURS") == 1.0  # case and spaces do not count
    assert ocr_score("opne", "open") == pytest.approx(0.5)  # two substitutions out of four letters
    assert ocr_score("", "abc") == 0.0
    assert ocr_score("xxxxxxxxxx", "ab") == 0.0  # clipped at 0


def test_ocr_reward_reads_clean_and_noisy_rendered_text():
    reward = build_reward(RewardConfig(names=("ocr",)))
    words = ["hello world", "rewardflow", "OPEN 24 HOURS"]
    images = torch.stack([render(w, noise) for w in words for noise in (0.0, 25.0)])
    prompts = [f'A sign that says "{w}"' for w in words for _ in range(2)]
    scores = reward(images, prompts, [{}] * 6).scores
    assert scores.shape == (6,) and (scores >= 0.9).all(), scores
    wrong = reward(images[:2], ['A sign that says "goodbye moon"'] * 2, [{}] * 2).scores
    blank = reward(torch.ones(1, 3, 64, 256), ['A sign that says "OPEN"'], [{}]).scores
    assert (wrong < 0.5).all() and blank.item() == 0.0


def test_shipped_ocr_prompt_sets_carry_their_targets():
    for name in ("ocr:train", "ocr:eval"):
        records = load_prompts(name)
        assert len(records) >= 64 and all(target_text(r.prompt) for r in records)
    train = {r.prompt for r in load_prompts("ocr:train")}
    assert not train & {r.prompt for r in load_prompts("ocr:eval")}
