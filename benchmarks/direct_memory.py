"""Memory of one direct-gradient step as the number of sampling steps grows.

For each method and each number of Euler steps, one process loads the shipped base model and runs one
micro-batch of the direct-gradient update (sample, reward, backward). It reports the activation memory the
forward pass keeps for the backward pass (the bytes of every tensor autograd saves, counted once per storage,
through ``torch.autograd.graph.saved_tensors_hooks``), which is what grows with the steps: by one network's
activations per grad-carrying step without checkpointing, by about one latent per step with it (checkpointed
methods also need one call's activations for a moment during the backward pass: the DRaFT-1 row without
checkpointing shows how much). On a GPU it
also reports the peak allocated memory above what was held before the step (``torch.cuda.max_memory_allocated``).

    python benchmarks/direct_memory.py --steps 10 20 40 --batch 16 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time

VARIANTS = {
    "DRaFT full, no checkpointing": ("draft", {"method": "draft", "k": 0, "checkpointing": False}),
    "DRaFT full, checkpointing": ("draft", {"method": "draft", "k": 0, "checkpointing": True}),
    "DRaFT-1": ("draft", {"method": "draft", "k": 1}),
    "DRaFT-1, no checkpointing (= one model call's activations)": (
        "draft",
        {"method": "draft", "k": 1, "checkpointing": False},
    ),
    "DRaFT-LV (n=2)": ("draft", {"method": "draft-lv"}),
    "ReFL": ("draft", {"method": "refl"}),
    "LeapAlign": ("leapalign", {}),
}


class Brightness:
    name = "brightness"
    differentiable = True

    def __call__(self, images, prompts, metadata):
        from rewardflow.types import RewardOutput

        return RewardOutput(scores=images.float().mean(dim=(1, 2, 3)))


def step_memory(policy, algorithm: str, cfg, reward, prompts: list[str], device: str) -> dict:
    """Saved-for-backward bytes (and the GPU peak on CUDA) of one direct-gradient step on ``prompts``.

    ``cfg`` is the algorithm's section (``DraftConfig`` or ``LeapAlignConfig``); the weights do not change
    (learning rate 0). A first, unmeasured step does the lazy initialisation.
    """
    import torch

    from rewardflow.algorithms.direct import direct_train_step
    from rewardflow.algorithms.draft import draft_loss
    from rewardflow.algorithms.leapalign import leapalign_loss

    loss_fn = draft_loss(reward, cfg) if algorithm == "draft" else leapalign_loss(reward, cfg)
    cond = policy.encode_prompts(prompts)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.0)
    gen = torch.Generator().manual_seed(0)
    meta = [{}] * len(prompts)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def measured(*args):  # count what the forward pass saves; the backward runs outside the hooks
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return loss_fn(*args)

    direct_train_step(policy, opt, cond, meta, loss_fn, cfg, generator=gen)  # warm-up: lazy initialisation
    peak_gpu = None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t0 = time.time()
    direct_train_step(policy, opt, cond, meta, measured, cfg, generator=gen)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak_gpu = (torch.cuda.max_memory_allocated() - before) / 2**20
    return {"saved_mib": sum(saved.values()) / 2**20, "peak_gpu_mib": peak_gpu, "seconds": time.time() - t0}


def child(variant: str, steps: int, batch: int, device: str) -> dict:
    import torch

    from rewardflow.algorithms.draft import DraftConfig
    from rewardflow.algorithms.leapalign import LeapAlignConfig
    from rewardflow.shapes.tiny_dit import load_policy

    torch.manual_seed(0)
    policy = load_policy("base", autocast=True, device=device)
    algorithm, kwargs = VARIANTS[variant]
    if algorithm == "draft":
        kw = dict(kwargs)
        if kw.get("k") == 0:
            kw["k"] = steps
        cfg = DraftConfig(num_steps=steps, micro_batch=batch, refl_last=min(5, steps), **kw)
    else:
        cfg = LeapAlignConfig(num_steps=steps, micro_batch=batch)
    prompts = ["a red circle left of a blue square"] * batch
    return {"variant": variant, "steps": steps, **step_memory(policy, algorithm, cfg, Brightness(), prompts, device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.batch, args.device)))
        return
    rows = []
    for variant in VARIANTS:
        for steps in args.steps:
            cmd = [sys.executable, __file__, "--child", variant, str(steps)]
            cmd += ["--batch", str(args.batch), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    from shapes_grpo import machine

    lines = [
        f"### Activation memory of one direct-gradient step ({dt.date.today().isoformat()})",
        "",
        f"- Command: `python benchmarks/direct_memory.py --steps {' '.join(map(str, args.steps))} "
        f"--batch {args.batch} --device {args.device}`",
        f"- Machine: {machine()}; tiny DiT (shipped base), CFG 4.5, bf16 autocast, {args.batch} images",
        "",
        "| method | " + " | ".join(f"{s} steps" for s in args.steps) + " |",
        "|---" * (len(args.steps) + 1) + "|",
    ]
    for variant in VARIANTS:
        cells = [r for r in rows if r["variant"] == variant]
        text = " | ".join(
            f"{r['saved_mib']:.1f} MiB"
            + (f", GPU peak {r['peak_gpu_mib']:.0f} MiB" if r["peak_gpu_mib"] is not None else "")
            + f" ({r['seconds']:.1f} s)"
            for r in cells
        )
        lines.append(f"| {variant} | {text} |")
    from shapes_grpo import write_results

    write_results(args.out, "direct_memory", rows, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
