"""CUDA checks (skipped without a GPU): the on-policy ratio stays bitwise 1; GRPO and NFT runs train on the GPU,
resume exactly there, and their checkpoints load on the CPU."""

import json

import pytest
import torch

from rewardflow.algorithms import grpo
from rewardflow.algorithms.grpo import GRPOConfig
from rewardflow.algorithms.nft import NFTConfig
from rewardflow.build import load_trained_policy
from rewardflow.presets import get_preset
from rewardflow.shapes.tiny_dit import load_policy
from rewardflow.train import train
from rewardflow.utils.checkpoint import load_state

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = ["a red circle", "two squares", "a circle left of a triangle", "a blue square and a white circle"]


@pytest.mark.parametrize("autocast, compiled", [(False, False), (True, False), (True, True)])
def test_on_policy_ratio_is_exactly_one_on_cuda_with_cfg(autocast, compiled):
    policy = load_policy("base", autocast=autocast, device="cuda")
    policy.compile = compiled  # shapes_grpo on a GPU: compiled, bf16
    cfg = GRPOConfig(num_steps=6, micro_batch=8, optimizer_steps=1, guidance_scale=4.5)
    cond = policy.encode_prompts([p for p in PROMPTS for _ in range(4)])
    batch = grpo.collect(policy, cond, cfg, torch.Generator().manual_seed(0))
    assert batch.xs.device.type == "cuda"
    for start in (0, 8):
        rows = slice(start, start + 8)
        for j in batch.trained_steps:
            out, kl = grpo.step_terms(policy, batch, rows, j, cfg, need_reference=True)
            log_prob = out.log_prob
            assert torch.equal(log_prob, batch.log_probs[rows, j])
            if compiled:  # the frozen reference runs its own graph: equal within bf16 rounding
                assert kl.abs().max() < 1e-3
            else:
                assert torch.equal(kl, torch.zeros_like(kl))


@pytest.mark.parametrize("algorithm", ["grpo", "nft"])
def test_cuda_run_trains_resumes_exactly_and_loads_on_cpu(tmp_path, algorithm):
    def config(run_dir: str, iterations: int):
        cfg = get_preset("shapes_grpo_smoke")
        cfg.run_dir, cfg.iterations, cfg.algorithm = run_dir, iterations, algorithm
        cfg.model.device = "cuda"
        cfg.nft = NFTConfig(num_steps=4, micro_batch=4, optimizer_steps=2)
        return cfg

    full = train(config(str(tmp_path / "full"), 2))
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["reward"])) for r in rows if "reward" in r)
    train(config(str(tmp_path / "part"), 1))
    part = train(config(str(tmp_path / "part"), 2), resume=True)
    a, b = load_state(full / "checkpoints/state_00002.pt"), load_state(part / "checkpoints/state_00002.pt")
    keys = ("trainable", "old") if algorithm == "nft" else ("trainable",)
    for key in keys:  # CUDA kernels may differ run to run in the last bits; the draws are the same
        assert all(torch.allclose(a[key][k], b[key][k], atol=1e-5) for k in a[key])
    policy, _ = load_trained_policy(full, device="cpu")
    assert policy.device.type == "cpu"
