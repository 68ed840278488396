"""Run under torchrun by tests/test_distributed_eval.py: every rank evaluates its share, rank 0 writes the result."""

import json
import sys

import torch
from safetensors.torch import save_file

from rewardflow.evaluate import evaluate
from rewardflow.shapes.tiny_dit import load_policy
from rewardflow.utils import distributed
from tests.test_distributed_eval import eval_config


def main(out: str, rows: int = 0) -> None:
    torch.set_num_threads(1)
    world = distributed.init("cpu")
    policy = load_policy("base", autocast=False)
    report, images = evaluate(policy, eval_config(rows), world=world)
    if world.main:
        with open(out, "w") as f:
            json.dump({"report": report, "world": world.size}, f)
        save_file({"pooled": images.pooled, "samples": images.samples}, out + ".safetensors")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
