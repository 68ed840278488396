import json
from pathlib import Path

import numpy as np
import pytest

from rewardflow.shapes import judge as J
from rewardflow.shapes.grammar import CATEGORIES, PromptError, parse_prompt
from rewardflow.shapes.prompts import (
    EVAL_PROMPTS_PER_CATEGORY,
    all_prompts,
    eval_prompts,
    is_held_out,
    prompt_file_lines,
    random_prompt,
    train_prompts,
)
from rewardflow.shapes.render import PlacedObject, draw, render


@pytest.mark.parametrize(
    "text,category",
    [
        ("a circle", "single_object"),
        ("a blue square", "colors"),
        ("a circle and a triangle", "two_object"),
        ("three squares", "counting"),
        ("a circle left of a square", "position"),
        ("a red circle and a blue square", "color_attr"),
    ],
)
def test_categories_round_trip(text, category):
    spec = parse_prompt(text)
    assert spec.category == category
    assert parse_prompt(spec.text) == spec
    assert spec.text == text


def test_parser_normalises_case_and_space():
    assert parse_prompt("  A  Red   CIRCLE ").text == "a red circle"


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("a dog", "'dog'"),
        ("two circle", "plural shape"),
        ("a circle near a square", "'near'"),
        ("a circle and", "the end of the prompt"),
        ("", "empty"),
        ("a circle and a square and a triangle", "at most two"),
        ("five circles", "'five'"),
    ],
)
def test_parser_errors_name_the_word(text, fragment):
    with pytest.raises(PromptError, match=fragment):
        parse_prompt(text)


def test_judge_scores_rendered_ground_truth():
    rng = np.random.default_rng(123)
    n, strict, clean = 600, 0, 0
    for _ in range(n):
        spec = random_prompt(rng)
        image, _ = render(spec, rng)
        v = J.judge(spec, J.detect(image))
        strict += v.strict
        clean += v.clean
    assert strict / n >= 0.99 and clean / n >= 0.99


def test_judge_detects_what_was_drawn():
    rng = np.random.default_rng(0)
    objs = [PlacedObject("triangle", "purple", 8.0, 10.0, 9.0), PlacedObject("circle", "yellow", 23.0, 22.0, 8.5)]
    dets = J.detect(draw(objs, rng))
    assert sorted((d.shape, d.color) for d in dets) == [("circle", "yellow"), ("triangle", "purple")]
    tri = next(d for d in dets if d.shape == "triangle")
    assert tri.cx == pytest.approx(8.0, abs=0.3) and tri.cy == pytest.approx(10.0, abs=0.3)


def test_judge_semantics_counting_colour_position_and_clean():
    rng = np.random.default_rng(0)
    two_circles = draw([PlacedObject("circle", "red", 8, 8, 8), PlacedObject("circle", "red", 22, 22, 8)], rng)
    dets = J.detect(two_circles)
    assert J.judge(parse_prompt("two circles"), dets).strict
    assert not J.judge(parse_prompt("three circles"), dets).strict
    assert J.judge(parse_prompt("three circles"), dets).score == pytest.approx(2 / 3)
    one = J.judge(parse_prompt("a circle"), dets)
    assert one.strict and not one.clean and one.extra == 1  # GenEval passes it; clean does not
    assert not J.judge(parse_prompt("a blue circle"), dets).strict
    assert J.judge(parse_prompt("a blue circle"), dets).score == 0.5  # right shape, wrong colour
    pair = J.detect(
        draw([PlacedObject("square", "green", 7, 16, 8), PlacedObject("triangle", "white", 24, 16, 8)], rng)
    )
    assert J.judge(parse_prompt("a square left of a triangle"), pair).clean
    assert not J.judge(parse_prompt("a square right of a triangle"), pair).strict
    assert not J.judge(parse_prompt("a square above a triangle"), pair).strict
    assert J.judge(parse_prompt("a green square and a white triangle"), pair).clean
    one_red = J.detect(draw([PlacedObject("circle", "red", 16, 16, 9)], rng))
    assert not J.judge(parse_prompt("a circle and a red circle"), one_red).strict  # one object, two phrases
    assert not J.judge(parse_prompt("a white square and a green triangle"), pair).strict


def _adversarial_images(rng):
    yield "uniform noise", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    yield "gaussian noise", np.clip(rng.normal(60, 60, (32, 32, 3)), 0, 255).astype(np.uint8)
    yield "all white", np.full((32, 32, 3), 255, np.uint8)
    yield "all black", np.zeros((32, 32, 3), np.uint8)
    blob = np.full((32, 32, 3), 30, np.uint8)
    yy, xx = np.mgrid[:32, :32]
    mask = ((xx - 12) ** 2 / 40 + (yy - 14) ** 2 / 12 < 1) | ((xx - 18) ** 2 / 10 + (yy - 20) ** 2 / 30 < 1)
    blob[mask] = (220, 50, 50)
    yield "irregular blob", blob
    stripes = np.full((32, 32, 3), 30, np.uint8)
    stripes[:, ::2] = (230, 230, 230)
    yield "stripes", stripes
    checker = np.full((32, 32, 3), 30, np.uint8)
    checker[(yy // 4 + xx // 4) % 2 == 0] = (60, 100, 235)
    yield "checkerboard", checker
    mixed = np.full((32, 32, 3), 30, np.uint8)
    mixed[10:20, 10:15] = (222, 52, 48)
    mixed[10:20, 15:20] = (58, 104, 238)
    yield "two-colour square", mixed


def test_judge_is_not_fooled_by_noise_blobs_or_flat_images():
    rng = np.random.default_rng(7)
    specs = [p for c in CATEGORIES for p in all_prompts(c)]
    for name, image in _adversarial_images(rng):
        dets = J.detect(image)
        passed = [s.text for s in specs if J.judge(s, dets).strict]
        assert not passed, f"{name} passed {passed[:3]}"


def test_judge_rejects_noisy_variants_of_many_random_images():
    rng = np.random.default_rng(11)
    for _ in range(200):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        spec = random_prompt(rng)
        assert not J.judge(spec, J.detect(image)).strict


def test_image_layout_errors():
    with pytest.raises(ValueError, match="32x32"):
        J.to_uint8_hwc(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        J.to_uint8_hwc(np.full((1, 3, 32, 32), np.nan, np.float32))
    with pytest.raises(ValueError, match="match"):
        J.judge_images([parse_prompt("a circle")], np.zeros((2, 32, 32, 3), np.uint8))


def test_evaluation_set_covers_every_category_and_held_out_combinations():
    specs = eval_prompts()
    for c in CATEGORIES:
        assert sum(s.category == c for s in specs) >= EVAL_PROMPTS_PER_CATEGORY
    held = [s for s in specs if is_held_out(s)]
    assert {s.category for s in held} >= {"colors", "color_attr", "position", "counting"}
    assert not any(is_held_out(s) for s in train_prompts())
    train_texts = {s.text for s in train_prompts()}
    assert all(s.text not in train_texts for s in held)
    assert {s.category for s in train_prompts()} == set(CATEGORIES)


def test_shipped_prompt_files_match_the_code():
    data = Path(__file__).parents[1] / "rewardflow" / "shapes" / "data"
    assert (data / "eval.jsonl").read_text().splitlines() == prompt_file_lines(eval_prompts())
    assert (data / "train.jsonl").read_text().splitlines() == prompt_file_lines(train_prompts())
    first = json.loads((data / "eval.jsonl").read_text().splitlines()[0])
    assert set(first) == {"prompt", "category", "held_out"}
