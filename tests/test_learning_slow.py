"""Slow tier: every method actually raises a reward on the shipped base model (about 2 minutes on 2 CPU cores).

Run with ``pytest -m slow``. The quality claims on the Shapes judge are measured by
``benchmarks/shapes_grpo.py`` and ``benchmarks/study.py`` (docs/results.md); these tests only check that
learning happens at all. The Flow-GRPO and NFT margins are several times their seed-to-seed spread (2 seeds);
the other GRPO-family methods' were set from one seed, where each gained at least 1.4x its margin; the
direct-gradient methods' from two sets of seeds, where each gained at least 2.2x its margin.
"""

import pytest
import torch

from rewardflow.algorithms import grpo, nft
from rewardflow.algorithms.advantages import group_advantages
from rewardflow.algorithms.grpo import GRPOConfig
from rewardflow.algorithms.nft import NFTConfig
from rewardflow.sampling.rollout import rollout
from rewardflow.shapes.tiny_dit import load_policy
from tests.conftest import Brightness

pytestmark = pytest.mark.slow

PROMPTS = ["a circle", "a blue square", "two triangles", "a red circle left of a green square"]


def brightness(images: torch.Tensor) -> torch.Tensor:
    """Mean pixel value per image in [0, 1]: a reward with a clear gradient and nothing to parse."""
    return images.float().mean(dim=(1, 2, 3))


@torch.no_grad()
def ode_brightness(policy, cfg: GRPOConfig, seed: int) -> float:
    """Mean brightness of deterministic samples (noise level 0) from fixed initial noise."""
    cond = policy.encode_prompts([p for p in PROMPTS for _ in range(8)])
    traj = rollout(
        policy,
        cond,
        policy.schedule(cfg.num_steps, cfg.shift),
        torch.zeros(cfg.num_steps),
        guidance_scale=cfg.guidance_scale,
        generator=torch.Generator().manual_seed(seed),
    )
    return brightness(policy.decode(traj.xs[:, -1])).mean().item()


GRPO_VARIANTS = {
    "flow-grpo": {},
    "fast": {"sde_window": 2, "sde_window_range": (0, 3)},
    "dance": {"sde_type": "dance", "noise_level": 0.7, "same_initial_noise": True, "timestep_fraction": 0.6},
    "mix": {"sde_type": "dance", "noise_level": 0.7, "sde_window": 2, "window_schedule": "progressive",
            "window_iters": 2},
    "cps": {"sde_type": "cps", "noise_level": 0.8, "kl_beta": 0.0},
}  # fmt: skip


@pytest.mark.parametrize("variant", list(GRPO_VARIANTS))
def test_grpo_family_raises_a_brightness_reward_on_the_base_model(variant):
    torch.manual_seed(0)
    policy = load_policy("base", autocast=True)
    cfg = GRPOConfig(num_steps=6, micro_batch=16, optimizer_steps=2, guidance_scale=4.5, **GRPO_VARIANTS[variant])
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-4, weight_decay=1e-4)
    before = ode_brightness(policy, cfg, seed=123)
    group_ids = torch.arange(len(PROMPTS)).repeat_interleave(8)
    for it in range(8):
        cond = policy.encode_prompts([p for p in PROMPTS for _ in range(8)])
        gen = torch.Generator().manual_seed(it)
        batch = grpo.collect(policy, cond, cfg, gen, group_ids, iteration=it)
        adv = group_advantages(brightness(policy.decode(batch.xs[:, -1])), group_ids, global_std=True, clip=5.0)
        metrics = grpo.train_step(policy, optimizer, batch, adv, cfg, generator=gen)
        assert metrics["kl"] >= 0 and torch.isfinite(torch.tensor(metrics["policy_loss"]))
    after = ode_brightness(policy, cfg, seed=123)
    print(f"{variant}: brightness {before:.3f} -> {after:.3f}")
    # Calibration (2026-11-22, 2 seeds of the flow-grpo loop): 0.152 -> 0.210-0.225 after 8 iterations.
    # 2026-11-23, seed 0: fast 0.285, dance 0.214, mix 0.195, cps 0.244 (CPS without KL: the paper-form KL
    # at beta 0.04 held it at 0.149).
    assert after > before + 0.03, (before, after)


def test_nft_raises_a_brightness_reward_on_the_base_model():
    torch.manual_seed(0)
    policy = load_policy("base", autocast=True)
    policy.init_old()
    cfg = NFTConfig(num_steps=6, micro_batch=16, optimizer_steps=1, old_decay_rate=0.01)
    probe = GRPOConfig(num_steps=6, guidance_scale=1.0)  # NFT is CFG-free: measure without CFG
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-4, weight_decay=1e-4)
    before = ode_brightness(policy, probe, seed=123)
    group_ids = torch.arange(len(PROMPTS)).repeat_interleave(8)
    for it in range(8):
        cond = policy.encode_prompts([p for p in PROMPTS for _ in range(8)])
        gen = torch.Generator().manual_seed(it)
        batch = nft.collect(policy, cond, cfg, gen)
        adv = group_advantages(brightness(policy.decode(batch.x0)), group_ids, global_std=True, clip=5.0)
        r = nft.optimality_probability(adv, cfg.adv_clip_max)
        metrics = nft.train_step(policy, optimizer, batch, r, cfg, generator=gen)
        policy.soft_update_old(nft.old_decay(it + 1, cfg))
        assert torch.isfinite(torch.tensor(metrics["policy_loss"]))
    after = ode_brightness(policy, probe, seed=123)
    # Calibration (2026-11-22, 2 seeds of this loop): 0.153 -> 0.590-0.593 after 8 iterations (GRPO: 0.21-0.23).
    assert after > before + 0.2, (before, after)


# variant: (algorithm, settings, minimum rise of the brightness of deterministic samples in 6 iterations)
DIRECT_VARIANTS = {
    "draft-1": ("draft", {"method": "draft", "k": 1}, 0.01),
    "draft-lv": ("draft", {"method": "draft-lv"}, 0.01),
    "refl": ("draft", {"method": "refl", "refl_last": 3}, 0.01),
    "alignprop": ("draft", {"method": "alignprop", "alignprop_min": 7}, 0.01),
    "leapalign": ("leapalign", {}, 0.01),
}


@pytest.mark.parametrize("variant", list(DIRECT_VARIANTS))
def test_direct_gradient_methods_raise_a_brightness_reward(variant):
    """Each direct-gradient method raises the brightness of deterministic samples by backpropagating it."""
    from rewardflow.algorithms.direct import direct_train_step
    from rewardflow.algorithms.draft import DraftConfig, draft_loss
    from rewardflow.algorithms.leapalign import LeapAlignConfig, leapalign_loss

    torch.manual_seed(0)
    policy = load_policy("base", autocast=True)
    reward = Brightness()
    algorithm, kwargs, margin = DIRECT_VARIANTS[variant]
    if algorithm == "draft":
        cfg = DraftConfig(num_steps=10, micro_batch=16, **kwargs)
        loss_fn = draft_loss(reward, cfg)
    else:
        cfg = LeapAlignConfig(num_steps=10, micro_batch=16)
        loss_fn = leapalign_loss(reward, cfg)
    prompts = [p for p in PROMPTS for _ in range(8)]

    @torch.no_grad()
    def sample_brightness() -> float:
        cond = policy.encode_prompts(prompts)
        traj = rollout(policy, cond, policy.schedule(10), torch.zeros(10), guidance_scale=4.5,
                       generator=torch.Generator().manual_seed(123))  # fmt: skip
        return reward(policy.decode(traj.xs[:, -1]), prompts, [{}] * len(prompts)).scores.mean().item()

    before = sample_brightness()
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-5, weight_decay=1e-4)
    cond = policy.encode_prompts(prompts)
    for it in range(6):
        metrics, _, _ = direct_train_step(
            policy, optimizer, cond, [{}] * len(prompts), loss_fn, cfg, generator=torch.Generator().manual_seed(it)
        )
        assert torch.isfinite(torch.tensor(metrics["loss"]))
    after = sample_brightness()
    print(f"{variant}: brightness {before:.3f} -> {after:.3f}")
    # Calibration (2026-12-07, the shipped base, `pytest -m slow -n 2`, two sets of generator seeds): 0.154 ->
    # 0.176-0.181 for every method. Brightness, not the learned shapes-score: on the shipped base that one starts at
    # 0.774 and 6 iterations move it by -0.02 to +0.05 depending on the seeds, which would test the seeds, not the
    # gradient plumbing. The learned rewards are checked end to end by tests/test_presets_learn_slow.py.
    assert after > before + margin, (before, after)
