import pytest
import torch

from rewardflow.models.lora import adapters_disabled, add_lora
from rewardflow.models.protocol import FlowPolicy
from rewardflow.shapes.grammar import PromptError
from rewardflow.shapes.tiny_dit import (
    ShapesTokenizer,
    TinyDiT,
    TinyDiTConfig,
    TinyDiTPolicy,
    load_policy,
    load_tiny_dit,
    save_tiny_dit,
)
from tests.conftest import make_policy


def test_default_architecture_size_and_tokens():
    model = TinyDiT(TinyDiTConfig())
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n <= 5_000_000
    assert model.grid**2 == 64
    v = model(torch.randn(2, 3, 32, 32), torch.rand(2), torch.zeros(2, 12, dtype=torch.long))
    assert v.shape == (2, 3, 32, 32)


def test_a_new_prompt_encoder_reads_word_order():
    # Binding ("a circle left of a square", "a red circle and a blue square") needs the order of the words. Swapping
    # the two objects must move the pooled prompt a fair part of what changing one word does; with word positions
    # at 1/50 of the token scale (how the pooled base began) it moved it 0.4-0.9%.
    pairs = [
        ("a circle left of a square", "a square left of a circle", "a circle above a square"),
        ("a red circle and a blue square", "a blue circle and a red square", "a red circle and a green square"),
    ]
    for seed in range(3):
        torch.manual_seed(seed)
        model = TinyDiT(TinyDiTConfig())
        tokenizer = ShapesTokenizer(model.config.vocabulary, model.config.max_prompt_tokens)
        for prompt, swapped, other_word in pairs:
            with torch.no_grad():
                pooled = model.encode_text(tokenizer([prompt, swapped, other_word]))[1]
            assert (pooled[0] - pooled[1]).norm() > 0.05 * (pooled[0] - pooled[2]).norm()


def test_policy_satisfies_protocol(tiny_policy):
    assert isinstance(tiny_policy, FlowPolicy)
    cond = tiny_policy.encode_prompts(["a red circle", "three squares"])
    x = tiny_policy.noise(2, torch.Generator().manual_seed(0))
    assert tiny_policy.velocity(x, 0.5, cond).dtype == torch.float32
    assert tiny_policy.decode(x).min() >= 0 and tiny_policy.decode(x).max() <= 1


def test_cfg_is_the_guided_combination(tiny_policy):
    cond = tiny_policy.encode_prompts(["a red circle", "three squares"])
    x = torch.randn(2, 3, 32, 32)
    v_c = tiny_policy.velocity(x, 0.5, cond, 1.0)
    null = type(cond)(cond.prompts, cond.null_tensors, cond.null_tensors)
    v_u = tiny_policy.velocity(x, 0.5, null, 1.0)
    assert torch.allclose(tiny_policy.velocity(x, 0.5, cond, 4.5), v_u + 4.5 * (v_c - v_u), atol=1e-5)


def test_tokenizer_rejects_words_outside_the_vocabulary(tiny_policy):
    with pytest.raises(PromptError, match="'dog'"):
        tiny_policy.encode_prompts(["a dog"])


def test_checkpoint_round_trip(tmp_path, tiny_config):
    policy = make_policy(tiny_config)
    save_tiny_dit(policy.module, tmp_path / "m.safetensors", step="7")
    loaded = load_tiny_dit(tmp_path / "m.safetensors")
    assert loaded.config == tiny_config
    for (k, a), (_, b) in zip(policy.module.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_without_the_pooled_prompt_the_prompt_reaches_the_image_only_through_attention(tmp_path, tiny_config):
    import dataclasses
    import json

    config = dataclasses.replace(tiny_config, pooled_prompt=False)
    policy = make_policy(config)
    assert policy.module.pooled_proj is None
    assert not any(k.startswith("pooled_proj") for k in policy.module.state_dict())
    model, x, sigma = policy.module, torch.randn(2, 3, 32, 32), torch.rand(2)
    tokens = ShapesTokenizer(config.vocabulary, config.max_prompt_tokens)(["a red circle", "three squares"])
    encode = model.encode_text
    with torch.no_grad():
        v = model(x, sigma, tokens)
        model.encode_text = lambda t: (encode(t)[0], torch.randn(t.shape[0], config.dim))  # any pooled vector
        assert torch.equal(model(x, sigma, tokens), v)
        model.encode_text = lambda t: (torch.zeros_like(encode(t)[0]), encode(t)[1])  # the tokens still matter
        assert not torch.allclose(model(x, sigma, tokens), v, atol=1e-4)
    del model.encode_text
    save_tiny_dit(model, tmp_path / "m.safetensors")
    assert load_tiny_dit(tmp_path / "m.safetensors").config.pooled_prompt is False
    # A config written before the option existed (the pooled base's) keeps it.
    legacy = {key: val for key, val in json.loads(tiny_config.to_json()).items() if key != "pooled_prompt"}
    assert TinyDiTConfig.from_json(json.dumps(legacy)).pooled_prompt is True


def test_a_masked_prompt_reads_as_if_it_had_no_padding(tmp_path, tiny_config):
    import dataclasses
    import json

    config = dataclasses.replace(tiny_config, mask_padding=True)
    model = make_policy(config).module
    tokenizer = ShapesTokenizer(config.vocabulary, config.max_prompt_tokens)
    prompts = ["a circle", "a red circle left of a blue square", ""]
    tokens, x, sigma = tokenizer(prompts), torch.randn(3, 3, 32, 32), torch.rand(3)
    with torch.no_grad():
        v = model(x, sigma, tokens)
        assert torch.isfinite(v).all()  # the null prompt (all padding) keeps its first position
        for i, prompt in enumerate(prompts):
            length = max(1, len(prompt.split()))  # the same prompt cut to its words: no padding at all
            trimmed = model(x[i : i + 1], sigma[i : i + 1], tokens[i : i + 1, :length])
            torch.testing.assert_close(trimmed, v[i : i + 1], atol=1e-5, rtol=1e-5)
        # Without the mask the padding is attended: the same weights give another velocity for "a circle".
        model.config = tiny_config
        assert not torch.allclose(model(x[:1], sigma[:1], tokens[:1]), v[:1], atol=1e-4)
    model.config = config
    save_tiny_dit(model, tmp_path / "m.safetensors")
    assert load_tiny_dit(tmp_path / "m.safetensors").config.mask_padding is True
    legacy = {key: val for key, val in json.loads(tiny_config.to_json()).items() if key != "mask_padding"}
    assert TinyDiTConfig.from_json(json.dumps(legacy)).mask_padding is False  # as the pooled base did


def test_corrupt_missing_and_mismatched_checkpoints(tmp_path, tiny_config):
    with pytest.raises(FileNotFoundError):
        load_tiny_dit(tmp_path / "nope.safetensors")
    good = tmp_path / "m.safetensors"
    save_tiny_dit(make_policy(tiny_config).module, good)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_tiny_dit(truncated)
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_tiny_dit(garbage)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(good))
    tensors.pop("final_linear.bias")
    mismatched = tmp_path / "x.safetensors"
    save_file(tensors, str(mismatched), metadata={"format": "rewardflow-tiny-dit", "config": tiny_config.to_json()})
    with pytest.raises(ValueError, match="does not match its own config"):
        load_tiny_dit(mismatched)
    save_file(tensors, str(mismatched), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="format"):
        load_tiny_dit(mismatched)


def test_lora_starts_as_identity_and_can_be_disabled(tiny_config):
    policy = make_policy(tiny_config)
    cond = policy.encode_prompts(["a circle"])
    x = torch.randn(1, 3, 32, 32)
    before = policy.velocity(x, 0.3, cond)
    add_lora(policy.module, rank=2, alpha=4, target_modules=["qkv", "proj", "fc1", "fc2"])
    lora_policy = TinyDiTPolicy(policy.module)
    assert torch.allclose(lora_policy.velocity(x, 0.3, cond), before, atol=1e-6)
    with torch.no_grad():
        for n, p in policy.module.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    assert not torch.allclose(lora_policy.velocity(x, 0.3, cond), before, atol=1e-4)
    with lora_policy.reference():
        assert torch.allclose(lora_policy.velocity(x, 0.3, cond), before, atol=1e-6)
    with pytest.raises(ValueError, match="no LoRA"):
        with adapters_disabled(torch.nn.Linear(2, 2)):
            pass


def test_shipped_base_checkpoint_loads():
    policy = load_policy("base")
    assert 1_000_000 <= sum(p.numel() for p in policy.module.parameters()) <= 5_000_000
    # The shipped base: the prompt reaches the image through attention alone, padding hidden.
    assert policy.module.pooled_proj is None and policy.module.config.mask_padding
    from rewardflow.shapes.tiny_dit import resolve_checkpoint

    assert resolve_checkpoint("base").stat().st_size <= 20 * 1024 * 1024
