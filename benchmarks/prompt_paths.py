"""Which of the tiny DiT's two prompt paths decides what it draws: the pooled prompt or the prompt tokens.

The tiny DiT sees a prompt twice: its encoded tokens join the image tokens in every block's attention, and their
mean (the pooled prompt) is added to the noise-level embedding that modulates every image token alike (adaLN).
This samples a checkpoint on a few prompts three ways: as it is; with the pooled prompt taken from another prompt
(the tokens kept); and with the pooled path cut (zeros in place of the pooled prompt). Each case is judged, and the
detected shapes, colours and objects per image are counted. If the shapes follow the pooled prompt, the model
draws the *mean* of a two-object prompt's words on every object: a circle and a square come out as two rounded
blobs between the two (docs/pretraining.md, "The pooled prompt decides the shapes").

The shipped base has no pooled path (it refuses); the table in docs/pretraining.md measured the pooled base shipped
before it, which git keeps:

    git show 691057f:rewardflow/assets/tiny_dit_shapes.safetensors > /tmp/pooled_base.safetensors
    python benchmarks/prompt_paths.py --checkpoint /tmp/pooled_base.safetensors --samples 48 --out prompt_paths.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections import Counter
from pathlib import Path

import torch

from rewardflow.evaluate import EvalConfig, generate
from rewardflow.shapes.grammar import parse_prompt
from rewardflow.shapes.judge import judge_images
from rewardflow.shapes.tiny_dit import TinyDiT, load_policy

# (prompt drawn, prompt whose pooled vector replaces its own; None: its own; "": the pooled path cut)
CASES = (
    ("a circle and a square", None),
    ("a circle and a square", "a square"),
    ("a circle and a square", "a circle"),
    ("a circle and a square", ""),
    ("a square", None),
    ("a square", "a circle and a square"),
    ("a square", ""),
    ("a red triangle", None),
    ("a red triangle", "a blue circle"),
    ("a red triangle", ""),
    ("three squares", None),
    ("three squares", "a square"),
    ("three squares", ""),
)


@contextlib.contextmanager
def pooled_from(model: TinyDiT, tokens: torch.Tensor | None):
    """Inside, ``model`` uses the pooled vector of ``tokens`` [1, L] for every non-empty prompt (zeros for None).

    The CFG branch (the empty prompt) keeps its own pooled vector, so guidance still contrasts with the null prompt.

    Raises:
        ValueError: the model has no pooled path (``pooled_prompt=False``), so a swap would measure nothing.
    """
    if not model.config.pooled_prompt:
        raise ValueError("this tiny DiT has no pooled prompt path (config pooled_prompt=False): nothing to swap")
    original = model.encode_text

    def encode_text(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, pooled = original(t)
        other = torch.zeros_like(pooled) if tokens is None else original(tokens.to(t.device))[1].expand_as(pooled)
        return h, torch.where((t != 0).any(1, keepdim=True), other.to(pooled.dtype), pooled)

    model.encode_text = encode_text
    try:
        yield
    finally:
        del model.encode_text  # back to the class's method


def measure(checkpoint: str, samples: int, cases=CASES) -> list[dict]:
    policy = load_policy(checkpoint, autocast=True)
    cfg = EvalConfig()
    rows = []
    for prompt, source in cases:
        tokens = policy.tokenizer([source]) if source else None
        swap = contextlib.nullcontext() if source is None else pooled_from(policy.module, tokens)
        with swap:
            images = generate(policy, [prompt] * samples, cfg)
        verdicts = judge_images([parse_prompt(prompt)] * samples, images.numpy())
        objects = [d for v in verdicts for d in v.detections if d.is_object]
        rows.append({
            "prompt": prompt,
            "pooled_from": {None: "itself", "": "cut"}.get(source, source),
            "samples": samples,
            "strict": sum(v.strict for v in verdicts) / samples,
            "objects_per_image": len(objects) / samples,
            "shapes": dict(Counter(d.shape for d in objects).most_common()),
            "colors": dict(Counter(d.color for d in objects).most_common()),
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a tiny-DiT checkpoint file with the pooled prompt path")
    parser.add_argument("--samples", type=int, default=48, help="images per case")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args.checkpoint, args.samples)
    print("| prompt | pooled prompt from | strict | objects / image | shapes | colours |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        shapes = ", ".join(f"{k} {v}" for k, v in r["shapes"].items())
        colors = ", ".join(f"{k} {v}" for k, v in r["colors"].items())
        print(f"| {r['prompt']} | {r['pooled_from']} | {r['strict']:.2f} | {r['objects_per_image']:.2f} | "
              f"{shapes} | {colors} |")  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"checkpoint": args.checkpoint, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
