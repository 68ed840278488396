import json

import pytest
import torch

from rewardflow.algorithms import direct as direct_mod
from rewardflow.algorithms import draft as draft_mod
from rewardflow.algorithms.direct import direct_train_step
from rewardflow.algorithms.draft import DraftConfig, draft_loss
from rewardflow.algorithms.leapalign import LeapAlignConfig, leapalign_loss
from rewardflow.cli import main
from rewardflow.rewards import REWARDS
from rewardflow.sampling.grad import truncated_euler
from rewardflow.sampling.schedules import sd3_schedule
from tests.conftest import Brightness, make_policy

PROMPTS = ["a red circle", "two squares", "a circle left of a triangle", "a blue square"]


def grad_of(policy, loss_fn, cond, seed=0):
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.0)
    seen, step = [], opt.step

    def capture(*a, **k):
        seen.append(torch.cat([p.grad.flatten() for p in policy.trainable_parameters() if p.grad is not None]))
        return step(*a, **k)

    opt.step = capture
    cfg = loss_fn.cfg
    direct_train_step(policy, opt, cond, [{}] * len(cond), loss_fn, cfg, generator=torch.Generator().manual_seed(seed))
    return seen[0]


def draft_fn(reward, cfg):
    fn = draft_loss(reward, cfg)
    fn.cfg = cfg
    return fn


def test_draft_k_equal_to_all_steps_is_full_backprop(tiny_config):
    policy = make_policy(tiny_config)
    cond = policy.encode_prompts(PROMPTS)
    cfg = DraftConfig(num_steps=4, k=4, micro_batch=4, guidance_scale=2.0, grad_clip=1e9)
    got = grad_of(policy, draft_fn(Brightness(), cfg), cond)
    # by hand: an Euler loop with every step in the graph
    policy.module.zero_grad()
    x = policy.noise(4, torch.Generator().manual_seed(0))
    sig = policy.schedule(cfg.num_steps)
    for i in range(4):
        x = x + (sig[i + 1] - sig[i]) * policy.velocity(x, sig[i], cond, 2.0)
    (-policy.decode(x).mean(dim=(1, 2, 3)).mean()).backward()
    want = torch.cat([p.grad.flatten() for p in policy.trainable_parameters() if p.grad is not None])
    assert got.norm() > 0 and torch.allclose(got, want, atol=1e-6, rtol=1e-4)
    # DRaFT-1 is another gradient, and checkpointing does not change it
    one = grad_of(policy, draft_fn(Brightness(), DraftConfig(num_steps=4, k=1, micro_batch=4, grad_clip=1e9)), cond)
    assert not torch.allclose(one, got)
    plain = DraftConfig(num_steps=4, k=1, micro_batch=4, grad_clip=1e9, checkpointing=False)
    assert torch.allclose(grad_of(policy, draft_fn(Brightness(), plain), cond), one, atol=1e-7)


def test_method_samples(tiny_config, monkeypatch):
    policy = make_policy(tiny_config)
    cond = policy.encode_prompts(PROMPTS)

    def velocity(x, s):
        return policy.velocity(x, s, cond, 1.0)

    x = policy.noise(4, torch.Generator().manual_seed(0))
    grid = policy.schedule(6)
    real = truncated_euler(velocity, x, grid, grad_from=6)
    lv_cfg = DraftConfig(method="draft-lv", num_steps=6, lv_samples=3)
    lv, lv_real = lv_cfg.sample(velocity, x, grid, torch.Generator())
    assert len(lv) == 4 and torch.allclose(lv[0], real, atol=1e-6)  # the base term is the real sample
    no_base = DraftConfig(method="draft-lv", num_steps=6, lv_samples=3, lv_include_base=False)
    scored, real_nb = no_base.sample(velocity, x, grid, torch.Generator())
    assert len(scored) == 3 and torch.allclose(real_nb, real, atol=1e-6)  # the monitor still sees the real one
    # ReFL scores a clean prediction but reports the real sample
    refl = DraftConfig(method="refl", num_steps=6, refl_last=3)
    (pred,), refl_real = refl.sample(velocity, x, grid, torch.Generator())
    assert pred.requires_grad and not refl_real.requires_grad and torch.allclose(refl_real, real, atol=1e-6)
    # AlignProp: the first grad-carrying step is drawn in [alignprop_min, num_steps)
    starts = []
    real_te = draft_mod.truncated_euler

    def spy(velocity, x, sigmas, grad_from=0):
        starts.append(grad_from)
        return real_te(velocity, x, sigmas, grad_from=grad_from)

    monkeypatch.setattr(draft_mod, "truncated_euler", spy)
    cfg = DraftConfig(method="alignprop", num_steps=6, alignprop_min=3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        cfg.sample(lambda x, s: x * 0, x, sd3_schedule(6), gen)
    assert set(starts) == {3, 4, 5}


def test_refl_at_the_last_step_is_draft_1(tiny_config):
    """ReFL stopped at the last step scores x - sigma v there, which is the last Euler step: DRaFT-1's gradient."""
    policy = make_policy(tiny_config)
    cond = policy.encode_prompts(PROMPTS)
    refl = grad_of(policy, draft_fn(Brightness(), DraftConfig(method="refl", num_steps=4, refl_last=1,
                                                               micro_batch=4, grad_clip=1e9)), cond)  # fmt: skip
    one = grad_of(policy, draft_fn(Brightness(), DraftConfig(num_steps=4, k=1, micro_batch=4, grad_clip=1e9)), cond)
    assert refl.norm() > 0 and torch.allclose(refl, one, atol=1e-6, rtol=1e-4)


def test_leapalign_step_trains_and_logs_its_diagnostics(tiny_config):
    policy = make_policy(tiny_config)
    cond = policy.encode_prompts(PROMPTS)
    cfg = LeapAlignConfig(num_steps=5, micro_batch=2, optimizer_steps=2)
    fn = leapalign_loss(Brightness(), cfg)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3)
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    metrics, finals, reward = direct_train_step(policy, opt, cond, [{}] * 4, fn, cfg, generator=torch.Generator())
    assert {"loss", "d_j", "d_0", "weight", "k", "j", "grad_norm"} <= set(metrics)
    assert 0 <= metrics["k"] < metrics["j"] < 5 and metrics["weight"] > 0
    assert finals.shape[0] == 4 and not finals.requires_grad and reward.scores.shape == (4,)
    assert any(not torch.equal(a, p) for a, p in zip(before, policy.trainable_parameters()))
    pairs = {cfg.draw_pair(torch.Generator().manual_seed(s)) for s in range(200)}
    assert pairs == {(k, j) for k in range(5) for j in range(k + 1, 5)}  # every pair, k may be 0 and j the last


@pytest.mark.parametrize("hinge", [None, 0.9])
def test_leapalign_loss_by_hand(tiny_config, hinge):
    """LeapAlign's micro-batch loss worked out by hand from a plain Euler rollout: the mean over images of ``w (-r)``
    (or ``w relu(hinge - r)``), ``w = 1 / (max(tau, mean|leap_j - x_j|) + max(tau, mean|leap_0 - x_0|))``, the
    reward taken on the real sample; a small step against its gradient lowers it."""
    policy = make_policy(tiny_config)
    cond = policy.encode_prompts(PROMPTS)
    cfg = LeapAlignConfig(num_steps=5, micro_batch=4, alpha=0.3, tau=0.02, hinge=hinge)
    loss, real, reward, extra = leapalign_loss(Brightness(), cfg)(
        policy, cond, [{}] * 4, torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    )
    k, j = cfg.draw_pair(torch.Generator().manual_seed(4))
    sigmas = policy.schedule(5)
    with torch.no_grad():
        xs = [policy.noise(4, torch.Generator().manual_seed(3), float(sigmas[0]))]
        vs = []
        for i in range(5):
            vs.append(policy.velocity(xs[-1], sigmas[i], cond, cfg.guidance_scale))
            xs.append(xs[-1] + (sigmas[i + 1] - sigmas[i]) * vs[-1])
        leap_j = xs[k] + (sigmas[j] - sigmas[k]) * vs[k]
        leap_0 = xs[j] - sigmas[j] * vs[j]  # leap 2 starts from the real x_j (the connector's value)
        d_j = (leap_j - xs[j]).abs().flatten(1).mean(1).double().clamp(min=cfg.tau)
        d_0 = (leap_0 - xs[-1]).abs().flatten(1).mean(1).double().clamp(min=cfg.tau)
        r = policy.decode(xs[-1]).mean(dim=(1, 2, 3))
        per_image = -r if hinge is None else torch.relu(hinge - r)
        by_hand = (per_image / (d_j + d_0).float()).mean()
    assert (extra["k"], extra["j"]) == (k, j)
    assert torch.allclose(real, xs[-1], atol=1e-5) and torch.allclose(reward.scores, r, atol=1e-5)
    assert torch.allclose(loss.detach(), by_hand, rtol=1e-4), (float(loss), float(by_hand))
    loss.backward()
    with torch.no_grad():  # a small step against the gradient lowers the same loss
        for p in policy.trainable_parameters():
            p -= (
                1e-3
                * p.grad
                / max(float(torch.cat([q.grad.flatten() for q in policy.trainable_parameters()]).norm()), 1e-12)
            )
    lowered, *_ = leapalign_loss(Brightness(), cfg)(
        policy, cond, [{}] * 4, torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    )
    assert float(lowered) < float(loss)


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (DraftConfig, {"method": "dpo"}, "draft.method"),
        (DraftConfig, {"k": 0}, "draft.k"),
        (DraftConfig, {"num_steps": 5, "k": 6}, "draft.k"),
        (DraftConfig, {"hinge": 0.0}, "draft.hinge"),
        (DraftConfig, {"method": "alignprop", "alignprop_min": 20}, "draft.alignprop_min"),
        (DraftConfig, {"method": "refl", "num_steps": 4, "refl_last": 5}, "draft.refl_last"),
        (LeapAlignConfig, {"alpha": 1.5}, "leapalign.alpha"),
        (LeapAlignConfig, {"tau": 0.0}, "leapalign.tau"),
        (LeapAlignConfig, {"num_steps": 5, "pair_min": 4}, "leapalign.pair_min"),
    ],
)
def test_bad_direct_configs_are_named(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_direct_methods_train_end_to_end_and_refuse_a_non_differentiable_reward(
    tmp_path,
    tiny_run_args,
    capsys,
    monkeypatch,  # noqa: F811
):
    monkeypatch.setitem(REWARDS, "brightness", lambda cfg: Brightness())
    monkeypatch.setattr("rewardflow.algorithms.direct.differentiable_rewards", lambda: ["shapes-score", "brightness"])
    small = ["--draft.num-steps", "3", "--draft.micro-batch", "4", "--leapalign.num-steps", "3",
             "--leapalign.micro-batch", "4", "--reward.names", "brightness"]  # fmt: skip
    for algorithm in ("draft", "leapalign"):
        run = tmp_path / algorithm
        args = ["--algorithm", algorithm, *small, *tiny_run_args]
        assert main(["train", "shapes_grpo_smoke", "--run-dir", str(run), *args]) == 0
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        train_rows = [m for m in rows if "reward" in m]
        assert len(train_rows) == 2 and {"loss", "grad_norm", "judge/strict", "judge/reward"} <= set(train_rows[0])
    bad = tmp_path / "bad"
    args = ["--algorithm", "draft", "--draft.micro-batch", "4", *tiny_run_args]
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(bad), *args]) == 2
    err = capsys.readouterr().err
    assert "reward 'shapes-judge' is not differentiable" in err and "brightness" in err
    assert not bad.exists()
    assert direct_mod.reward_loss(torch.tensor([0.2, 0.9]), 0.5).tolist() == pytest.approx([0.3, 0.0])
