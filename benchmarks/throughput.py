"""Throughput of the training algorithms on the real SD3.5-Medium and FLUX.1-dev architectures (random weights).

No download: the transformer and VAE are built from their published configs on the meta device, materialised
on the target device in bf16 and filled with random values (speed does not depend on the values); the text
encoders are tiny stand-ins, and the prompt embeddings random tensors of the real shapes (333 x 4096 tokens for
SD3.5 with a 256-token T5, 512 x 4096 for FLUX), since the encoders run once per prompt and are not part of an
algorithm's cost. Everything runs through the library's own code: the adapters, ``grpo.collect`` /
``train_step``, ``nft.collect`` / ``train_step`` and ``direct_train_step``.

Per model, fine-tuning mode (LoRA r=32; LoRA with rollouts on merged weights, ``model.merge_lora_rollouts``; or
full) and algorithm it reports rollout and training images/s, the peak GPU memory, the FLOPs of each phase
counted by ``torch.utils.flop_counter`` on one untimed run, the model FLOP utilisation against ``--peak-tflops``
and the ratio of the measured time to that FLOP floor (docs/results.md has the numbers;
../shared/reference/gpu-roofline.md the floor's derivation).

    python benchmarks/throughput.py --size real --device cuda --batch 8 --out benchmarks/results
    python benchmarks/throughput.py --size tiny --device cpu --batch 2 --steps 3   # the CI smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from rewardflow.algorithms import grpo, nft
from rewardflow.algorithms.direct import direct_train_step
from rewardflow.algorithms.draft import DraftConfig, draft_loss
from rewardflow.algorithms.grpo import GRPOConfig
from rewardflow.algorithms.nft import NFTConfig
from rewardflow.models.protocol import Conditioning
from rewardflow.models.tiny_diffusers import EMBEDDINGS, random_conditioning, random_pipeline, random_policy
from rewardflow.types import RewardOutput


class MeanPixel:
    """A differentiable stand-in reward (the direct-gradient step's cost without a reward model's)."""

    name = "mean-pixel"
    differentiable = True

    def __call__(self, images, prompts, metadata):
        return RewardOutput(scores=images.float().mean(dim=(1, 2, 3)))


def timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def phases(policy, algorithm: str, cond: Conditioning, steps: int, guidance: float, batch: int):
    """(name, callable) pairs of one iteration of ``algorithm``: rollout then training."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-6)
    adv = torch.linspace(-1, 1, batch)
    if algorithm == "grpo":
        cfg = GRPOConfig(num_steps=steps, micro_batch=batch, optimizer_steps=1, guidance_scale=guidance,
                         kl_beta=0.04)  # fmt: skip
        state = {}

        def rollout():
            state["batch"] = grpo.collect(policy, cond, cfg, gen)
            return policy.decode(state["batch"].xs[:, -1])

        return [
            ("rollout", torch.no_grad()(rollout)),
            ("train", lambda: grpo.train_step(policy, opt, state["batch"], adv, cfg)),
        ]
    if algorithm == "nft":
        policy.init_old()
        cfg = NFTConfig(num_steps=steps, micro_batch=batch, optimizer_steps=1)
        state = {}

        def rollout():
            state["batch"] = nft.collect(policy, cond, cfg, gen)
            return policy.decode(state["batch"].x0)

        r = (adv + 1) / 2
        return [
            ("rollout", torch.no_grad()(rollout)),
            ("train", lambda: nft.train_step(policy, opt, state["batch"], r, cfg)),
        ]
    cfg = DraftConfig(num_steps=steps, micro_batch=batch, k=1, guidance_scale=guidance)
    loss_fn = draft_loss(MeanPixel(), cfg)
    return [("sample+train", lambda: direct_train_step(policy, opt, cond, [{}] * batch, loss_fn, cfg, generator=gen))]


def run(model, size, mode, algorithm, args, device, dtype) -> list[dict]:
    pipe = random_pipeline(model, size, device, dtype)
    policy = random_policy(
        pipe, model, "full" if mode == "full" else "lora", args.resolution if size == "real" else 32
    )
    policy.weights.merge_lora = mode == "lora-merged"  # rollouts with the adapter folded into the weights
    cond = random_conditioning(model, size, args.batch, device, dtype)
    guidance = EMBEDDINGS[(model, size)][3]
    out = []
    for name, fn in phases(policy, algorithm, cond, args.steps, guidance, args.batch):
        row = {"model": model, "size": size, "mode": mode, "algorithm": algorithm, "phase": name,
               "batch": args.batch, "steps": args.steps, **measure(fn, args, device)}  # fmt: skip
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def measure(fn, args, device: torch.device) -> dict:
    """``args.warmup`` untimed calls, one with the FLOP counter, then the median of ``args.repeats`` timed ones:
    seconds, images/s (``args.batch`` a call), GFLOP, peak GPU memory, and with ``args.peak_tflops`` the MFU and the
    ratio of the time to the FLOP floor."""
    for _ in range(args.warmup):
        fn()
    with FlopCounterMode(display=False) as counter:
        fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = sorted(timed(fn, device)[0] for _ in range(args.repeats))[args.repeats // 2]
    flops = counter.get_total_flops()
    row = {"seconds": seconds, "images_per_s": args.batch / seconds, "gflop": flops / 1e9,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}  # fmt: skip
    if args.peak_tflops:
        row["mfu"] = flops / seconds / (args.peak_tflops * 1e12)
        row["floor_ratio"] = seconds / (flops / (args.peak_tflops * 1e12))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sd3", "flux"], choices=["sd3", "flux"])
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    modes = ["lora", "lora-merged", "full"]
    parser.add_argument("--modes", nargs="+", default=modes, choices=modes)
    parser.add_argument("--algorithms", nargs="+", default=["grpo", "nft", "draft"], choices=["grpo", "nft", "draft"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=8, help="images per micro-batch (CFG doubles the model batch)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU (H100 bf16 measured: 783.4)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for model in args.models:
        for mode in args.modes:
            for algorithm in args.algorithms:
                rows += run(model, args.size, mode, algorithm, args, device, dtype)
    head = "| model | mode | algorithm | phase | images/s | GFLOP / call | MFU | x floor | peak GiB |"
    lines = [head, "|---" * 9 + "|"]
    for r in rows:
        mfu = f"{r['mfu']:.2f}" if "mfu" in r else "-"
        floor = f"{r['floor_ratio']:.1f}" if "floor_ratio" in r else "-"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {r['model']} | {r['mode']} | {r['algorithm']} | {r['phase']} | {r['images_per_s']:.2f} | "
                     f"{r['gflop']:.1f} | {mfu} | {floor} | {peak} |")  # fmt: skip
    print("\n".join(lines))
    if args.out:
        from shapes_grpo import write_results

        write_results(args.out, "throughput", rows, lines)


if __name__ == "__main__":
    main()
