"""The GPU check's measurements: Flow-GRPO rollout and LoRA training through rewardflow against the diffusers
pipeline's own ``__call__``, on the SD3.5-Medium and FLUX.1-dev architectures with random weights.

Per model, on the same architecture, resolution, number of steps, batch and guidance: the pipeline's eager
``__call__`` from prompt embeddings (the baseline), then ``grpo.collect`` (the SDE rollout with log-probs) and
``grpo.train_step`` over it with LoRA r 32 (benchmarks/throughput.py's phases). It writes ``gpu_check.json`` and
``gpu_check.md`` to ``--out``: images/s of each, rollout + training images/s, the rollout / pipeline ratio, MFU
and peak memory. Targets (docs/results.md): SD3.5-M at 512 px, rollout plus LoRA training >= 3.5 images/s per
H100, and the rollout >= 1.7x the eager pipeline.

    bash benchmarks/gpu_check.sh                                   # on a GPU: the tests, then this
    python benchmarks/gpu_check.py --size tiny --device cpu --out /tmp/g   # the CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from throughput import measure, phases

from rewardflow.models.tiny_diffusers import EMBEDDINGS, random_conditioning, random_pipeline, random_policy


def pipeline_call(pipe, model: str, cond, steps: int, guidance: float, resolution: int):
    """The diffusers pipeline's ``__call__`` on ``cond``'s embeddings, decoded to images as the rollout is (the text
    encoders are not timed)."""
    t = cond.tensors
    kwargs = dict(prompt_embeds=t["embeds"], pooled_prompt_embeds=t["pooled"], num_inference_steps=steps,
                  guidance_scale=guidance, height=resolution, width=resolution, output_type="pt")  # fmt: skip
    if model == "sd3":
        n = cond.null_tensors
        kwargs |= dict(negative_prompt_embeds=n["embeds"], negative_pooled_prompt_embeds=n["pooled"])
    gen = torch.Generator(t["embeds"].device).manual_seed(0)
    return lambda: pipe(generator=gen, **kwargs).images


def check_model(model: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    resolution = args.resolution if args.size == "real" else 32
    pipe = random_pipeline(model, args.size, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    cond = random_conditioning(model, args.size, args.batch, device, dtype)
    guidance = EMBEDDINGS[(model, args.size)][3]
    baseline = pipeline_call(pipe, model, cond, args.steps, guidance, resolution)
    rows = [{"phase": "pipeline", **measure(baseline, args, device)}]
    policy = random_policy(pipe, model, "lora", resolution)  # LoRA goes on after the baseline: a plain pipeline
    for name, fn in phases(policy, "grpo", cond, args.steps, guidance, args.batch):
        rows.append({"phase": name, **measure(fn, args, device)})
    by = {r["phase"]: r for r in rows}
    both = by["rollout"]["seconds"] + by["train"]["seconds"]
    result = {"model": model, "size": args.size, "resolution": resolution, "batch": args.batch, "steps": args.steps,
              "guidance": guidance, "phases": rows, "rollout_plus_train_images_per_s": args.batch / both,
              "rollout_vs_pipeline": by["pipeline"]["seconds"] / by["rollout"]["seconds"]}  # fmt: skip
    print(json.dumps(result), flush=True)
    del policy, pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def table(results: list[dict], header: str) -> list[str]:
    columns = ("model", "px", "batch x steps", "pipeline img/s", "rollout img/s", "train img/s",
               "rollout + train img/s", "rollout / pipeline", "MFU rollout / train", "peak GiB")  # fmt: skip
    lines = [header, "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for r in results:
        by = {p["phase"]: p for p in r["phases"]}
        mfu = " / ".join(f"{by[k]['mfu']:.2f}" for k in ("rollout", "train")) if "mfu" in by["train"] else "-"
        peaks = [p["peak_gib"] for p in r["phases"] if p["peak_gib"] is not None]
        lines.append(
            f"| {r['model']} ({r['size']}) | {r['resolution']} | {r['batch']} x {r['steps']} | "
            f"{by['pipeline']['images_per_s']:.2f} | {by['rollout']['images_per_s']:.2f} | "
            f"{by['train']['images_per_s']:.2f} | {r['rollout_plus_train_images_per_s']:.2f} | "
            f"{r['rollout_vs_pipeline']:.2f}x | {mfu} | {f'{max(peaks):.1f}' if peaks else '-'} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sd3", "flux"], choices=["sd3", "flux"])
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=8, help="images per call (CFG doubles SD3's model batch)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU (H100 bf16 measured: 783.4)")
    parser.add_argument("--out", default="benchmarks/results/gpu_check")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    results = [check_model(m, args, device, dtype) for m in args.models]
    header = (f"GPU check on {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}: Flow-GRPO, LoRA r 32, "
              f"bf16 on CUDA (float32 on a CPU), random weights")  # fmt: skip
    lines = table(results, header)
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"device": name, "torch": torch.__version__, "results": results},
                                                   indent=2))  # fmt: skip
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
