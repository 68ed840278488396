import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from rewardflow.shapes.tiny_dit import TinyDiT, TinyDiTConfig, TinyDiTPolicy, save_tiny_dit  # noqa: E402

# Under pytest-xdist (``make test`` runs two workers) each worker takes one core; alone, a run takes up to two.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // WORKERS))


@pytest.fixture
def tiny_config() -> TinyDiTConfig:
    return TinyDiTConfig(dim=32, depth=2, heads=2, text_depth=1)


def make_module(config: TinyDiTConfig, seed: int = 0) -> TinyDiT:
    """A random tiny DiT whose output layers are randomised too (zero-init would make v constant)."""
    torch.manual_seed(seed)
    model = TinyDiT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name or "final_linear" in name:
                p.normal_(0, 0.05)
    return model


def make_policy(config: TinyDiTConfig, seed: int = 0) -> TinyDiTPolicy:
    """A full fine-tune of :func:`make_module` with a frozen reference copy."""
    model = make_module(config, seed)
    ref = TinyDiT(config)
    ref.load_state_dict(model.state_dict())
    ref.requires_grad_(False)
    return TinyDiTPolicy(model, reference=ref)


@pytest.fixture
def tiny_policy(tiny_config: TinyDiTConfig) -> TinyDiTPolicy:
    return make_policy(tiny_config)


EVAL_PROMPTS = "a circle\na red square\ntwo triangles\na circle left of a square\na circle and a square\n"


@pytest.fixture
def tiny_run_args(tmp_path, tiny_config):
    ckpt = tmp_path / "tiny.safetensors"
    save_tiny_dit(make_policy(tiny_config).module, ckpt)
    prompts = tmp_path / "eval.txt"
    prompts.write_text(EVAL_PROMPTS)
    return [
        "--model.checkpoint", str(ckpt),
        "--eval.prompts", str(prompts),
        "--eval.num-steps", "2",
        "--eval.samples-per-prompt", "2",
    ]  # fmt: skip


class Brightness:
    """A differentiable toy reward behind the reward protocol: the mean pixel value of each image in [0, 1]."""

    name = "brightness"
    differentiable = True

    def __call__(self, images, prompts, metadata):
        from rewardflow.types import RewardOutput

        return RewardOutput(scores=images.float().mean(dim=(1, 2, 3)))
