"""Speed of the shipped tiny DiT's forward and forward + backward, per image, by attention implementation.

The network's attention is :func:`rewardflow.shapes.tiny_dit.attend` (written out, softmax in float32). This
script times it against PyTorch's fused ``F.scaled_dot_product_attention`` (swapped in for the comparison
only) on the same weights and inputs, with and without bfloat16 autocast, at the micro-batch shape of the
Shapes presets (32 rows with CFG = 64 network rows, 76 tokens). Best of ``--repeats`` after two warm-ups. The
bfloat16 rows are skipped on a CPU without native bfloat16 (PyTorch emulates it there, 10x slower) unless
``--autocast bf16`` or ``both`` asks for them. ``--compile`` adds rows for the shipped network run through
``torch.compile`` (``model.compile``); its forward is timed both without gradient and with it, the graph a
trained policy runs in rollouts so that their log-probabilities match training's bitwise. Compiling is not timed.

    python benchmarks/tiny_dit_speed.py --batch 64 --repeats 5 --compile
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import time

import torch
import torch.nn.functional as F

import rewardflow.shapes.tiny_dit as tiny_dit
from rewardflow.models.protocol import native_bf16


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one, else the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.machine()


def per_image_ms(
    net: torch.nn.Module, inputs: tuple, autocast: bool, backward: bool, repeats: int, grad: bool = False
) -> float:
    def once() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.set_grad_enabled(backward or grad):
            out = net(*inputs)
        if backward:
            out.float().square().mean().backward()

    for _ in range(2):
        once()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - start)
    return best * 1000.0 / inputs[0].shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--compile", action="store_true", help="also time the shipped network under torch.compile")
    parser.add_argument(
        "--autocast",
        choices=("auto", "off", "bf16", "both"),
        default="auto",
        help="which rows to time (auto: both where the CPU has native bfloat16, else off)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    net = tiny_dit.load_tiny_dit(tiny_dit.resolve_checkpoint("base"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=gen)
    sigma = torch.rand(args.batch, generator=gen)
    tokens = tiny_dit.ShapesTokenizer(net.config.vocabulary, net.config.max_prompt_tokens)(
        ["a red circle and a blue square"] * args.batch
    )
    shipped = tiny_dit.attend
    implementations = {
        "written out (shipped)": shipped,
        "fused F.scaled_dot_product_attention": F.scaled_dot_product_attention,
    }
    choice = args.autocast
    if choice == "auto":
        choice = "both" if native_bf16("cpu") else "off"
    autocasts = {"off": (False,), "bf16": (True,), "both": (True, False)}[choice]
    print(
        f"{dt.date.today()}, {cpu_name()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, batch {args.batch}, best of {args.repeats}"
    )
    print("| attention | autocast | forward ms / image | forward + backward ms / image |")
    print("|---|---|---|---|")
    try:
        for name, fn in implementations.items():
            tiny_dit.attend = fn
            for autocast in autocasts:
                fwd = per_image_ms(net, (x, sigma, tokens), autocast, False, args.repeats)
                both = per_image_ms(net, (x, sigma, tokens), autocast, True, args.repeats)
                print(f"| {name} | {'bf16' if autocast else 'off'} | {fwd:.2f} | {both:.2f} |")
    finally:
        tiny_dit.attend = shipped
    if args.compile:
        compiled = torch.compile(net)
        for autocast in autocasts:
            fwd = per_image_ms(compiled, (x, sigma, tokens), autocast, False, args.repeats)
            fwd_grad = per_image_ms(compiled, (x, sigma, tokens), autocast, False, args.repeats, grad=True)
            both = per_image_ms(compiled, (x, sigma, tokens), autocast, True, args.repeats)
            print(
                f"| written out, torch.compile | {'bf16' if autocast else 'off'} | {fwd:.2f} "
                f"({fwd_grad:.2f} with gradient) | {both:.2f} |"
            )


if __name__ == "__main__":
    main()
