"""Reward throughput: images per second of each offline-runnable reward, in process and through its server.

Every reward scores the same batches of images: Shapes base-model samples (32 x 32) for the Shapes rewards
(``geneval`` with its built-in Shapes detector) and JPEG, rendered text (256 x 64) for OCR. The server is
``rewardflow.rewards.server.RewardServer`` on loopback with ``RemoteReward`` as the client (PNG encoding, HTTP and
JSON included). The preference models (PickScore, CLIPScore, aesthetic, HPS, ImageReward) need their weights
and UnifiedReward its VLM server: not offline-runnable here.

    python benchmarks/reward_throughput.py --batch 64 --repeats 3 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from rewardflow.evaluate import EvalConfig, generate
from rewardflow.rewards import REWARDS
from rewardflow.rewards.config import RewardConfig
from rewardflow.rewards.remote import RemoteReward
from rewardflow.rewards.server import RewardServer
from rewardflow.shapes.tiny_dit import load_policy

OFFLINE = ("shapes-judge", "shapes-score", "geneval", "jpeg-compressibility", "ocr")


def shapes_batch(n: int) -> tuple[torch.Tensor, list[str]]:
    prompts = ["a red circle left of a blue square", "three triangles", "a green square", "two white circles"]
    prompts = [prompts[i % len(prompts)] for i in range(n)]
    return generate(load_policy("base", autocast=True), prompts, EvalConfig(num_steps=20)), prompts


def text_batch(n: int) -> tuple[torch.Tensor, list[str]]:
    words = ["OPEN", "hello world", "FRESH BREAD", "rewardflow"]
    images, prompts = [], []
    for i in range(n):
        image = Image.new("RGB", (256, 64), "white")
        ImageDraw.Draw(image).text((10, 16), words[i % 4], fill="black", font=ImageFont.load_default(size=28))
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1))
        prompts.append(f'A sign that says "{words[i % 4]}"')
    return torch.stack(images), prompts


def rate(reward, images: torch.Tensor, prompts: list[str], repeats: int) -> float:
    """Images per second: the median of ``repeats`` timed calls after one warm-up."""
    meta = [{} for _ in prompts]
    reward(images, prompts, meta)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        reward(images, prompts, meta)
        times.append(time.perf_counter() - t0)
    return len(prompts) / sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes, text = shapes_batch(args.batch), text_batch(args.batch)
    rows = []
    for name in OFFLINE:
        reward = REWARDS[name](RewardConfig())
        images, prompts = text if name == "ocr" else shapes
        local = rate(reward, images, prompts, args.repeats)
        server = RewardServer(reward).start()
        try:
            remote = rate(RemoteReward(server.url), images, prompts, args.repeats)
        finally:
            server.stop()
        rows.append({"reward": name, "image": f"{images.shape[-1]}x{images.shape[-2]}", "batch": args.batch,
                     "in_process": local, "server": remote})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    lines = ["| reward | image | in process, images/s | through the server, images/s |", "|---|---|---|---|"]
    lines += [f"| `{r['reward']}` | {r['image']} | {r['in_process']:.1f} | {r['server']:.1f} |" for r in rows]
    print("\n".join(lines))
    if args.out:
        from shapes_grpo import write_results

        write_results(args.out, "reward_throughput", rows, lines)


if __name__ == "__main__":
    main()
