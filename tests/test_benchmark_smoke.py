"""The benchmarks that must run on a CPU run there (tiny configurations, a few seconds)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_benchmark_runs_every_algorithm_on_the_tiny_models(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--size", "tiny", "--device", "cpu",
           "--batch", "2", "--steps", "2", "--repeats", "1", "--warmup", "0", "--modes", "lora",
           "--peak-tflops", "1", "--out", str(tmp_path)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    rows = json.loads(next(tmp_path.glob("throughput-*.json")).read_text())
    phases = {(r["model"], r["algorithm"], r["phase"]) for r in rows}
    assert len(phases) == 10  # 2 models x (GRPO and NFT rollout + train, DRaFT sample+train)
    assert all(r["images_per_s"] > 0 and r["gflop"] > 0 and 0 < r["mfu"] for r in rows)


def test_step_variance_decomposition_sums_to_the_total_and_ends_at_the_deterministic_last_step(tmp_path):
    out = tmp_path / "sv.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_variance.py"), "--prompts-per-category", "1",
           "--continuations", "2", "--threads", "1", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    table = json.loads(out.read_text())["table"]
    assert [r["split"] for r in table] == ["-", *range(10)]
    # The last step is an Euler step: continuations from x_9 are identical, so nothing is left to explain.
    assert table[-1]["reward_var"] == 0.0 and table[-1]["strict_var"] == 0.0
    assert table[0]["reward_var"] > 0
    # The per-step shares telescope: they add up to the whole variance of independent rollouts.
    assert abs(sum(r["reward_step_share"] for r in table) - 1.0) < 1e-6  # float32 rewards
    # Every trained step has a gradient norm under both objectives; GRPO-Guard's spread over the steps is smaller.
    norms = json.loads(out.read_text())["gradient_norms"]
    assert sorted(norms, key=int) == [str(j) for j in range(9)]
    plain, guard = ([v[i] for v in norms.values()] for i in (0, 1))
    assert min(plain) > 0 and max(guard) / min(guard) < max(plain) / min(plain)


def test_position_direction_splits_the_position_score_by_shape_pair(tmp_path):
    out = tmp_path / "pd.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "position_direction.py"), "--samples-per-prompt", "1",
           "--max-prompts", "6", "--scenes", "16", "--threads", "1", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    result = json.loads(out.read_text())
    pairs = {k: v for k, v in result["by_pair"].items() if k != "all"}
    assert result["by_pair"]["all"]["samples"] == 6 == sum(v["samples"] for v in pairs.values())
    assert result["by_pair"]["all"]["pairs"] == sum(v["pairs"] for v in pairs.values())
    for v in result["by_pair"].values():
        assert v["strict"] <= v["both_drawn"]  # a strict pass needs both objects
        assert v["asked_given_both"] is None or 0.0 <= v["asked_given_both"] <= 1.0
    # The shipped base reads word order: swapping the objects raises its denoising loss by 39-95% at sigma
    # 0.7-0.3 here (2026-12-07; the pooled base it replaced stayed within 1% at every sigma).
    assert [r["sigma"] for r in result["swap_loss"]] == [0.95, 0.85, 0.7, 0.5, 0.3]
    assert all(r["true"] > 0 for r in result["swap_loss"])
    assert all(r["increase"] > 0.2 for r in result["swap_loss"] if r["sigma"] <= 0.7)


def test_position_direction_tally_on_rendered_scenes_and_on_their_swapped_prompts():
    import importlib.util

    import numpy as np

    from rewardflow.shapes.grammar import parse_prompt
    from rewardflow.shapes.render import render

    spec_ = importlib.util.spec_from_file_location("position_direction", ROOT / "benchmarks" / "position_direction.py")
    bench = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(bench)
    texts = ["a circle left of a square", "a triangle above a circle", "a square below a triangle"] * 4
    specs = [parse_prompt(t) for t in texts]
    rng = np.random.default_rng(0)
    images = np.stack([render(s, rng)[0] for s in specs])
    truth = bench.tally(specs, images)
    assert truth["all"] == {"samples": 12, "strict": 1.0, "both_drawn": 1.0, "pairs": 12, "asked": 12,
                            "asked_given_both": 1.0}  # fmt: skip
    assert set(truth) == {"all", "circle/square", "circle/triangle", "square/triangle"}
    # The same scenes judged against the prompt with its objects swapped: both drawn, never the asked way round.
    swapped = bench.tally([parse_prompt(bench.swapped(t)) for t in texts], images)
    assert swapped["all"]["both_drawn"] == 1.0 and swapped["all"]["asked_given_both"] == 0.0
    assert swapped["all"]["strict"] == 0.0
    assert bench.swapped("a red circle right of a blue square") == "a blue square right of a red circle"


def test_shapes_grpo_report_tables_a_synthetic_run(tmp_path):
    import importlib.util

    spec_ = importlib.util.spec_from_file_location("shapes_grpo_bench", ROOT / "benchmarks" / "shapes_grpo.py")
    bench = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(bench)

    def evaluation(two, pos, pairs):
        cats = {"two_object": two, "position": pos}
        return {"overall": (two + pos) / 2, "clean_overall": (two + pos) / 2, "categories": cats,
                "clean_categories": cats, "held_out_strict": 0.5, "seen_strict": 0.5, "num_prompts": 8,
                "samples_per_prompt": 2, "detections_per_image": {"two_object": 2.0, "position": 2.0},
                "histogram": {"colors": {"red": 3, "white": 1}, "shapes": {"circle": 2, "square": 2}, "blobs": 0},
                "settings": {"num_steps": 40, "guidance_scale": 4.5}, "shape_pairs": pairs}  # fmt: skip

    (tmp_path / "eval").mkdir()
    before = evaluation(0.25, 0.5, {"two_object": {"circle/square": 0.0, "circle/triangle": 0.5}})
    after = evaluation(0.75, 0.5, {"two_object": {"circle/square": 0.5, "circle/triangle": 1.0}})
    (tmp_path / "eval" / "iter_00000.json").write_text(json.dumps(before))
    (tmp_path / "eval" / "iter_00002.json").write_text(json.dumps(after))
    rows = [{"iteration": i, "reward": 0.5 + 0.1 * i, "time_iteration": 30.0} for i in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text, raw = bench.report("shapes_grpo_cpu", tmp_path, None, 1e-3)
    assert "Strict overall **0.375 -> 0.625** (+25.0 points)" in text
    assert "| two_object | 0.250 | 0.750 | +0.500 |" in text
    assert "| circle/square | 0.00 -> 0.50 |" in text and "| circle/triangle | 0.50 -> 1.00 |" in text
    assert "2 iterations in **1.0 min**" in text and raw["kl_to_base"] == 1e-3
    # Reports of evaluations written before the split by pair have no such table.
    del before["shape_pairs"]
    (tmp_path / "eval" / "iter_00000.json").write_text(json.dumps(before))
    assert "by their pair of shapes" not in bench.report("shapes_grpo_cpu", tmp_path, None, 1e-3)[0]


def test_prompt_paths_swaps_only_the_pooled_prompt_and_restores_the_model(tmp_path):
    import importlib.util

    import torch

    from rewardflow.shapes.tiny_dit import TinyDiTConfig
    from tests.conftest import make_policy

    spec_ = importlib.util.spec_from_file_location("prompt_paths", ROOT / "benchmarks" / "prompt_paths.py")
    bench = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(bench)
    policy = make_policy(TinyDiTConfig(dim=32, depth=2, heads=2, text_depth=1))  # a model with the pooled path
    model, tok = policy.module, policy.tokenizer
    tokens = tok(["a circle", ""])
    x, sigma = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.full((2,), 0.7)
    with torch.no_grad():
        plain = model(x, sigma, tokens)
        with bench.pooled_from(model, tok(["a circle"])):
            own = model(x, sigma, tokens)
        with bench.pooled_from(model, tok(["a square"])):
            other = model(x, sigma, tokens)
        with bench.pooled_from(model, None):
            cut = model(x, sigma, tokens)
        after = model(x, sigma, tokens)
    assert torch.equal(own, plain) and torch.equal(after, plain) and "encode_text" not in vars(model)
    for swapped in (other, cut):  # the prompt's row changes, the null prompt's (CFG) row does not
        assert not torch.allclose(swapped[0], plain[0], atol=1e-3) and torch.equal(swapped[1], plain[1])
    import dataclasses

    from rewardflow.shapes.tiny_dit import TinyDiT

    with pytest.raises(ValueError, match="no pooled prompt path"):
        with bench.pooled_from(TinyDiT(dataclasses.replace(model.config, pooled_prompt=False)), None):
            pass
    from rewardflow.shapes.tiny_dit import save_tiny_dit

    save_tiny_dit(model, tmp_path / "pooled.safetensors")
    out = tmp_path / "pp.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "prompt_paths.py"), "--samples", "1", "--threads", "1",
           "--checkpoint", str(tmp_path / "pooled.safetensors"), "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    rows = json.loads(out.read_text())["rows"]
    assert [(r["prompt"], r["pooled_from"]) for r in rows][:4] == [
        ("a circle and a square", "itself"), ("a circle and a square", "a square"),
        ("a circle and a square", "a circle"), ("a circle and a square", "cut"),
    ]  # fmt: skip
    assert all(r["samples"] == 1 and 0.0 <= r["strict"] <= 1.0 for r in rows)


def test_the_gpu_check_runs_its_cpu_smoke_and_writes_its_table(tmp_path):
    """``benchmarks/gpu_check.sh`` with the tiny configuration on the CPU: both models, the pipeline baseline, the
    rollout and the training, one JSON and one markdown table."""
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "GPU_CHECK_SIZE": "tiny", "GPU_CHECK_DEVICE": "cpu"}  # fmt: skip
    subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True, capture_output=True, text=True,
                   env=env)  # fmt: skip
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["model"] for r in report["results"]] == ["sd3", "flux"]
    for r in report["results"]:
        assert [p["phase"] for p in r["phases"]] == ["pipeline", "rollout", "train"]
        assert r["rollout_vs_pipeline"] > 0 and r["rollout_plus_train_images_per_s"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "rollout / pipeline" in table and "| sd3 (tiny) |" in table and "| flux (tiny) |" in table
