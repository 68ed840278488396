"""Run-folder bookkeeping: metrics lines, package version and git commit, plots and image grids."""

from __future__ import annotations

import json
import logging
import math
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON record as a line; a NaN or infinite number is written as ``null`` (bare ``NaN`` is not JSON).

    The report reads ``null`` as a missing point (``rewardflow.report.figures``).
    """
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float, in dicts and lists too, replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def read_jsonl(path: Path, tolerate_cut_last_line: bool = False) -> list[dict[str, Any]]:
    """All records of a JSON-lines file (none if it does not exist).

    ``tolerate_cut_last_line``: drop a last line that does not parse (a process killed while appending).
    """
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if not (tolerate_cut_last_line and i == len(lines) - 1):
                raise
            logging.getLogger(__name__).warning("%s: dropped a last line cut short: %r", path, line[:80])
    return records


def git_commit() -> str:
    """The commit of the source tree this package runs from, or "unknown"."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def setup_file_logging(path: Path) -> logging.Handler:
    """Also write the package's log records to ``path``; returns the handler to remove afterwards."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("rewardflow").addHandler(handler)
    return handler


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8, scale: int = 3) -> None:
    """Save images [N, 3, H, W] in [0, 1] as one PNG grid, upscaled ``scale`` times (nearest)."""
    imgs = (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    n, h, w, _ = imgs.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1, 3), 255, dtype=np.uint8)
    for i, img in enumerate(imgs):
        r, c = divmod(i, nrow)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = img
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def plot_curves(metrics: list[dict[str, Any]], path: Path) -> None:
    """Reward per iteration and evaluation accuracies (strict, clean) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [m for m in metrics if "reward" in m]
    evals = [m for m in metrics if "eval/overall" in m]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        ax[0].plot([m["iteration"] for m in train], [m["reward"] for m in train], lw=1, label="reward (mean)")
        for key in ("strict", "judge/strict"):  # the judge's pass rate, as the reward or as a monitor
            if key in train[0]:
                ax[0].plot([m["iteration"] for m in train], [m[key] for m in train], lw=1, label=f"{key} (rollouts)")
    ax[0].set_xlabel("iteration")
    if evals:
        its = [m["iteration"] for m in evals]
        ax[1].plot(its, [m["eval/overall"] for m in evals], "o-", label="eval strict")
        ax[1].plot(its, [m["eval/clean_overall"] for m in evals], "s-", label="eval clean")
    ax[1].set_xlabel("iteration")
    ax[1].set_ylim(0, 1)
    for a in ax:
        if a.get_legend_handles_labels()[0]:  # (no judged evaluations: nothing to label)
            a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
