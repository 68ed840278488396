"""The real-model presets as the official scripts run them: batch geometry on 1 to 64 ranks, DanceGRPO's advantage
normalisation, truncated timestep fraction, per-reward clipped losses and LoRA targets (no model weights needed)."""

import pytest
import torch

from rewardflow.algorithms.advantages import aggregate_advantages, group_advantages
from rewardflow.algorithms.batching import fit_world, rank_rows
from rewardflow.algorithms.grpo import clipped_policy_loss
from rewardflow.algorithms.grpo_config import GRPOConfig
from rewardflow.config import TrainConfig
from rewardflow.presets import PRESETS, get_preset

REAL = [name for name, make in PRESETS.items() if make().model.kind != "tiny-dit"]
WORLDS = (1, 2, 3, 4, 8, 16, 32, 64)


def test_every_real_model_preset_is_covered():
    assert len(REAL) == 7 and "flux_hps_dance_grpo" in REAL and "sd15_aesthetic_draft_lv" in REAL


@pytest.mark.parametrize("name", REAL)
@pytest.mark.parametrize("world", WORLDS)
def test_real_presets_lay_out_on_1_to_64_ranks(name, world):
    """Every rank gets whole micro-batches of every optimizer step; together they hold every row once."""
    cfg = get_preset(name)
    fitted, changes = cfg.for_world(world)
    a, rows = fitted.algo, fitted.rows_per_iter
    layouts = [rank_rows(rows, a.micro_batch, a.optimizer_steps, r, world) for r in range(world)]
    assert sorted(i for rows_of in layouts for i in rows_of) == list(range(rows))
    assert all(len(rows_of) == rows // world for rows_of in layouts)
    assert a.micro_batch <= cfg.algo.micro_batch
    per_step, official = rows // a.optimizer_steps, cfg.rows_per_iter // cfg.algo.optimizer_steps
    if cfg.rows_per_iter % (world * cfg.algo.optimizer_steps) == 0:  # where the ranks can share it, it is kept
        assert per_step == official and fitted.prompts_per_iter == cfg.prompts_per_iter
    assert bool(changes) == (fitted != cfg)


def test_fit_world_keeps_a_valid_layout_and_says_what_it_changed():
    assert fit_world(16, 8, 32, 2, 2) == (16, 32, 2)  # valid as it is: unchanged
    assert fit_world(48, 24, 8, 2, 64) == (48, 3, 2)  # SD3.5-M: 576 images per step, 9 per rank: micro-batch 3
    assert fit_world(16, 12, 4, 2, 64) == (16, 3, 1)  # 3 rows per rank cannot make 2 steps: one step of 192
    assert fit_world(2, 2, 4, 1, 8) == (4, 1, 1)  # 4 images cannot split over 8 ranks: 4 prompts of 2, 1 a rank
    cfg, changes = get_preset("sd35m_pickscore_flow_grpo").for_world(16)
    assert changes == ["grpo.micro_batch 8 -> 6"] and cfg.grpo.micro_batch == 6


def test_dance_preset_normalises_per_group_with_the_unbiased_std():
    cfg = get_preset("flux_hps_dance_grpo")
    g = cfg.grpo
    assert (g.global_std, g.std_unbiased, g.adv_eps) == (False, True, 1e-8)
    rewards = torch.tensor([0.1, 0.4, 0.2, 0.9, 0.3, 0.3])
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    got = aggregate_advantages(rewards, {"hps": rewards}, {"hps": 1.0}, ids, cfg.reward.aggregate,
                               global_std=g.global_std, clip=g.adv_clip_max, eps=g.adv_eps,
                               unbiased=g.std_unbiased)  # fmt: skip
    by_hand = torch.cat([(r - r.mean()) / (r.std() + 1e-8) for r in rewards.view(2, 3)])  # torch's std: unbiased
    assert torch.allclose(got, by_hand.clamp(-5, 5), atol=1e-6)
    assert not torch.allclose(got, group_advantages(rewards, ids, global_std=False), atol=1e-3)


def test_timestep_fraction_truncates_as_the_official_scripts():
    dance = get_preset("flux_hps_dance_grpo").grpo
    assert dance.sde_steps == 11 and dance.steps_per_sample == 6  # int(0.6 * 11); round would give 7
    assert GRPOConfig(num_steps=10, timestep_fraction=0.6).steps_per_sample == 5
    assert GRPOConfig(num_steps=3, timestep_fraction=0.1).steps_per_sample == 1  # at least one


def test_one_clipped_loss_per_reward_differs_from_summed_advantages_outside_the_clip_band():
    log_ratio = torch.tensor([0.0, 0.3, -0.3, 0.3])
    adv = torch.tensor([[1.0, -2.0], [1.0, -2.0], [-1.0, 0.5], [2.0, 1.0]])
    w = torch.tensor([0.7, 1.4])
    per_reward, _ = clipped_policy_loss(log_ratio, adv, 0.1, reward_weights=w)
    by_hand = sum(w[k] * clipped_policy_loss(log_ratio, adv[:, k], 0.1)[0] for k in range(2))
    assert torch.allclose(per_reward, by_hand)
    summed, _ = clipped_policy_loss(log_ratio, adv @ w, 0.1)
    assert not torch.allclose(per_reward, summed)  # rows 1 and 2 leave the band with advantages of both signs
    inside, _ = clipped_policy_loss(torch.zeros(4), adv, 0.1, reward_weights=w)  # at ratio 1 they agree
    assert torch.allclose(inside, clipped_policy_loss(torch.zeros(4), adv @ w, 0.1)[0])
    with pytest.raises(ValueError, match="reward_weights"):
        clipped_policy_loss(log_ratio, adv, 0.1)


def test_loss_aggregate_gives_each_rewards_own_advantages_and_is_grpo_only():
    r1, r2 = torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([5.0, 1.0, 1.0, 0.0])
    ids = torch.tensor([0, 0, 1, 1])
    adv = aggregate_advantages(r1 + r2, {"a": r1, "b": r2}, {"a": 1.0, "b": 1.0}, ids, "loss")
    assert adv.shape == (4, 2)
    assert torch.allclose(adv[:, 1], group_advantages(r2, ids))
    cfg = get_preset("shapes_nft_cpu")
    with pytest.raises(ValueError, match="reward.aggregate 'loss'"):
        TrainConfig(algorithm="nft", nft=cfg.nft, reward=cfg.reward.__class__(aggregate="loss"))


def test_lora_targets_reach_the_flux_transformer(tmp_path):
    pytest.importorskip("diffusers")
    from rewardflow.models.flux import load_flux_policy
    from rewardflow.models.tiny_diffusers import save_tiny_flux

    folder = save_tiny_flux(tmp_path / "flux")
    targets = get_preset("flux_hps_dance_grpo").model.lora_targets
    assert targets == ("to_q", "to_k", "to_v", "to_out.0")
    policy = load_flux_policy(folder, lora_rank=2, resolution=32, lora_targets=targets)
    names = [n for n, p in policy.module.named_parameters() if p.requires_grad]
    assert names and all(any(f".{t}.lora_" in n for t in targets) for n in names)
    assert not any("add_q_proj" in n for n in names)
    assert any("single_transformer_blocks" in n for n in names)  # suffixes match both block kinds, as in peft
    default = load_flux_policy(folder, lora_rank=2, resolution=32)
    assert any("add_q_proj" in n for n, p in default.module.named_parameters() if p.requires_grad)
