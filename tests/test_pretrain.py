"""``rewardflow pretrain``: checkpoints, exact resume, a second stage from a checkpoint, category weights."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import rewardflow.shapes.pretrain as pretrain_module
from rewardflow.shapes.grammar import CATEGORIES, parse_prompt
from rewardflow.shapes.pretrain import PretrainConfig, pretrain, scene_batch
from rewardflow.shapes.tiny_dit import TinyDiT, TinyDiTConfig, load_tiny_dit, save_tiny_dit

SMALL = TinyDiTConfig(dim=32, depth=1, heads=2, text_depth=1)


def config(out, **overrides) -> PretrainConfig:
    settings = dict(out_dir=str(out), model=SMALL, steps=4, batch_size=4, warmup_steps=1, save_every=2,
                    log_every=1, autocast=False)  # fmt: skip
    return PretrainConfig(**{**settings, **overrides})


def same_weights(a, b) -> bool:
    sa, sb = load_tiny_dit(a).state_dict(), load_tiny_dit(b).state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pretrain_writes_checkpoints_and_an_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
    whole = pretrain(config(tmp_path / "whole"))
    assert sorted(p.name for p in whole.glob("*.safetensors")) == [
        "ema_00002.safetensors", "ema_00004.safetensors", "step_00002.safetensors", "step_00004.safetensors"
    ]  # fmt: skip
    assert [json.loads(line)["step"] for line in (whole / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not same_weights(whole / "step_00002.safetensors", whole / "step_00004.safetensors")

    # The same command killed while drawing step 3's scenes (after step 2's save), then run again.
    calls, real = [], scene_batch

    def dies_at_step_three(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(pretrain_module, "scene_batch", dies_at_step_three)
    with pytest.raises(KeyboardInterrupt):
        pretrain(config(tmp_path / "resumed"))
    monkeypatch.setattr(pretrain_module, "scene_batch", real)
    with pytest.raises(FileExistsError, match="is not empty; pick another --out-dir or pass --resume"):
        pretrain(config(tmp_path / "resumed"))
    with pytest.raises(ValueError, match="these settings differ from its pretrain_config.json: lr"):
        pretrain(config(tmp_path / "resumed", resume=True, lr=1e-3))
    resumed = pretrain(config(tmp_path / "resumed", resume=True))
    for name in ("step_00004.safetensors", "ema_00004.safetensors"):
        assert same_weights(whole / name, resumed / name), name


def test_a_second_stage_starts_from_the_init_checkpoint_and_its_architecture(tmp_path):
    torch.manual_seed(1)
    init = tmp_path / "init.safetensors"
    save_tiny_dit(TinyDiT(SMALL), init)
    # model= asks for the default (larger) architecture; the init checkpoint's own one wins. At lr 0 the
    # weights stay the init's, so the stage started from them and not from a fresh initialisation.
    still = pretrain(config(tmp_path / "still", model=TinyDiTConfig(), init=str(init), lr=0.0, steps=2))
    assert load_tiny_dit(still / "step_00002.safetensors").config == SMALL
    assert json.loads((still / "pretrain_config.json").read_text())["model"]["dim"] == SMALL.dim  # what was trained
    assert same_weights(init, still / "step_00002.safetensors")
    moved = pretrain(config(tmp_path / "moved", init=str(init), steps=2))
    assert not same_weights(init, moved / "step_00002.safetensors")
    # The padding mask has no weights, so a second stage may switch it on; the rest stays the init's.
    masked = pretrain(config(tmp_path / "masked", model=TinyDiTConfig(mask_padding=True), init=str(init), steps=2))
    assert load_tiny_dit(masked / "step_00002.safetensors").config == dataclasses.replace(SMALL, mask_padding=True)
    # Any other architecture field asked for and not the checkpoint's is an error, before a folder is made.
    with pytest.raises(ValueError, match=r"model\.pooled_prompt is False but the --init checkpoint has True"):
        pretrain(config(tmp_path / "clash", model=TinyDiTConfig(pooled_prompt=False), init=str(init)))
    assert not (tmp_path / "clash").exists()
    with pytest.raises(FileNotFoundError):
        pretrain(config(tmp_path / "missing", init=str(tmp_path / "nope.safetensors")))
    assert not (tmp_path / "missing").exists()  # a bad --init leaves no folder behind


def test_category_weights_draw_only_the_weighted_categories():
    only_position = tuple(1.0 if c == "position" else 0.0 for c in CATEGORIES)
    images, prompts = scene_batch(np.random.default_rng(0), 32, only_position)
    assert images.shape == (32, 3, 32, 32)
    assert {parse_prompt(p).category for p in prompts} == {"position"}
    _, prompts = scene_batch(np.random.default_rng(0), 64)  # uniform by default
    assert {parse_prompt(p).category for p in prompts} == set(CATEGORIES)


@pytest.mark.parametrize(
    "bad", [(1.0, 1.0), (1.0, 1.0, 1.0, 1.0, -1.0, 1.0), (0.0,) * 6, (1.0, 1.0, 1.0, 1.0, 1.0, float("nan"))]
)
def test_bad_category_weights_name_the_field_and_what_is_allowed(bad):
    with pytest.raises(ValueError, match=r"pretrain\.category_weights must be (6 non-negative numbers|>= 0|a finite)"):
        PretrainConfig(category_weights=bad)


def test_a_damaged_pretraining_state_is_reported_and_the_previous_one_is_used(tmp_path, caplog):
    whole = pretrain(config(tmp_path / "whole", steps=6))
    run = tmp_path / "run"
    pretrain(config(run, steps=6))
    states = sorted(p.name for p in run.glob("state_*.pt"))
    assert states == ["state_00004.pt", "state_00006.pt"]  # the two newest, each with its checksum
    (run / "state_00006.pt").write_bytes((run / "state_00006.pt").read_bytes()[:-100])  # truncated
    for name in ("step_00006.safetensors", "ema_00006.safetensors"):
        (run / name).unlink()
    pretrain(config(run, steps=6, resume=True))
    assert "does not match its checksum" in caplog.text
    assert same_weights(whole / "step_00006.safetensors", run / "step_00006.safetensors")


def test_resume_refuses_a_folder_whose_states_are_all_damaged(tmp_path):
    run = tmp_path / "run"
    pretrain(config(run))
    for state in run.glob("state_*.pt"):
        state.write_bytes(b"damaged")
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ValueError, match="none of its states is complete"):
        pretrain(config(run, resume=True))
    assert sorted(p.name for p in run.iterdir()) == before
