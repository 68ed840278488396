"""Three training steps of GRPO and DiffusionNFT on the SD3.5-Medium architecture at 512 px in bf16 (the ``gpu``
tier: ``pytest -m gpu`` on a CUDA machine), and the same code on the tiny SD3 model on the CPU (default tier), so
the GPU test's path runs everywhere. Random weights from the published config: no download."""

import math

import pytest
import torch

from rewardflow.algorithms import grpo, nft
from rewardflow.algorithms.grpo import GRPOConfig
from rewardflow.algorithms.nft import NFTConfig
from rewardflow.models.tiny_diffusers import EMBEDDINGS, random_conditioning, random_pipeline, random_policy

CASES = [
    pytest.param("tiny", "cpu", 32, id="tiny-sd3-cpu"),
    pytest.param(
        "real",
        "cuda",
        512,
        id="sd35m-512px-cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("algorithm", ["grpo", "nft"])
@pytest.mark.parametrize(("size", "device", "resolution"), CASES)
def test_three_training_steps_on_the_sd3_architecture_in_bf16(size, device, resolution, algorithm, mode):
    device, dtype, batch = torch.device(device), torch.bfloat16, 2
    pipe = random_pipeline("sd3", size, device, dtype)
    policy = random_policy(pipe, "sd3", mode, resolution, lora_rank=32 if size == "real" else 4)
    cond = random_conditioning("sd3", size, batch, device, dtype)
    trainable = dict(policy.named_trainable_state())
    before = {n: t.detach().clone() for n, t in trainable.items()}
    frozen = [(n, p, p.detach().clone()) for n, p in list(policy.module.named_parameters()) if n not in trainable][:8]
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if algorithm == "grpo":
        guidance = EMBEDDINGS[("sd3", size)][3]
        cfg = GRPOConfig(num_steps=4, micro_batch=batch, optimizer_steps=1, guidance_scale=guidance, kl_beta=0.04)
    else:
        policy.init_old()
        cfg = NFTConfig(num_steps=4, micro_batch=batch, optimizer_steps=1)
    for _ in range(3):
        if algorithm == "grpo":
            rollout = grpo.collect(policy, cond, cfg, gen)
            images = policy.decode(rollout.xs[:, -1])
            metrics = grpo.train_step(policy, optimizer, rollout, torch.tensor([1.0, -1.0]), cfg)
            assert metrics["ratio_dev"] < 1e-2  # within bf16 rounding of the stored log-probabilities
        else:
            rollout = nft.collect(policy, cond, cfg, gen)
            images = policy.decode(rollout.x0)
            metrics = nft.train_step(policy, optimizer, rollout, torch.tensor([0.9, 0.1]), cfg)
            policy.soft_update_old(0.5)
        assert images.shape == (batch, 3, resolution, resolution) and torch.isfinite(images).all()
        assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert all(t.dtype == dtype and torch.isfinite(t).all() for t in trainable.values())
    assert any(not torch.equal(before[n], t) for n, t in trainable.items())  # the trained weights moved
    assert all(torch.equal(p, saved) for _, p, saved in frozen)  # the frozen ones did not
    if device.type == "cuda":
        print(f"\n{size} {mode} {algorithm}: peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
