"""HPS v2.1 and ImageReward: tiny random models written in the published checkpoints' layouts, converted with our
converters, loaded through the registry and compared with a direct computation on the original modules."""

import pytest
import torch
import torch.nn.functional as F

from rewardflow.models.tiny_diffusers import clip_tokenizer
from rewardflow.rewards import build_reward, differentiable_rewards
from rewardflow.rewards.config import RewardConfig
from rewardflow.rewards.hps import convert_open_clip_checkpoint, vit_h_14_config
from rewardflow.rewards.imagereward import IMAGEREWARD_HEAD, convert_imagereward_checkpoint, imagereward_blip_config

PROMPTS = ["a red cube", "two dogs on a cat"]
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's score normalisation

# ---------------------------------------------------------------- HPS v2.1 (open_clip -> transformers CLIP)


def tiny_clip_config():
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_hidden_layers=2, max_position_embeddings=77, hidden_act="gelu", projection_dim=16,
                          bos_token_id=512, eos_token_id=513, pad_token_id=0)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_attention_heads=2, num_hidden_layers=2,
                              image_size=24, patch_size=8, hidden_act="gelu", projection_dim=16)  # fmt: skip
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)


def to_open_clip(model) -> dict[str, torch.Tensor]:
    """A transformers CLIPModel's weights under open_clip's names (fused q/k/v, ``x @ proj`` projections)."""
    sd = model.state_dict()
    out = {
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.proj": sd["visual_projection.weight"].t(),
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "text_projection": sd["text_projection.weight"].t(),
        "logit_scale": sd["logit_scale"],
    }
    for kind in ("weight", "bias"):
        out[f"visual.ln_pre.{kind}"] = sd[f"vision_model.pre_layrnorm.{kind}"]
        out[f"visual.ln_post.{kind}"] = sd[f"vision_model.post_layernorm.{kind}"]
        out[f"ln_final.{kind}"] = sd[f"text_model.final_layer_norm.{kind}"]
    towers = [("visual.transformer", "vision_model", model.config.vision_config.num_hidden_layers),
              ("transformer", "text_model", model.config.text_config.num_hidden_layers)]  # fmt: skip
    for src, dst, layers in towers:
        for i in range(layers):
            s, d = f"{src}.resblocks.{i}", f"{dst}.encoder.layers.{i}"
            for kind in ("weight", "bias"):
                qkv = [sd[f"{d}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[f"{s}.attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
                out[f"{s}.ln_1.{kind}"] = sd[f"{d}.layer_norm1.{kind}"]
                out[f"{s}.attn.out_proj.{kind}"] = sd[f"{d}.self_attn.out_proj.{kind}"]
                out[f"{s}.ln_2.{kind}"] = sd[f"{d}.layer_norm2.{kind}"]
                out[f"{s}.mlp.c_fc.{kind}"] = sd[f"{d}.mlp.fc1.{kind}"]
                out[f"{s}.mlp.c_proj.{kind}"] = sd[f"{d}.mlp.fc2.{kind}"]
    return {k: v.clone() for k, v in out.items()}


@pytest.fixture(scope="module")
def hps_case(tmp_path_factory):
    """(original tiny CLIPModel, its open_clip state dict, the converted folder)."""
    from transformers import CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    original = CLIPModel(tiny_clip_config()).eval()
    with torch.no_grad():
        original.logit_scale.fill_(3.0)  # not the init value, so a dropped key would show
    state = to_open_clip(original)
    root = tmp_path_factory.mktemp("hps")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": torch.tensor(3)}, root / "hps.pt")
    # "epoch" beside "state_dict" is ignored: only the state dict is read.
    folder = convert_open_clip_checkpoint(root / "hps.pt", root / "model", tiny_clip_config())
    tok = clip_tokenizer()
    tok.pad_token = tok.convert_ids_to_tokens(0)  # open_clip pads with id 0
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}).save_pretrained(folder)
    return original, state, folder


def open_clip_cosine(model, tokenizer, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """HPSv2's score on images already at the model's size: normalised features, their dot product."""
    with torch.no_grad():
        image = model.get_image_features(pixel_values=(images - CLIP_MEAN) / CLIP_STD).pooler_output
        ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
        hidden = model.text_model(input_ids=ids).last_hidden_state  # causal: padding after EOT changes nothing
        eot = hidden[torch.arange(len(prompts)), ids.argmax(dim=-1)]  # open_clip pools at the largest id
        text = model.text_projection(eot)
    return (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1)


def test_hps_scores_equal_the_open_clip_cosine_and_carry_gradient(hps_case):
    original, _, folder = hps_case
    assert "hps" in differentiable_rewards()
    reward = build_reward(RewardConfig(names=("hps",), hps_model=str(folder)))
    assert reward.differentiable
    hps = reward.rewards[0]
    assert hps.tokenizer.pad_token_id == 0
    images = torch.rand(2, 3, 24, 24, requires_grad=True)  # at the model's size: resize and crop are identities
    scores = reward(images, PROMPTS, [{}, {}]).scores
    expected = open_clip_cosine(original, hps.tokenizer, images.detach(), PROMPTS)
    assert scores.shape == (2,)
    assert torch.allclose(scores, expected, atol=1e-5), (scores, expected)
    assert torch.equal(hps.model.logit_scale, original.logit_scale)
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    # The Hugging Face ViT-H-14 tokenizer pads with <|endoftext|> instead of 0: the score must not change.
    hps.tokenizer.pad_token = hps.tokenizer.eos_token
    again = hps(images.detach(), PROMPTS, [{}, {}]).scores
    assert torch.allclose(again, expected, atol=1e-5)
    # Larger, non-square images go through the resize and crop.
    assert hps(torch.rand(2, 3, 30, 40), PROMPTS, [{}, {}]).scores.shape == (2,)


def test_vit_h_14_config_is_open_clips():
    config = vit_h_14_config()
    text, vision = config.text_config, config.vision_config
    assert text.hidden_act == vision.hidden_act == "gelu"
    assert text.eos_token_id == 49407 and text.vocab_size == 49408 and text.max_position_embeddings == 77
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (1024, 24, 16)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1280, 32, 16)
    assert (vision.patch_size, vision.image_size, config.projection_dim) == (14, 224, 1024)
    assert (vision.intermediate_size, text.intermediate_size) == (5120, 4096)
    from transformers import CLIPModel

    from rewardflow.rewards.hps import _open_clip_names

    with torch.device("meta"):  # full size, no memory: every transformers weight has exactly one open_clip source
        model = CLIPModel(config)
    names = _open_clip_names(config)
    targets = [dst for _, dsts in names.values() for dst in dsts]
    assert sorted(targets) == sorted(model.state_dict()) and len(names) == 14 + 12 * (32 + 24)


def test_hps_conversion_refuses_bad_checkpoints(hps_case, tmp_path):
    _, state, _ = hps_case

    def convert(obj, config=None):
        torch.save(obj, tmp_path / "bad.pt")
        return convert_open_clip_checkpoint(tmp_path / "bad.pt", tmp_path / "out", config or tiny_clip_config())

    missing = {k: v for k, v in state.items() if k != "visual.ln_post.bias"}
    with pytest.raises(ValueError, match="no key 'visual.ln_post.bias'"):
        convert({"state_dict": missing})
    with pytest.raises(ValueError, match=r"'transformer.resblocks.0.attn.in_proj_weight' has shape \(32, 32\)"):
        convert({"state_dict": state | {"transformer.resblocks.0.attn.in_proj_weight": torch.zeros(32, 32)}})
    with pytest.raises(ValueError, match=r"'visual.proj' has shape \(16, 24\), the config needs \(24, 16\)"):
        convert({"state_dict": state | {"visual.proj": state["visual.proj"].t()}})  # not transposed
    with pytest.raises(ValueError, match="key 'transformer.resblocks.2.ln_1.weight' is not part"):
        convert({"state_dict": state | {"transformer.resblocks.2.ln_1.weight": torch.ones(32)}})  # a 3rd layer
    with pytest.raises(ValueError, match="not an open_clip state dict"):
        convert([torch.zeros(2)])
    with pytest.raises(ValueError, match="not an open_clip state dict"):
        convert({"state_dict": {"visual.proj": "a string"}})
    legacy = tiny_clip_config()
    legacy.text_config.eos_token_id = 2
    with pytest.raises(ValueError, match="eos_token_id is 2"):
        convert({"state_dict": state}, legacy)
    assert not (tmp_path / "out").exists()  # nothing written on refusal


def test_missing_preference_models_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert_open_clip_checkpoint"):
        build_reward(RewardConfig(names=("hps",)))
    with pytest.raises(FileNotFoundError, match="convert_imagereward_checkpoint"):
        build_reward(RewardConfig(names=("imagereward",), imagereward_model=str(tmp_path)))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="download laion/CLIP-ViT-H-14-laion2B-s32B-b79K --include"):
        build_reward(RewardConfig(names=("hps",), hps_model=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=IMAGEREWARD_HEAD):
        build_reward(RewardConfig(names=("imagereward",), imagereward_model=str(tmp_path)))
    (tmp_path / IMAGEREWARD_HEAD).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="needs the BERT tokenizer"):
        build_reward(RewardConfig(names=("imagereward",), imagereward_model=str(tmp_path)))


# ---------------------------------------------------------------- ImageReward (BLIP -> transformers BLIP)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cube", "two", "dog", "##s", "on", "cat"]


def tiny_blip_config():
    from transformers import BlipConfig

    text = dict(vocab_size=len(VOCAB) + 2, hidden_size=32, encoder_hidden_size=24, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40, hidden_act="gelu",
                layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
                bos_token_id=len(VOCAB), sep_token_id=3)  # fmt: skip
    vision = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6)  # fmt: skip
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=8)


def to_imagereward(model, head) -> dict[str, torch.Tensor]:
    """A transformers BLIP retrieval model and our head under ImageReward.pt's names."""
    sd = model.state_dict()
    v = "vision_model."
    out = {
        "blip.visual_encoder.patch_embed.proj.weight": sd[v + "embeddings.patch_embedding.weight"],
        "blip.visual_encoder.patch_embed.proj.bias": sd[v + "embeddings.patch_embedding.bias"],
        "blip.visual_encoder.cls_token": sd[v + "embeddings.class_embedding"],
        "blip.visual_encoder.pos_embed": sd[v + "embeddings.position_embedding"],
        "blip.visual_encoder.norm.weight": sd[v + "post_layernorm.weight"],
        "blip.visual_encoder.norm.bias": sd[v + "post_layernorm.bias"],
        "blip.text_encoder.embeddings.position_ids": torch.arange(40)[None],  # a buffer the original saves
        "blip.vision_proj.weight": sd["vision_proj.weight"],
        "blip.vision_proj.bias": sd["vision_proj.bias"],
        "blip.text_proj.weight": sd["text_proj.weight"],
        "blip.text_proj.bias": sd["text_proj.bias"],
    }
    parts = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
             "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # fmt: skip
    for i in range(model.config.vision_config.num_hidden_layers):
        for src, dst in parts.items():
            for kind in ("weight", "bias"):
                out[f"blip.visual_encoder.blocks.{i}.{src}.{kind}"] = sd[f"{v}encoder.layers.{i}.{dst}.{kind}"]
    for k, t in sd.items():
        if k.startswith("text_encoder."):
            out["blip." + k] = t
    for i, j in enumerate((0, 2, 4, 6, 7)):
        for kind in ("weight", "bias"):
            out[f"mlp.layers.{j}.{kind}"] = getattr(head[i], kind).detach()
    return {k: t.clone() for k, t in out.items()}


@pytest.fixture(scope="module")
def imagereward_case(tmp_path_factory):
    """(original tiny BLIP retrieval model, original head, ImageReward-layout state dict, converted folder)."""
    from transformers import BertTokenizer, BlipForImageTextRetrieval

    torch.manual_seed(0)
    original = BlipForImageTextRetrieval(tiny_blip_config()).eval()
    head = torch.nn.Sequential(
        *(torch.nn.Linear(a, b) for a, b in [(32, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)])
    )
    with torch.no_grad():
        for name, p in original.named_parameters():  # BERT's init (std 0.02) leaves the text tokens' effect tiny
            if "embedding" in name:
                p.normal_(0, 0.5)
            elif p.ndim == 2:
                p.normal_(0, p.shape[1] ** -0.5)
        for layer in head:  # variance-preserving, so that the five layers do not flatten the score
            layer.weight.normal_(0, layer.in_features**-0.5)
    state = to_imagereward(original, head)
    root = tmp_path_factory.mktemp("imagereward")
    torch.save(state, root / "ImageReward.pt")
    folder = convert_imagereward_checkpoint(root / "ImageReward.pt", root / "model", tiny_blip_config())
    (root / "bert").mkdir()
    (root / "bert" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tok = BertTokenizer.from_pretrained(root / "bert", local_files_only=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})  # as BLIP's init_tokenizer
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.save_pretrained(folder)
    return original, head.eval(), state, folder


def imagereward_direct(original, head, tokenizer, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """ImageReward's score on images already at the model's size, with the original modules."""
    with torch.no_grad():
        embeds = original.vision_model(pixel_values=(images - CLIP_MEAN) / CLIP_STD).last_hidden_state
        tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        assert (tokens["input_ids"][:, 0] == tokenizer.cls_token_id).all()  # ImageReward keeps [CLS] first
        hidden = original.text_encoder(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=embeds,
            encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long),
        ).last_hidden_state
        return ((head(hidden[:, 0]) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).squeeze(-1)


def test_imagereward_scores_equal_the_direct_computation_and_carry_gradient(imagereward_case):
    original, head, _, folder = imagereward_case
    assert "imagereward" in differentiable_rewards()
    reward = build_reward(RewardConfig(names=("imagereward",), imagereward_model=str(folder)))
    assert reward.differentiable
    ir = reward.rewards[0]
    assert ir.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(VOCAB), len(VOCAB) + 1]
    torch.manual_seed(1)
    images = torch.rand(3, 3, 32, 32, requires_grad=True)  # at the model's size: resize and crop are identities
    prompts = [
        *PROMPTS,
        "a red red red red red red red red red red red red red red red red red red red red red red "
        "red red red red red red red red red red red red red red red cube",
    ]  # truncated at 35 tokens
    scores = reward(images, prompts, [{}] * 3).scores
    expected = imagereward_direct(original, head, ir.tokenizer, images.detach(), prompts)
    assert scores.shape == (3,)
    assert torch.allclose(scores, expected, atol=1e-5), (scores, expected)
    assert scores.std() > 1e-2  # the prompts and images matter
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    # Larger, non-square images are resized (shortest side) and centre-cropped to the model's 32 x 32.
    assert ir.preprocess(torch.rand(1, 3, 40, 64)).shape == (1, 3, 32, 32)
    assert ir(torch.rand(2, 3, 40, 64), PROMPTS, [{}, {}]).scores.shape == (2,)


def test_imagereward_config_is_blips():
    config = imagereward_blip_config()
    text, vision = config.text_config, config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.image_size) == (1024, 24, 16, 224)
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (768, 12, 30524)
    assert text.encoder_hidden_size == 1024  # the cross-attention reads the ViT-L tokens
    assert text.num_attention_heads == 12 and vision.num_attention_heads == 16
    assert vision.layer_norm_eps == 1e-6 and text.hidden_act == vision.hidden_act == "gelu"
    from transformers import BlipForImageTextRetrieval

    from rewardflow.rewards.imagereward import _imagereward_names

    with torch.device("meta"):
        model = BlipForImageTextRetrieval(config)
    targets = set(_imagereward_names(model).values())
    unused = {k for k in model.state_dict() if k.startswith(("vision_proj.", "text_proj.", "itm_head."))}
    assert targets == set(model.state_dict()) - unused and len(unused) == 6


def test_imagereward_conversion_refuses_bad_checkpoints(imagereward_case, tmp_path):
    _, _, state, _ = imagereward_case

    def convert(obj):
        torch.save(obj, tmp_path / "bad.pt")
        return convert_imagereward_checkpoint(tmp_path / "bad.pt", tmp_path / "out", tiny_blip_config())

    key = "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"
    with pytest.raises(ValueError, match=f"no key '{key}'"):
        convert({k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="no key 'mlp.layers.7.bias'"):
        convert({k: v for k, v in state.items() if k != "mlp.layers.7.bias"})
    with pytest.raises(ValueError, match=rf"'{key}' has shape \(32, 32\), the config needs \(32, 24\)"):
        convert(state | {key: torch.zeros(32, 32)})
    with pytest.raises(ValueError, match=r"'blip.visual_encoder.pos_embed' has shape \(1, 3, 24\)"):
        convert(state | {"blip.visual_encoder.pos_embed": torch.zeros(1, 3, 24)})
    with pytest.raises(ValueError, match=r"'mlp.layers.6.weight' has shape \(1, 16\), the config needs \(16, 64\)"):
        convert(state | {"mlp.layers.6.weight": state["mlp.layers.7.weight"]})
    with pytest.raises(ValueError, match="key 'blip.visual_encoder.blocks.2.norm1.weight' is not part"):
        convert(state | {"blip.visual_encoder.blocks.2.norm1.weight": torch.ones(24)})  # a 3rd layer
    with pytest.raises(ValueError, match="not an ImageReward state dict"):
        convert({"model": state})  # a wrapped checkpoint
    with pytest.raises(ValueError, match="not an ImageReward state dict"):
        convert(["not", "a", "dict"])
    assert not (tmp_path / "out").exists()
    # Unused keys may be absent: the retrieval model's projections are then zeros.
    slim = {k: v for k, v in state.items() if not k.startswith(("blip.vision_proj", "blip.text_proj"))}
    convert(slim)
    assert (tmp_path / "out" / IMAGEREWARD_HEAD).is_file()
