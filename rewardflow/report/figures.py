"""The run report's plots: matplotlib figures drawn on the Agg canvas and returned as PNG ``data:`` URIs."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

from rewardflow.report.hacking import is_finite_number

# ----------------------------------------------------------------------------------------------------------------
# Plots


COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def png_uri(data: bytes) -> str:
    """``data`` (PNG bytes) as a ``data:`` URI to embed in the page."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _fig_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return png_uri(buf.getvalue())


def _style(ax: Any, title: str, ylim: tuple[float, float] | None = None, legend: bool = True) -> None:
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    ax.set_xlabel("iteration", fontsize=8)
    if ylim:
        ax.set_ylim(*ylim)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    handles = ax.get_legend_handles_labels()[0]
    if legend and len(handles) > 4:  # many lines: the legend goes under the plot, where it hides nothing
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    elif legend and handles:
        ax.legend(fontsize=7, loc="best")


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        good = [a for a in acc if is_finite_number(a)]
        out.append(sum(good) / len(good) if good else math.nan)
    return out


def reward_plot(train: list[dict[str, Any]]) -> str:
    """The training reward per iteration (mean, its spread, a moving average, the components); a data URI."""
    its = [t["iteration"] for t in train]
    reward = [_num(t.get("reward")) for t in train]
    fig = _figure(11, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    marker = "o" if len(its) < 30 else None
    std = [_num(t.get("reward_std")) for t in train]
    if any(is_finite_number(s) for s in std):
        lo = [r - s if is_finite_number(s) else r for r, s in zip(reward, std)]
        hi = [r + s if is_finite_number(s) else r for r, s in zip(reward, std)]
        ax.fill_between(its, lo, hi, color=COLORS[0], alpha=0.12, lw=0, label="reward ± std over the batch")
    ax.plot(its, reward, color=COLORS[0], lw=1, marker=marker, ms=3, alpha=0.6, label="reward (batch mean)")
    window = max(1, len(its) // 10)
    names = [k for k in _keys(train) if k.startswith("reward/")]
    for i, k in enumerate(names):  # components smoothed like the mean when there are many iterations
        values = [_num(t.get(k)) for t in train]
        label = k if window == 1 else f"{k} (moving average)"
        color = COLORS[(i + 1) % len(COLORS)]
        ax.plot(its, _smooth(values, window), color=color, lw=1.3, marker=marker, ms=3, label=label)
    if window > 1:
        ax.plot(
            its, _smooth(reward, window), color=COLORS[0], lw=2.4, zorder=4, label=f"moving average ({window} it.)"
        )
    q = max(1, len(its) // 4)
    if len(its) >= 2:  # the two means the hacking rule compares
        for part, label, style in ((slice(None, q), "first", "--"), (slice(-q, None), "last", ":")):
            vals = [r for r in reward[part] if is_finite_number(r)]
            if vals:
                mean = sum(vals) / len(vals)
                x0, x1 = its[part][0] - 0.3, its[part][-1] + 0.3
                ax.hlines(
                    mean, x0, x1, colors="#111", linestyles=style, lw=2, zorder=5, label=f"{label} quarter: {mean:.3f}"
                )
    _style(ax, "training reward")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return _fig_uri(fig)


Series = list[tuple[str, list[int], list[float]]]


def _panels(
    panels: list[tuple[str, Series, tuple[float, float] | None]], columns: int, size: tuple[float, float]
) -> str:
    rows = (len(panels) + columns - 1) // columns
    cols = min(columns, len(panels))
    fig = _figure(size[0] * cols, size[1] * rows)
    for n, (title, series, ylim) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, n + 1)
        for i, (label, xs, ys) in enumerate(series):
            marker = "o" if len(xs) < 30 else None
            ax.plot(xs, ys, color=COLORS[i % len(COLORS)], lw=1.3, marker=marker, ms=3, label=label)
        _style(ax, title, ylim, legend=len(series) > 1)
    fig.tight_layout()
    return _fig_uri(fig)


def eval_plots(evals: list[dict[str, Any]]) -> str:
    """Held-out scores against iteration: strict / clean, per category, each evaluation reward, diversity."""
    its = [e["iteration"] for e in evals]
    panels: list[tuple[str, Series, tuple[float, float] | None]] = []

    def series(key: str, label: str) -> tuple[str, list[int], list[float]] | None:
        pts = [(e["iteration"], _num(e.get(key))) for e in evals if is_finite_number(e.get(key))]
        return (label, [p[0] for p in pts], [p[1] for p in pts]) if pts else None

    head = [
        s
        for s in (
            series("eval/overall", "strict (overall)"),
            series("eval/clean_overall", "clean (overall)"),
            series("eval/held_out_strict", "strict, held-out prompts"),
            series("eval/seen_strict", "strict, seen prompts"),
        )
        if s
    ]
    if head:
        panels.append(("accuracy", head, (0, 1)))
    for key, title in (
        ("eval/categories", "strict accuracy per category"),
        ("eval/clean_categories", "clean accuracy per category"),
    ):
        cats = list(dict.fromkeys(c for e in evals for c in (e.get(key) or {})))
        if cats:
            cat_series = [(c, its, [_num((e.get(key) or {}).get(c)) for e in evals]) for c in cats]
            panels.append((title, cat_series, (0, 1)))
    names = list(dict.fromkeys(n for e in evals for n in (e.get("eval/rewards") or {})))
    for name in names:
        panels.append(
            (
                f"eval reward: {name}",
                [(name, its, [_num((e.get("eval/rewards") or {}).get(name)) for e in evals])],
                None,
            )
        )
    # Every other number of the reports (mean judge score, diversity, drift from the base, fields added later).
    for key in _keys(evals):
        if not key.startswith("eval/") or key[5:] in EVAL_SHOWN:
            continue
        pts = [(e["iteration"], _num(e[key])) for e in evals if is_finite_number(e.get(key))]
        if key == "eval/drift" and evals and evals[0]["iteration"] not in {p[0] for p in pts}:
            pts.insert(0, (evals[0]["iteration"], 0.0))  # the base is at distance 0 from itself
        if pts:
            title = EVAL_TITLES.get(key[5:], key[5:])
            ylim = None
            if key[5:] in FROM_ZERO:  # distances: from 0, so that a 1% change looks like one
                ylim = (0.0, 1.15 * max(max(p[1] for p in pts), 1e-6))
            panels.append((title, [(title, [p[0] for p in pts], [p[1] for p in pts])], ylim))
    return _panels(panels, 3, (3.8, 2.9)) if panels else ""


EVAL_SHOWN = ("overall", "clean_overall", "held_out_strict", "seen_strict", "num_prompts", "samples_per_prompt")
FROM_ZERO = ("diversity", "drift")
EVAL_TITLES = {
    "mean_score": "judge score (mean)",
    "diversity": "diversity (pairwise RMS distance)",
    "drift": "drift from the base (RMS distance)",
}
TRAIN_SKIP = ("iteration", "reward", "reward_std")


def metric_keys(train: list[dict[str, Any]]) -> list[str]:
    """The numeric keys of the iteration records besides the reward (shown on its own): one small plot each."""
    return [
        k
        for k in _keys(train)
        if k not in TRAIN_SKIP and not k.startswith("reward/") and any(is_finite_number(t.get(k)) for t in train)
    ]


def metrics_plot(train: list[dict[str, Any]]) -> str:
    """A grid of small plots, one per numeric metric key found in the iteration records."""
    keys = metric_keys(train)
    if not keys:
        return ""
    its = [t["iteration"] for t in train]
    panels = [(k, [(k, its, [_num(t.get(k)) for t in train])], None) for k in keys]
    return _panels(panels, 4, (2.85, 2.2))


# ----------------------------------------------------------------------------------------------------------------
# Small helpers


def _num(value: Any) -> float:
    return float(value) if is_finite_number(value) else math.nan


def _keys(records: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in records for k in r))
