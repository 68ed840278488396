"""DiffusionNFT: hand-computed losses, the implicit policies, the optimality map, the old policy and its schedule."""

import copy

import pytest
import torch

from rewardflow.algorithms import nft
from rewardflow.algorithms.nft import NFTConfig, adaptive_x0_loss, nft_policy_loss, old_decay, optimality_probability
from tests.conftest import make_policy

# One sample, two elements, t = 0.5: x_t = [1, 1], x0 = [0, 0], v = [1, 1], v_old = [0, 2].
X_T, X0, T = torch.tensor([[1.0, 1.0]]), torch.zeros(1, 2), torch.tensor([0.5])
V, V_OLD = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 2.0]])


@pytest.mark.parametrize(
    ("beta", "r", "expected"),
    [
        # beta 1: v+ = v = [1, 1] -> x0+ = [.5, .5], L+ = .25 / .5 = .5;
        #         v- = 2 v_old - v = [-1, 3] -> x0- = [1.5, -.5], L- = 1.25 / 1 = 1.25.
        (1.0, 1.0, 0.5),
        (1.0, 0.0, 1.25),
        (1.0, 0.5, 0.875),
        # beta .5: v+ = [.5, 1.5] -> x0+ = [.75, .25], L+ = .3125 / .5 = .625;
        #          v- = 1.5 v_old - .5 v = [-.5, 2.5] -> x0- = [1.25, -.25], L- = .8125 / .75; divided by beta.
        (0.5, 1.0, 0.625 / 0.5),
        (0.5, 0.0, (0.8125 / 0.75) / 0.5),
        (0.5, 0.5, (0.5 * 0.625 + 0.5 * 0.8125 / 0.75) / 0.5),
    ],
)
def test_policy_loss_hand_computed(beta, r, expected):
    loss, _ = nft_policy_loss(V, V_OLD, X_T, X0, T, torch.tensor([r]), beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_adaptive_weight_is_detached():
    v = V.clone().requires_grad_(True)
    loss, _ = nft_policy_loss(v, V_OLD, X_T, X0, T, torch.tensor([1.0]), 1.0)
    loss.sum().backward()
    # L+ = mean (x_t - t v - x0)^2 / w with w = 0.5 held fixed: dL/dv = -2 t (x_t - t v - x0) / (2 w) = -[.5, .5].
    assert torch.allclose(v.grad, torch.tensor([[-0.5, -0.5]]))
    assert adaptive_x0_loss(X0, X0).item() == 0.0  # the 1e-5 floor keeps a perfect prediction finite


def test_implicit_policies_equal_the_old_one_when_theta_is_theta_old(tiny_config):
    policy = make_policy(tiny_config)
    policy.init_old()
    cond = policy.encode_prompts(["a red circle", "two squares"])
    x, s = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 0.8])
    v = policy.velocity(x, s, cond)
    with policy.old():
        v_old = policy.velocity(x, s, cond)
    assert torch.equal(v, v_old)
    for beta in (0.1, 1.0):
        assert torch.allclose(beta * v + (1 - beta) * v_old, v_old) and torch.allclose(
            (1 + beta) * v_old - beta * v, v_old
        )
    # Then the loss is the same for every r: the reward has no say until theta moves.
    x0 = torch.randn(2, 3, 32, 32)
    losses = [nft_policy_loss(v, v_old, x, x0, s, torch.full((2,), r), 1.0)[0] for r in (0.0, 0.5, 1.0)]
    assert torch.allclose(losses[0], losses[1]) and torch.allclose(losses[1], losses[2])


def test_soft_update_moves_only_the_old_copy(tiny_config):
    policy = make_policy(tiny_config)
    policy.init_old()
    start = {n: t.clone() for n, t in policy.named_trainable_state()}
    with torch.no_grad():
        for _, p in policy.named_trainable_state():
            p.add_(1.0)
    policy.soft_update_old(0.25)  # old <- .25 old + .75 theta = start + .75
    for name, old in policy.named_old_state():
        assert torch.allclose(old, start[name] + 0.75)
    assert all(not t.requires_grad for _, t in policy.named_old_state())
    policy.soft_update_old(0.0)
    assert all(torch.equal(o, t) for (_, o), (_, t) in zip(policy.named_old_state(), policy.named_trainable_state()))


def test_old_decay_schedules():
    paper = NFTConfig()  # decay type 1: eta_i = min(0.001 i, 0.5)
    assert [old_decay(k, paper) for k in (0, 100, 500, 5000)] == pytest.approx([0.0, 0.1, 0.5, 0.5])
    ocr = NFTConfig(old_decay_start=75, old_decay_rate=0.0075, old_decay_max=0.999)  # decay type 2
    assert [old_decay(k, ocr) for k in (0, 75, 175, 10_000)] == pytest.approx([0.0, 0.0, 0.75, 0.999])


def test_optimality_probability_modes():
    a = torch.tensor([-7.0, -2.5, 0.0, 1.0, 5.0])
    assert optimality_probability(a, 5.0).tolist() == pytest.approx([0.0, 0.25, 0.5, 0.6, 1.0])
    assert optimality_probability(a, 5.0, "positive_only").tolist() == pytest.approx([0.5, 0.5, 0.5, 0.6, 1.0])
    assert optimality_probability(a, 5.0, "negative_only").tolist() == pytest.approx([0.0, 0.25, 0.5, 0.5, 0.5])
    assert optimality_probability(a, 5.0, "one_only").tolist() == pytest.approx([0.5, 0.5, 0.5, 0.6, 0.6])
    assert optimality_probability(a, 5.0, "binary").tolist() == pytest.approx([0.4, 0.4, 0.5, 0.6, 0.6])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": -0.1}, "nft.beta must be > 0"),
        ({"old_decay_max": 1.0}, r"nft.old_decay_max must be in \[0, 1\)"),
        ({"solver": "rk4"}, "nft.solver must be one of euler, heun, dpm2"),
        ({"adv_mode": "best"}, "nft.adv_mode must be one of"),
        ({"timestep_fraction": 0.0}, "nft.timestep_fraction"),
    ],
)
def test_bad_configs_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NFTConfig(**kwargs)


def test_train_step_moves_towards_high_reward_samples_and_keeps_old_fixed(tiny_config):
    """Rows with r = 1 get a lower x0 error after a few steps than rows with r = 0 (the pull and the push)."""
    torch.manual_seed(0)
    policy = make_policy(tiny_config)
    policy.init_old()
    cfg = NFTConfig(num_steps=4, micro_batch=8, solver="euler", ref_weight=1e-4)
    cond = policy.encode_prompts(["a red circle"] * 8)
    batch = nft.collect(policy, cond, cfg, torch.Generator().manual_seed(0))
    assert batch.x0.shape == (8, 3, 32, 32) and batch.sigmas.shape == (5,)
    r = torch.tensor([1.0, 0.0] * 4)
    old = copy.deepcopy(dict(policy.named_old_state()))
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=1e-3)

    def x0_error(rows: torch.Tensor) -> float:
        gen = torch.Generator().manual_seed(1)
        eps = torch.randn(batch.x0.shape, generator=gen)
        s = torch.full((8,), 0.5)
        with torch.no_grad():
            v = policy.velocity(0.5 * batch.x0 + 0.5 * eps, s, cond)
        err = ((0.5 * batch.x0 + 0.5 * eps - 0.5 * v - batch.x0) ** 2).mean(dim=(1, 2, 3))
        return float(err[rows].mean())

    pos, neg = r > 0.5, r < 0.5
    gap_before = x0_error(neg) - x0_error(pos)
    for it in range(5):
        metrics = nft.train_step(policy, optimizer, batch, r, cfg, generator=torch.Generator().manual_seed(it))
    gap_after = x0_error(neg) - x0_error(pos)
    assert gap_after > gap_before
    assert metrics["ref_loss"] > 0 and metrics["r_mean"] == 0.5
    assert all(torch.equal(t, old[n]) for n, t in policy.named_old_state())  # only soft_update_old moves it


def test_train_step_gradient_equals_the_hand_built_loss(tiny_config):
    """The update of train_step is -lr x grad of C mean(policy loss) + lambda mean (v - v_ref)^2, averaged over
    micro-batches, with the same noise and sigma draws (checks the C factor, the penalty and the normalisation)."""
    torch.manual_seed(0)
    policy = make_policy(tiny_config)
    with torch.no_grad():  # move theta away from the reference so the penalty has a gradient
        for _, p in policy.named_trainable_state():
            p.add_(0.01 * torch.randn_like(p))
    policy.init_old()
    with torch.no_grad():  # and the old policy away from theta so v != v_old
        for _, p in policy.named_old_state():
            p.add_(0.01 * torch.randn_like(p))
    cfg = NFTConfig(
        num_steps=4, micro_batch=2, optimizer_steps=1, timestep_fraction=0.5, ref_weight=0.3, grad_clip=1e9
    )
    cond = policy.encode_prompts(["a red circle", "two squares", "a blue square", "a circle"])
    batch = nft.collect(policy, cond, cfg, torch.Generator().manual_seed(0))
    r = torch.tensor([0.9, 0.1, 0.6, 0.3])
    twin = copy.deepcopy(policy)

    # By hand: the same draws in the same order (per chunk: the sigma permutation, then one noise per slot).
    gen = torch.Generator().manual_seed(7)
    grid, total = batch.sigmas[:-1], 0.0
    for rows in (slice(0, 2), slice(2, 4)):
        x0, c = batch.x0[rows], batch.cond.index(rows)
        order = torch.argsort(torch.rand(2, len(grid), generator=gen), dim=1)[:, : cfg.sigmas_per_image]
        for j in range(cfg.sigmas_per_image):
            sigma = grid[order[:, j]]
            eps = torch.randn(x0.shape, generator=gen)
            x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
            v = twin.velocity(x_t, sigma, c)
            with torch.no_grad(), twin.old():
                v_old = twin.velocity(x_t, sigma, c)
            with torch.no_grad(), twin.reference():
                v_ref = twin.velocity(x_t, sigma, c)
            loss, _ = nft_policy_loss(v, v_old, x_t, x0, sigma, r[rows], cfg.beta)
            total = total + cfg.adv_clip_max * loss.mean() + cfg.ref_weight * ((v - v_ref) ** 2).mean()
    (total / (2 * cfg.sigmas_per_image)).backward()

    sgd = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
    before = {n: p.detach().clone() for n, p in policy.named_trainable_state()}
    nft.train_step(policy, sgd, batch, r, cfg, generator=torch.Generator().manual_seed(7))
    grads = dict(twin.module.named_parameters())
    for name, p in policy.named_trainable_state():
        assert torch.allclose(before[name] - p.detach(), grads[name].grad, atol=1e-6, rtol=1e-4), name
