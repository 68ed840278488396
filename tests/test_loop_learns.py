"""The real training loop learns, for every algorithm family: a few iterations of ``rewardflow train`` with a simple
reward (the images' brightness) raise that reward on the evaluation's fixed noise.

These guard the loop's wiring as a whole (advantages into the update with the right sign, the loss of each method,
the optimizer step, the EMA, the evaluation): a flipped sign anywhere between the reward and the weights makes its
case fail. Small enough for the default tier: a tiny random DiT, 4 prompts x 4 images, a few iterations.
"""

import json

import pytest

from rewardflow.cli import main
from rewardflow.rewards import REWARDS
from tests.conftest import Brightness

COMMON = ["--reward.names", "brightness", "--eval.rewards", "brightness", "--eval.no-judge", "--threads", "1",
          "--prompts-per-iter", "4", "--group-size", "4", "--iterations", "4", "--ema-decay", "0", "--ema-every", "1",
          "--model.no-autocast", "--balance-prompts-by", ""]  # fmt: skip
FAMILIES = {
    "grpo-guard": ["--grpo.guard", "--grpo.micro-batch", "8", "--grpo.num-steps", "4", "--grpo.kl-beta", "0",
                   "--optim.lr", "2e-3", "--grpo.clip-range", "0.2"],
    "dance": ["--grpo.sde-type", "dance", "--grpo.noise-level", "0.7", "--grpo.same-initial-noise",
              "--grpo.timestep-fraction", "0.6", "--grpo.micro-batch", "8", "--grpo.num-steps", "4",
              "--grpo.kl-beta", "0", "--optim.lr", "2e-3", "--grpo.clip-range", "0.2"],
    "nft": ["--algorithm", "nft", "--nft.micro-batch", "8", "--nft.num-steps", "4", "--optim.lr", "2e-3",
            "--nft.old-decay-rate", "0"],
    "draft-lv": ["--algorithm", "draft", "--draft.method", "draft-lv", "--draft.micro-batch", "8",
                 "--draft.num-steps", "4", "--optim.lr", "2e-3"],
    "leapalign": ["--algorithm", "leapalign", "--leapalign.micro-batch", "8", "--leapalign.num-steps", "4",
                  "--optim.lr", "2e-3"],
}  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_few_iterations_of_the_loop_raise_a_simple_reward(family, tmp_path, tiny_run_args, monkeypatch):
    monkeypatch.setitem(REWARDS, "brightness", lambda cfg: Brightness())
    run = tmp_path / "run"
    assert main(["train", "shapes_grpo_smoke", "--run-dir", str(run), *tiny_run_args, *COMMON, *FAMILIES[family]]) == 0
    before = json.loads((run / "eval" / "iter_00000.json").read_text())["rewards"]["brightness"]
    after = json.loads((run / "eval" / "iter_00004.json").read_text())["rewards"]["brightness"]
    assert after > before + 0.01, (before, after)
