import copy
import dataclasses

import pytest
import torch

from rewardflow.algorithms import grpo
from rewardflow.algorithms.batching import micro_batches
from rewardflow.algorithms.grpo import GRPOConfig, clipped_policy_loss
from rewardflow.models.lora import add_lora
from rewardflow.shapes.tiny_dit import TinyDiTPolicy
from tests.conftest import make_module, make_policy

PROMPTS = ["a red circle", "two squares", "a circle left of a triangle", "a blue square and a white circle"]


def test_clipped_loss_hand_computed():
    log_prob = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.5, 0.5]))
    old = torch.zeros(5)
    adv = torch.tensor([2.0, 1.0, 1.0, -1.0, -1.0])
    eps = 0.2
    loss, info = clipped_policy_loss(log_prob - old, adv, eps)
    # per row max(-A r, -A clip(r)):
    # r=1,A=2: -2 ; r=1.5,A=1: max(-1.5,-1.2)=-1.2 ; r=0.5,A=1: max(-0.5,-0.8)=-0.5
    # r=1.5,A=-1: max(1.5,1.2)=1.5 ; r=0.5,A=-1: max(0.5,0.8)=0.8
    assert loss.item() == pytest.approx((-2 - 1.2 - 0.5 + 1.5 + 0.8) / 5, abs=1e-6)
    assert info["clipped"].tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]


def test_clipped_loss_gradient_vanishes_outside_the_band():
    log_prob = torch.log(torch.tensor([1.5, 1.05])).requires_grad_(True)
    loss, _ = clipped_policy_loss(log_prob, torch.tensor([1.0, 1.0]), 0.2)
    loss.backward()
    assert log_prob.grad[0] == 0.0  # ratio 1.5 > 1.2 with positive advantage: clipped, no gradient
    assert log_prob.grad[1] == pytest.approx(-1.05 / 2, rel=1e-5)


@pytest.fixture(params=["pooled", "shipped"])
def arch(request, tiny_config):
    """The tiny config as it is (pooled prompt, padding attended) and with the shipped base's prompt path."""
    if request.param == "pooled":
        return tiny_config
    return dataclasses.replace(tiny_config, pooled_prompt=False, mask_padding=True)


def _batch(policy, cfg, n_per_prompt=2, seed=0):
    cond = policy.encode_prompts([p for p in PROMPTS for _ in range(n_per_prompt)])
    return grpo.collect(policy, cond, cfg, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_on_policy_ratio_is_exactly_one(arch, guidance):
    policy = make_policy(arch)
    cfg = GRPOConfig(num_steps=4, micro_batch=4, optimizer_steps=1, guidance_scale=guidance)
    batch = _batch(policy, cfg)
    for start in range(0, 8, 4):
        rows = slice(start, start + 4)
        for j in batch.trained_steps:
            out, kl = grpo.step_terms(policy, batch, rows, j, cfg, need_reference=True)
            log_prob = out.log_prob
            assert torch.equal(log_prob, batch.log_probs[rows, j])  # bitwise: exp(0) == 1
            assert torch.equal(kl, torch.zeros(4))  # reference == policy before any update


def test_on_policy_ratio_is_exactly_one_under_bf16_autocast_with_cfg(arch):
    policy = make_policy(arch)
    policy.autocast = True
    cfg = GRPOConfig(num_steps=4, micro_batch=4, optimizer_steps=1, guidance_scale=4.5)
    batch = _batch(policy, cfg)
    for start in (0, 4):
        for j in batch.trained_steps:
            out, _ = grpo.step_terms(policy, batch, slice(start, start + 4), j, cfg, need_reference=False)
            log_prob = out.log_prob
            assert torch.equal(log_prob, batch.log_probs[start : start + 4, j])


def test_compiled_network_keeps_the_on_policy_ratio_exactly_one_and_the_velocity(arch):
    from rewardflow.shapes.tiny_dit import compile_unavailable

    if compile_unavailable():
        pytest.skip(f"torch.compile cannot build code here: {compile_unavailable()}")
    policy = make_policy(arch)
    policy.autocast, policy.compile = True, True
    cfg = GRPOConfig(num_steps=3, micro_batch=4, optimizer_steps=1, guidance_scale=4.5)
    batch = _batch(policy, cfg)  # sampled without gradient, as every rollout is
    for start in (0, 4):
        for j in batch.trained_steps:
            out, kl = grpo.step_terms(policy, batch, slice(start, start + 4), j, cfg, need_reference=True)
            assert torch.equal(out.log_prob, batch.log_probs[start : start + 4, j])
            assert kl.abs().max() < 1e-3  # the frozen reference runs its own graph: equal within bf16 rounding
    cond = policy.encode_prompts(PROMPTS)
    x, sigma = torch.randn(4, 3, 32, 32), torch.full((4,), 0.6)
    with torch.no_grad():
        compiled = policy.velocity(x, sigma, cond, 4.5)
        policy.compile = False
        eager = policy.velocity(x, sigma, cond, 4.5)
    assert not compiled.requires_grad
    scale = eager.abs().max()
    assert (compiled - eager).abs().max() < 0.05 * scale  # the same network, rounded differently in bf16


def test_train_step_with_one_optimizer_step_sees_ratio_one(tiny_config):
    policy = make_policy(tiny_config)
    cfg = GRPOConfig(num_steps=4, micro_batch=4, optimizer_steps=1)
    batch = _batch(policy, cfg)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3)
    before = copy.deepcopy(policy.module.state_dict())
    metrics = grpo.train_step(policy, opt, batch, torch.randn(8), cfg)
    assert metrics["ratio_dev"] == 0.0 and metrics["clip_frac"] == 0.0 and metrics["kl"] == 0.0
    changed = any(not torch.equal(before[k], v) for k, v in policy.module.state_dict().items())
    assert changed


def test_second_optimizer_step_is_off_policy(tiny_config):
    policy = make_policy(tiny_config)
    cfg = GRPOConfig(num_steps=4, micro_batch=4, optimizer_steps=2, kl_beta=0.04)
    batch = _batch(policy, cfg)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    metrics = grpo.train_step(policy, opt, batch, torch.randn(8), cfg)
    assert metrics["ratio_dev"] > 0 and metrics["kl"] > 0


def test_last_step_is_deterministic_and_untrained(tiny_config):
    policy = make_policy(tiny_config)
    cfg = GRPOConfig(num_steps=5, micro_batch=8)
    batch = _batch(policy, cfg)
    assert batch.trained_steps == [0, 1, 2, 3]
    assert torch.equal(batch.log_probs[:, -1], torch.zeros(8))


def update_gradient(policy, batch, adv, cfg, generator=None) -> torch.Tensor:
    """The flat gradient that ``train_step`` hands to its (single) optimizer step."""
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.0)
    seen, step = [], opt.step

    def capture(*args, **kwargs):
        seen.append(torch.cat([p.grad.flatten() for p in policy.trainable_parameters() if p.grad is not None]))
        return step(*args, **kwargs)

    opt.step = capture
    grpo.train_step(policy, opt, batch, adv, cfg, generator=generator)
    assert len(seen) == 1
    return seen[0]


def test_micro_batch_accumulation_matches_full_batch_gradient(tiny_config):
    """Splitting 8 rows into micro-batches of 4 (or ragged ones: 3, 3, 2) gives the gradient of one batch of 8
    (policy and KL terms)."""
    grads = []
    for micro in (8, 4, 3):
        policy = make_policy(tiny_config)
        with torch.no_grad():  # move the policy off the reference so that the KL term has a gradient
            for p in policy.trainable_parameters():
                p.add_(0.01 * torch.randn_like(p))
        cfg = GRPOConfig(num_steps=3, micro_batch=micro, optimizer_steps=1, kl_beta=0.5, grad_clip=1e9)
        batch = _batch(policy, GRPOConfig(num_steps=3, micro_batch=8), seed=3)
        grads.append(update_gradient(policy, batch, torch.linspace(-1, 1, 8), cfg))
    assert grads[0].norm() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)
    assert torch.allclose(grads[0], grads[2], atol=1e-6, rtol=1e-4)


def test_kl_every_computes_the_kl_term_in_rotating_forwards_weighted_up(tiny_config, monkeypatch):
    """With ``kl_every`` 2, the KL gradient is that of the terms of forwards (micro-batch m, step k) with m + k even,
    each weighted by 2; the reference runs in those forwards only."""
    policy = make_policy(tiny_config)
    with torch.no_grad():  # off the reference, so that the KL term has a gradient
        for p in policy.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = GRPOConfig(num_steps=3, micro_batch=4, optimizer_steps=1, kl_beta=0.5, kl_every=2, grad_clip=1e9)
    batch = _batch(policy, GRPOConfig(num_steps=3, micro_batch=4), seed=3)
    calls = []
    real = grpo.step_terms

    def counting(*args, need_reference, **kwargs):
        calls.append(need_reference)
        return real(*args, need_reference=need_reference, **kwargs)

    monkeypatch.setattr(grpo, "step_terms", counting)
    got = update_gradient(policy, batch, torch.zeros(8), cfg)  # zero advantages: only the KL has a gradient
    assert calls == [True, False, False, True]  # (m, k) = (0, 0), (0, 1), (1, 0), (1, 1)
    params = list(policy.trainable_parameters())
    total = 0.0
    for m, k in [(0, 0), (1, 1)]:
        _, kl = real(policy, batch, slice(4 * m, 4 * m + 4), k, cfg, need_reference=True)
        total = total + 0.5 * 2 * kl.mean() / (2 * 2)  # beta * kl_every * mean / (micro-batches * steps)
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(total, params)])
    assert got.norm() > 0
    assert torch.allclose(got, expected, atol=1e-7, rtol=1e-5)
    with pytest.raises(ValueError, match="kl_every"):
        GRPOConfig(kl_every=0)


def test_micro_batches_give_every_row_of_a_step_the_same_weight():
    even = micro_batches(128, 32, 2)
    chunks, per_opt = [slice(i, i + 32) for i in range(0, 128, 32)], 2  # what check_batch's even split gives
    assert [c for c, *_ in even] == chunks and all(d == per_opt for _, d, *_ in even)
    assert [after for *_, after in even] == [False, True, False, True]
    assert [step for _, _, step, _ in even] == [0, 0, 1, 1]
    # 9 groups of 8 left after dropping: micro-batches of 32, 32 and 8 rows; the short one joins the second step
    assert [(c.start, c.stop, d, a) for c, d, _, a in micro_batches(72, 32, 2)] == [
        (0, 32, 1.0, True), (32, 64, 40 / 32, False), (64, 72, 5.0, True)
    ]  # fmt: skip
    assert [(c.start, c.stop, d, a) for c, d, _, a in micro_batches(8, 32, 2)] == [(0, 8, 1.0, True)]
    for rows, micro, steps in [(5, 2, 2), (3, 1, 2), (100, 32, 1), (77, 16, 3), (1, 4, 4)]:
        plan = micro_batches(rows, micro, steps)
        assert [m.rows.start for m in plan] == [0] + [m.rows.stop for m in plan[:-1]] and plan[-1].rows.stop == rows
        assert all(0 < m.rows.stop - m.rows.start <= micro for m in plan) and plan[-1].ends_step
        assert 1 <= sum(m.ends_step for m in plan) <= steps
        weights = []  # a row's weight in its step's loss: 1 / (divisor * micro-batch rows)
        for c, d, _, a in plan:
            weights += [1.0 / (d * (c.stop - c.start))] * (c.stop - c.start)
            if a:
                assert weights == pytest.approx([weights[0]] * len(weights)) and sum(weights) == pytest.approx(1.0)
                weights = []
    with pytest.raises(ValueError, match="at least one row"):
        micro_batches(0, 4, 1)


def test_after_optimizer_step_runs_after_each_step(tiny_config):
    policy = make_policy(tiny_config)
    cfg = GRPOConfig(num_steps=3, micro_batch=2, optimizer_steps=4)
    batch = _batch(policy, cfg)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.1)
    seen = []
    first = next(iter(policy.trainable_parameters()))
    grpo.train_step(policy, opt, batch, torch.randn(8), cfg, after_optimizer_step=lambda: seen.append(first.clone()))
    assert len(seen) == 4
    assert not torch.equal(seen[0], seen[1])  # called between optimizer steps, not all at the end


def test_timestep_fraction_trains_a_random_subset_per_sample(tiny_config, monkeypatch):
    """k of the SDE steps per row, in time order, drawn from the generator; the loss is still a mean."""
    policy = make_policy(tiny_config)
    cfg = GRPOConfig(num_steps=9, micro_batch=4, optimizer_steps=1, timestep_fraction=0.4)
    assert cfg.steps_per_sample == 3  # int(0.4 * 8)
    batch = _batch(policy, cfg)
    calls = []
    real = grpo.step_terms

    def spy(policy, batch, rows, j, cfg, need_reference):
        calls.append((rows.start, j.tolist()))
        return real(policy, batch, rows, j, cfg, need_reference)

    monkeypatch.setattr(grpo, "step_terms", spy)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.0)

    def run(seed):
        calls.clear()
        grpo.train_step(policy, opt, batch, torch.randn(8), cfg, generator=torch.Generator().manual_seed(seed))
        return list(calls)

    first = run(0)
    assert [start for start, _ in first] == [0, 0, 0, 4, 4, 4]  # 3 forwards per micro-batch
    per_row = [[js[r] for start, js in first if start == s0] for s0 in (0, 4) for r in range(4)]
    assert all(len(set(js)) == 3 and js == sorted(js) and set(js) <= set(range(8)) for js in per_row)
    assert len({tuple(js) for js in per_row[:4]}) > 1  # drawn per sample, not per micro-batch
    assert run(0) == first and run(1) != first  # reproducible from the generator

    # A fraction that keeps every step is the full update.
    full = GRPOConfig(num_steps=9, micro_batch=2, optimizer_steps=1)
    assert GRPOConfig(num_steps=9, timestep_fraction=1.0).steps_per_sample == full.steps_per_sample == 8
    assert GRPOConfig(num_steps=9, timestep_fraction=0.99).steps_per_sample == 7  # truncated, as DanceGRPO counts
    assert GRPOConfig(num_steps=9, timestep_fraction=0.01).steps_per_sample == 1


def test_timestep_fraction_keeps_the_ratio_exactly_one_at_mixed_timesteps(tiny_config):
    """Rows of one training forward sit at different steps, yet each re-scores bitwise as in its rollout."""
    policy = make_policy(tiny_config)
    policy.autocast = True
    cfg = GRPOConfig(num_steps=6, micro_batch=4, optimizer_steps=1, guidance_scale=4.5, timestep_fraction=0.5)
    batch = _batch(policy, cfg)
    mixed = torch.tensor([0, 3, 1, 4])
    out, kl = grpo.step_terms(policy, batch, slice(4, 8), mixed, cfg, need_reference=True)
    log_prob = out.log_prob
    assert torch.equal(log_prob, batch.log_probs[4:8][torch.arange(4), mixed])
    assert torch.equal(kl, torch.zeros(4))
    sgd = torch.optim.SGD(policy.trainable_parameters(), lr=0.0)
    assert grpo.train_step(policy, sgd, batch, torch.randn(8), cfg)["ratio_dev"] == 0.0


def test_timestep_fraction_loss_is_the_mean_over_drawn_terms(tiny_config, monkeypatch):
    """One drawn step per row: the gradient of the mean of those rows' own terms (normalised by 1 term)."""
    policy = make_policy(tiny_config)
    cfg = GRPOConfig(num_steps=9, micro_batch=8, optimizer_steps=1, timestep_fraction=1 / 8, grad_clip=1e9)
    batch = _batch(policy, cfg, seed=5)
    adv = torch.linspace(-1, 1, 8)
    drawn, real = [], grpo.step_terms

    def spy(policy, batch, rows, j, cfg, need_reference):
        drawn.append(j.clone())
        return real(policy, batch, rows, j, cfg, need_reference)

    monkeypatch.setattr(grpo, "step_terms", spy)
    got = update_gradient(policy, batch, adv, cfg, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(grpo, "step_terms", real)
    (j,) = drawn  # one forward: every row at its own drawn step
    assert len(set(j.tolist())) > 1
    policy.module.zero_grad()
    out, _ = grpo.step_terms(policy, batch, slice(0, 8), j, cfg, need_reference=True)
    log_prob = out.log_prob
    (-(adv * torch.exp(log_prob - batch.log_probs[torch.arange(8), j])).mean()).backward()
    want = torch.cat([p.grad.flatten() for p in policy.trainable_parameters() if p.grad is not None])
    assert got.norm() > 0
    assert torch.allclose(got, want, atol=1e-7, rtol=1e-5)


def test_best_worst_k_keeps_the_extremes_of_each_group():
    adv = torch.tensor([0.1, 2.0, -1.0, 0.5, 3.0, -2.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert grpo.best_worst_rows(adv, groups, 2).tolist() == [1, 2, 4, 5]
    assert grpo.best_worst_rows(adv, groups, 4).tolist() == list(range(8))
    with pytest.raises(ValueError, match="best_worst_k"):
        grpo.best_worst_rows(adv, groups, 6)
    with pytest.raises(ValueError, match="best_worst_k"):
        GRPOConfig(best_worst_k=3)


def test_selected_rows_train_near_on_policy(tiny_config):
    """After best/worst selection the training micro-batches hold other rows than the rollout chunks: the ratio
    stays 1 up to float rounding, not bitwise (DanceGRPO rolls out one image at a time for this reason)."""
    policy = make_policy(tiny_config)
    cfg = GRPOConfig(num_steps=4, micro_batch=4, optimizer_steps=1, sde_type="dance", best_worst_k=2)
    batch = _batch(policy, cfg)
    adv = torch.randn(8, generator=torch.Generator().manual_seed(0))
    keep = grpo.best_worst_rows(adv, torch.arange(2).repeat_interleave(4), 2)
    sub = batch.select(keep)
    assert sub.cond.prompts == [batch.cond.prompts[i] for i in keep.tolist()]
    assert len(keep) == 4 and torch.equal(sub.xs, batch.xs[keep])
    metrics = grpo.train_step(policy, torch.optim.SGD(policy.trainable_parameters(), lr=0.0), sub, adv[keep], cfg)
    assert metrics["ratio_dev"] < 1e-5


def test_rows_with_signal_top_up_to_whole_micro_batches():
    adv = torch.tensor([0.0, 1.0, 0.0, 0.0, -2.0, 0.0, 0.0, 0.0])
    assert grpo.rows_with_signal(adv, 4).tolist() == [0, 1, 2, 4]  # two rows with signal, two added back
    assert grpo.rows_with_signal(adv, 2).tolist() == [1, 4]
    assert grpo.rows_with_signal(adv, 3).tolist() == [0, 1, 4]
    assert grpo.rows_with_signal(torch.zeros(8), 4).tolist() == []
    assert grpo.rows_with_signal(torch.ones(8), 4).tolist() == list(range(8))


def test_rows_left_after_dropping_zero_advantages_train_near_on_policy(tiny_config):
    """Five rows with signal and one added back, in 3 micro-batches of 2 (other rows than the rollout's chunks of 2)
    and 2 optimizer steps: ratio 1 up to float rounding."""
    policy = make_policy(tiny_config)
    cfg = GRPOConfig(num_steps=4, micro_batch=2, optimizer_steps=2, guard=True, drop_zero_advantage=True)
    batch = _batch(policy, cfg)
    adv = torch.tensor([0.5, 0.0, -0.5, 1.0, 0.0, -1.0, 0.0, -0.2])
    keep = grpo.rows_with_signal(adv, cfg.micro_batch)
    assert keep.tolist() == [0, 1, 2, 3, 5, 7]
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.0)
    steps = []
    metrics = grpo.train_step(policy, opt, batch.select(keep), adv[keep], cfg, lambda: steps.append(1))
    assert metrics["ratio_dev"] < 1e-5 and len(steps) == 2


def test_cps_rollouts_keep_the_ratio_exactly_one(tiny_config):
    policy = make_policy(tiny_config)
    cfg = GRPOConfig(num_steps=4, micro_batch=4, optimizer_steps=1, sde_type="cps", noise_level=0.8, kl_form="paper")
    batch = _batch(policy, cfg)
    for j in batch.trained_steps:
        out, kl = grpo.step_terms(policy, batch, slice(0, 4), j, cfg, need_reference=True)
        log_prob = out.log_prob
        assert torch.equal(log_prob, batch.log_probs[0:4, j]) and torch.equal(kl, torch.zeros(4))
    with pytest.raises(ValueError, match="CPS"):
        GRPOConfig(sde_type="cps", noise_level=1.5)
    with pytest.raises(ValueError, match="kl_form 'paper'"):
        GRPOConfig(sde_type="cps", noise_level=0.8, kl_beta=0.04)  # the code form has no g for CPS


def test_mixgrpo_progressive_window_slides_and_rolls_back():
    cfg = GRPOConfig(num_steps=9, sde_window=2, sde_window_range=(0, 6), window_schedule="progressive", window_iters=3)
    starts = [cfg.window.start(it) for it in range(16)]
    # positions 0..4 (window of 2 in [0, 6)), 3 iterations each, then back to 0
    assert starts == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 0]
    strided = GRPOConfig(
        num_steps=9, sde_window=2, window_schedule="progressive", window_iters=1, window_stride=3
    )  # range [0, 8): starts 0, 3, 6
    assert [strided.window.start(it) for it in range(4)] == [0, 3, 6, 0]
    levels = cfg.draw_noise_levels(iteration=4)
    assert levels.nonzero().flatten().tolist() == [1, 2]


def test_mixgrpo_decay_window_stays_shorter_as_it_moves():
    cfg = GRPOConfig(
        num_steps=6, sde_window=1, window_schedule="decay", window_iters=4, window_iters_min=1
    )  # 5 positions, stays 4, 3, 2, 2 (rounded 1.75), 1
    starts = [cfg.window.start(it) for it in range(13)]
    assert starts == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 0]
    with pytest.raises(ValueError, match="window_iters_min"):
        GRPOConfig(sde_window=1, window_schedule="decay", window_iters=2, window_iters_min=3)
    with pytest.raises(ValueError, match="window_schedule"):
        GRPOConfig(sde_window=1, window_schedule="cosine")
    with pytest.raises(ValueError, match="needs a window"):
        GRPOConfig(window_schedule="progressive")


def test_lora_training_leaves_base_weights_frozen(tiny_config):
    module = make_module(tiny_config)
    add_lora(module, rank=2, alpha=4, target_modules=["qkv", "proj", "fc1", "fc2"])
    policy = TinyDiTPolicy(module)
    base = {k: v.clone() for k, v in policy.module.state_dict().items() if "lora_" not in k}
    cfg = GRPOConfig(num_steps=3, micro_batch=4, optimizer_steps=2, kl_beta=0.1)
    batch = _batch(policy, cfg)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    metrics = grpo.train_step(policy, opt, batch, torch.randn(8), cfg)
    after = policy.module.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())
    assert all("lora_" in n for n, _ in policy.named_trainable_state())
    assert metrics["kl"] > 0  # adapters moved away from the reference (= adapters off)


def test_full_finetune_reference_copy_stays_frozen(tiny_config):
    policy = make_policy(tiny_config)
    ref_before = copy.deepcopy(policy.weights._reference.state_dict())
    cfg = GRPOConfig(num_steps=3, micro_batch=4, optimizer_steps=2)
    grpo.train_step(
        policy, torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2), _batch(policy, cfg), torch.randn(8), cfg
    )
    assert all(torch.equal(v, policy.weights._reference.state_dict()[k]) for k, v in ref_before.items())


def test_config_validation():
    with pytest.raises(ValueError, match="num_steps"):
        GRPOConfig(num_steps=1)
    with pytest.raises(ValueError, match="noise_level"):
        GRPOConfig(noise_level=0.0)
    with pytest.raises(ValueError, match="timestep_fraction"):
        GRPOConfig(timestep_fraction=0.0)
    with pytest.raises(ValueError, match="kl_form"):
        GRPOConfig(kl_form="exact")
    with pytest.raises(ValueError, match="micro_batch"):
        GRPOConfig(micro_batch=3).check_batch(8)
    with pytest.raises(ValueError, match="optimizer_steps"):
        GRPOConfig(micro_batch=4, optimizer_steps=3).check_batch(8)


def test_fast_window_over_every_step_is_plain_flow_grpo(tiny_config):
    policy = make_policy(tiny_config)
    full = GRPOConfig(num_steps=5, micro_batch=4, optimizer_steps=1)
    fast = GRPOConfig(num_steps=5, micro_batch=4, optimizer_steps=1, sde_window=4)
    a, b = _batch(policy, full), _batch(policy, fast)
    assert torch.equal(a.xs, b.xs) and torch.equal(a.log_probs, b.log_probs)
    assert a.trained_steps == b.trained_steps == [0, 1, 2, 3]


def test_fast_window_trains_only_its_steps_and_keeps_the_ratio_exactly_one(tiny_config):
    policy = make_policy(tiny_config)
    cfg = GRPOConfig(num_steps=8, micro_batch=4, optimizer_steps=1, sde_window=2, sde_window_range=(1, 5))
    starts = set()
    for seed in range(12):
        batch = _batch(policy, cfg, seed=seed)
        steps = batch.trained_steps
        assert len(steps) == 2 and steps[1] == steps[0] + 1 and 1 <= steps[0] <= 3
        starts.add(steps[0])
        outside = [j for j in range(8) if j not in steps]
        assert torch.all(batch.log_probs[:, outside] == 0)  # ODE steps outside the window
    assert starts == {1, 2, 3}  # every allowed start is drawn
    for j in batch.trained_steps:
        out, _ = grpo.step_terms(policy, batch, slice(0, 4), j, cfg, need_reference=False)
        log_prob = out.log_prob
        assert torch.equal(log_prob, batch.log_probs[0:4, j])


@pytest.mark.parametrize(("window", "bounds"), [(8, (0, 0)), (3, (2, 4)), (-1, (0, 0)), (2, (0, 9))])
def test_bad_fast_window_is_named(window, bounds):
    with pytest.raises(ValueError, match="grpo.sde_window"):
        GRPOConfig(num_steps=8, sde_window=window, sde_window_range=bounds)


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_dance_sde_on_policy_ratio_is_exactly_one(tiny_config, guidance):
    policy = make_policy(tiny_config)
    cfg = GRPOConfig(num_steps=4, micro_batch=4, optimizer_steps=1, guidance_scale=guidance, sde_type="dance")
    batch = _batch(policy, cfg)
    flow = _batch(policy, GRPOConfig(num_steps=4, micro_batch=4, optimizer_steps=1, guidance_scale=guidance))
    assert not torch.equal(batch.xs, flow.xs)  # the Dance step is really used
    for j in batch.trained_steps:
        out, kl = grpo.step_terms(policy, batch, slice(0, 4), j, cfg, need_reference=True)
        log_prob = out.log_prob
        assert torch.equal(log_prob, batch.log_probs[0:4, j])
        assert torch.equal(kl, torch.zeros(4))
    with pytest.raises(ValueError, match="grpo.sde_type"):
        GRPOConfig(sde_type="ddim")


def test_same_initial_noise_is_shared_within_groups_only(tiny_config):
    policy = make_policy(tiny_config)
    cfg = GRPOConfig(num_steps=4, micro_batch=4, optimizer_steps=1, same_initial_noise=True, sde_type="dance")
    cond = policy.encode_prompts([p for p in PROMPTS for _ in range(2)])
    group_ids = torch.arange(4).repeat_interleave(2)
    batch = grpo.collect(policy, cond, cfg, torch.Generator().manual_seed(0), group_ids)
    x0, x1 = batch.xs[:, 0], batch.xs[:, 1]
    for g in range(4):
        a, b = 2 * g, 2 * g + 1
        assert torch.equal(x0[a], x0[b]) and not torch.equal(x1[a], x1[b])  # same start, different SDE noise
    assert not torch.equal(x0[0], x0[2])
    for j in batch.trained_steps:  # still exactly on-policy
        out, _ = grpo.step_terms(policy, batch, slice(0, 4), j, cfg, need_reference=False)
        log_prob = out.log_prob
        assert torch.equal(log_prob, batch.log_probs[0:4, j])
    with pytest.raises(ValueError, match="same_initial_noise needs"):
        grpo.collect(policy, cond, cfg, torch.Generator().manual_seed(0))


def test_guard_log_ratio_is_the_re_centred_log_ratio_in_mean_units():
    """RatioNorm: ``mean(xi d) = std (log p - log p_old) + mean(d^2) / (2 std)``, 0 where the mean has not moved."""
    from rewardflow.sampling.sde import gaussian_log_prob
    from rewardflow.types import StepOutput

    gen = torch.Generator().manual_seed(0)
    old_mean, mean = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    std = torch.tensor([0.3, 1.0, 0.05])
    x_next = old_mean + std.view(-1, 1, 1, 1) * torch.randn(3, 2, 4, 4, generator=gen)
    for reduction in ("mean", "sum"):
        out = StepOutput(x_next, mean, std, gaussian_log_prob(x_next, mean, std, reduction))
        old_lp = gaussian_log_prob(x_next, old_mean, std, reduction)
        d2 = ((mean - old_mean) ** 2).flatten(1)
        d2 = d2.mean(1) if reduction == "mean" else d2.sum(1)
        want = std * (out.log_prob - old_lp) + d2 / (2 * std)
        assert torch.allclose(grpo.guard_log_ratio(out, old_mean, reduction), want, atol=1e-4, rtol=1e-4)
        still = StepOutput(x_next, old_mean, std, old_lp)
        assert torch.equal(grpo.guard_log_ratio(still, old_mean, reduction), torch.zeros(3))


def test_guard_gives_every_step_the_same_gradient_scale_in_velocity():
    """With the same unit noise, a step's gradient w.r.t. the velocity is ``A (1 + a^2/2) xi / N`` at every sigma
    under GRPO-Guard, while the plain ratio's scales as ``sqrt(dt) / g`` (the last steps outweigh the first)."""
    from rewardflow.sampling.sde import sde_step

    a, adv = 1.0, torch.tensor([1.5])
    xi = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    norms = {"guard": [], "plain": []}
    for s, sn in ((0.964, 0.923), (0.429, 0.25)):
        v = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        drawn = sde_step(x, v.detach(), s, sn, a)
        x_next = drawn.mean + drawn.std.view(-1, 1, 1, 1) * xi
        old = sde_step(x, v.detach(), s, sn, a, x_next=x_next)
        for kind in norms:
            out = sde_step(x, v, s, sn, a, x_next=x_next)
            if kind == "guard":
                log_ratio, w = grpo.guard_log_ratio(out, old.mean), torch.tensor([1 / (s - sn)])
            else:
                log_ratio, w = out.log_prob - old.log_prob, None
            loss, _ = grpo.clipped_policy_loss(log_ratio, adv, 1e-4, w)
            (grad,) = torch.autograd.grad(loss, v)
            if kind == "guard":
                assert torch.allclose(grad, adv * (1 + a**2 / 2) * xi / xi.numel(), atol=1e-7, rtol=1e-4)
            norms[kind].append(grad.norm().item())
    assert norms["guard"][0] == pytest.approx(norms["guard"][1], rel=1e-4)
    assert norms["plain"][1] > 3 * norms["plain"][0]


def test_guard_on_policy_ratio_is_one_and_the_update_descends_the_hand_written_objective(tiny_config):
    policy = make_policy(tiny_config)
    cfg = GRPOConfig(num_steps=4, micro_batch=8, optimizer_steps=1, guidance_scale=4.5, guard=True, grad_clip=1e9)
    batch = _batch(policy, cfg, seed=2)
    assert batch.means.shape == (8, 4, *batch.xs.shape[2:])
    assert torch.equal(batch.select(torch.tensor([5, 1])).means, batch.means[[5, 1]])
    adv = torch.linspace(-1, 1, 8)
    got = update_gradient(policy, batch, adv, cfg)
    policy.module.zero_grad()
    for j in batch.trained_steps:
        out, _ = grpo.step_terms(policy, batch, slice(0, 8), j, cfg, need_reference=False)
        old = batch.means[:, j]
        assert torch.equal(out.mean, old)  # bitwise on-policy: log rho_hat == 0, rho_hat == 1
        xi = (batch.xs[:, j + 1] - old) / out.std.view(-1, 1, 1, 1)
        term = (xi * out.mean).flatten(1).mean(1) / (batch.sigmas[j] - batch.sigmas[j + 1])
        (-(adv * term).mean() / len(batch.trained_steps)).backward()
    want = torch.cat([p.grad.flatten() for p in policy.trainable_parameters() if p.grad is not None])
    assert got.norm() > 0
    assert torch.allclose(got, want, atol=1e-8, rtol=1e-4)
    policy.autocast = True  # and under bf16 autocast the re-scored means are still bitwise the rollout's
    batch = _batch(policy, cfg, seed=3)
    metrics = grpo.train_step(policy, torch.optim.SGD(policy.trainable_parameters(), lr=0.0), batch, adv, cfg)
    assert metrics["ratio_dev"] == 0.0 and metrics["clip_frac"] == 0.0
