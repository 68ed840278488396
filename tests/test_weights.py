import pytest
import torch

from rewardflow.models.lora import add_lora
from rewardflow.shapes.tiny_dit import TinyDiTPolicy
from tests.conftest import make_module, make_policy


def _lora_policy(tiny_config) -> TinyDiTPolicy:
    module = make_module(tiny_config)
    add_lora(module, rank=2, alpha=4, target_modules=["qkv", "proj", "fc1", "fc2"])
    return TinyDiTPolicy(module)


@pytest.mark.parametrize("lora", [True, False])
def test_old_policy_lags_and_soft_updates(tiny_config, lora):
    policy = _lora_policy(tiny_config) if lora else make_policy(tiny_config)
    cond = policy.encode_prompts(["a circle", "two squares"])
    x, s = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 0.8])
    policy.init_old()
    names = [n for n, _ in policy.named_trainable_state()]
    assert [n for n, _ in policy.named_old_state()] == names  # same names, so checkpoints match
    assert all(not t.requires_grad for _, t in policy.named_old_state())
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    v = policy.velocity(x, s, cond)
    with policy.old():
        v_old = policy.velocity(x, s, cond)
    with policy.reference():
        v_ref = policy.velocity(x, s, cond)
    assert torch.equal(v_old, v_ref)  # the old policy is the start, which is the reference here
    assert not torch.allclose(v, v_old, atol=1e-4)
    assert [n for n, _ in policy.named_trainable_state()] == names  # the contexts restore what trains
    policy.soft_update_old(0.0)  # eta 0 copies the trained weights
    with policy.old():
        assert torch.allclose(policy.velocity(x, s, cond), v, atol=1e-6)
    with policy.old(), pytest.raises(RuntimeError, match="do not nest"):
        with policy.reference():
            pass


def test_a_full_finetune_without_a_reference_copy_refuses_the_reference(tiny_config):
    """A run that never asks for the reference goes without the copy; asking for it then is an error, not the
    trained weights passed off as the reference."""
    policy = TinyDiTPolicy(make_module(tiny_config))
    with pytest.raises(ValueError, match="built without a reference copy"):
        with policy.reference():
            pass
    with pytest.raises(RuntimeError, match="init_old"):
        with make_policy(tiny_config).old():
            pass


def test_merged_sampling_runs_the_adapter_and_puts_the_base_weights_back_exactly(tiny_config):
    policy = _lora_policy(tiny_config)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    policy.init_old()
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))  # the old adapter now differs from the trained one
    cond = policy.encode_prompts(["a circle", "two squares"])
    x, s = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 0.8])
    weights = {n: (t, t.clone(), t.requires_grad) for n, t in policy.module.named_parameters()}
    with torch.no_grad():
        v = policy.velocity(x, s, cond)
        with policy.reference():
            v_ref = policy.velocity(x, s, cond)
        with policy.old():
            v_old = policy.velocity(x, s, cond)
    policy.weights.merge_lora = True
    for _ in range(3):  # entering and leaving again and again must not drift
        with policy.sampling():
            assert not any("lora_" in n for n, _ in _used_parameters(policy, x, s, cond))  # one matmul per layer
            v_merged = policy.velocity(x, s, cond)
        with policy.old(), policy.sampling():
            v_old_merged = policy.velocity(x, s, cond)
        with policy.reference(), policy.sampling():
            assert torch.equal(policy.velocity(x, s, cond), v_ref)  # adapters off: nothing to merge
    assert torch.allclose(v_merged, v, atol=1e-5) and not torch.equal(v_merged, v)  # other rounding, same function
    assert torch.allclose(v_old_merged, v_old, atol=1e-5)
    for name, param in policy.module.named_parameters():  # the same tensors, bit for bit, trainable as they were
        original, before, trainable = weights[name]
        assert param is original and torch.equal(param, before) and param.requires_grad == trainable
    assert torch.equal(policy.velocity(x, s, cond), v)
    policy.velocity(x, s, cond).square().mean().backward()  # gradients reach the adapters after a merged rollout
    assert all(p.grad is not None for p in policy.trainable_parameters())


def _used_parameters(policy, x, s, cond):
    """The parameters a forward pass reads, found by which ones appear in an autograd graph."""
    used = []
    with torch.enable_grad():
        params = dict(policy.module.named_parameters())
        flags = {n: p.requires_grad for n, p in params.items()}
        for p in params.values():
            p.requires_grad_(True)
        out = policy.velocity(x, s, cond).sum()
        grads = torch.autograd.grad(out, list(params.values()), allow_unused=True)
        used = [(n, p) for (n, p), g in zip(params.items(), grads) if g is not None]
        for n, p in params.items():
            p.requires_grad_(flags[n])
    return used


def test_merging_needs_lora():
    from rewardflow.models.config import ModelConfig

    with pytest.raises(ValueError, match="merge_lora_rollouts .*lora_rank > 0"):
        ModelConfig(merge_lora_rollouts=True)


def test_compile_without_a_compiler_warns_and_runs_eagerly(monkeypatch, caplog):
    from rewardflow import build
    from rewardflow.models.config import ModelConfig

    monkeypatch.setattr(build, "compile_unavailable", lambda: "InvalidCxxCompiler: no working C++ compiler found")
    with caplog.at_level("WARNING", logger="rewardflow.build"):
        policy = build.build_policy(ModelConfig(compile=True))
    assert policy.compile is False
    assert "model.compile: torch.compile cannot build code here (InvalidCxxCompiler" in caplog.text
    monkeypatch.setattr(build, "compile_unavailable", lambda: "")
    assert build.build_policy(ModelConfig(compile=True)).compile is True
