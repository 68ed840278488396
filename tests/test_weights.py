import pytest
import torch

from rewardflow.models.lora import add_lora
from rewardflow.models.tiny_dit import TinyDiTPolicy
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


def test_a_full_finetune_without_a_reference_copy_is_refused(tiny_config):
    with pytest.raises(ValueError, match="frozen reference copy"):
        TinyDiTPolicy(make_module(tiny_config))
    with pytest.raises(RuntimeError, match="init_old"):
        with make_policy(tiny_config).old():
            pass
