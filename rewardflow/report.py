"""One self-contained HTML page per training run (``rewardflow report RUN_DIR``).

The page reads only what the training loop leaves in the run folder (``config.yaml``, ``meta.json``,
``metrics.jsonl``, ``eval/iter_*.json``, ``samples/eval_*.png``) and embeds everything it shows: the plots are
PNGs drawn with matplotlib's Agg canvas and the sample grids are the run's own PNGs, all as ``data:`` URIs, so
the file can be mailed, archived or opened offline. Every string that comes from the run folder is HTML-escaped.

:func:`hacking_warnings` is the reward-hacking rule the page shows at its top; docs/report.md explains it.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from rewardflow.utils.logging import read_jsonl

MIN_REWARD_RISE = 0.02
"""Training reward rise (last quarter of iterations minus first quarter, in reward units) that counts as rising."""
MAX_EVAL_DROP = 0.03
"""How far the last evaluation may sit below the best one (accuracy, 0-1) before a rising reward is suspect."""
MAX_DIVERSITY_DROP = 0.15
"""Relative fall of the evaluation's ``diversity`` from the base (iteration 0) that is flagged (0.15: 15%)."""
MAX_COLOUR_SHARE_RISE = 0.15
"""Rise of one colour's share of an evaluation's detected colours over the base's that is flagged (0.15: 15 points)."""

GRID_COLUMNS = 8  # rewardflow.utils.logging.save_grid's default layout of samples/eval_*.png
GRID_PROMPT_STRIDE = 3  # run_eval saves the first sample of every third evaluation prompt
PROMPT_ROWS = 16  # prompts in the per-prompt comparison table, evenly spaced over the grid
PROMPT_COLUMNS = 6  # at most this many checkpoints in that table (the base and the last always among them)


# ----------------------------------------------------------------------------------------------------------------
# The reward-hacking rule (pure functions on metric lists)


def reward_trend(rewards: Sequence[float]) -> float | None:
    """Mean of the last quarter of ``rewards`` minus the mean of the first quarter (None under two values).

    A quarter is at least one value, so two iterations compare the second with the first.
    """
    values = [float(r) for r in rewards if _finite(r)]
    if len(values) < 2:
        return None
    q = max(1, len(values) // 4)
    return sum(values[-q:]) / q - sum(values[:q]) / q


def hacking_warnings(
    train_rewards: Sequence[float],
    evals: Sequence[tuple[int, float]],
    diversity: Sequence[tuple[int, float]] = (),
    colours: Sequence[tuple[int, dict[str, float]]] = (),
    *,
    score_name: str = "eval strict accuracy",
    min_reward_rise: float = MIN_REWARD_RISE,
    max_eval_drop: float = MAX_EVAL_DROP,
    max_diversity_drop: float = MAX_DIVERSITY_DROP,
    max_colour_share_rise: float = MAX_COLOUR_SHARE_RISE,
) -> list[str]:
    """Warnings (plain sentences; empty when nothing is suspect) about reward hacking in a run.

    Rule 1, reward up and held-out score down: the training reward rose, that is :func:`reward_trend` (mean of
    the last quarter of iterations minus the mean of the first quarter) is at least ``min_reward_rise``
    (default 0.02 reward units), while the last evaluation is below the best evaluation by more than
    ``max_eval_drop`` (default 0.03, i.e. 3 accuracy points) or below the base evaluation (the first one,
    iteration 0) at all. It needs at least two training iterations and two evaluations.

    Rule 2, diversity falling: the last evaluation's diversity is lower than the base's by more than
    ``max_diversity_drop`` of it (default 0.15, i.e. a 15% fall). It is checked whatever the reward did, and
    only when the evaluations carry a diversity value.

    Rule 3, palette collapsing: one colour's share of all colours detected in the last evaluation exceeds its
    share in the base's by more than ``max_colour_share_rise`` (default 0.15, i.e. 15 points). GenEval-style
    judges do not score the colour of objects whose colour the prompt leaves free, so a policy may drift there to
    the colours the detector reads best; pixel diversity barely shows it (docs/results.md). Checked only when
    the evaluations carry a colour histogram.

    Args:
        train_rewards: the mean training reward of each iteration, in order.
        evals: ``(iteration, held-out score)`` of each evaluation, in order; the first is the base.
        diversity: ``(iteration, diversity)`` of each evaluation that has one, in order.
        colours: ``(iteration, {colour: detections})`` of each evaluation that has a colour histogram, in order.
        score_name: what the held-out score is, for the sentences.
        min_reward_rise: see rule 1.
        max_eval_drop: see rule 1.
        max_diversity_drop: see rule 2.
        max_colour_share_rise: see rule 3.
    """
    out: list[str] = []
    rise = reward_trend(train_rewards)
    evals = [(int(i), float(v)) for i, v in evals if _finite(v)]
    if rise is not None and rise >= min_reward_rise and len(evals) >= 2:
        (base_it, base), (last_it, last) = evals[0], evals[-1]
        best_it, best = max(evals, key=lambda e: e[1])
        below_best, below_base = best - last > max_eval_drop, last < base
        if below_best or below_base:
            reasons = []
            if below_best:
                reasons.append(f"{best - last:.3f} below its best ({best:.3f} at iteration {best_it})")
            if below_base:
                reasons.append(f"below the base ({base:.3f} at iteration {base_it})")
            out.append(
                f"Possible reward hacking: the training reward rose by {rise:+.3f} (mean of the last quarter of "
                f"iterations against the first quarter) while the held-out {score_name} ended at {last:.3f} "
                f"(iteration {last_it}), " + " and ".join(reasons) + "."
            )
    diversity = [(int(i), float(v)) for i, v in diversity if _finite(v)]
    if len(diversity) >= 2:
        (base_it, base), (last_it, last) = diversity[0], diversity[-1]
        if base > 0 and (base - last) / base > max_diversity_drop:
            out.append(
                f"Diversity is falling: the evaluation samples' diversity went from {base:.3f} (iteration "
                f"{base_it}) to {last:.3f} (iteration {last_it}), {100 * (base - last) / base:.0f}% lower; "
                f"more than {100 * max_diversity_drop:.0f}% suggests the policy is collapsing onto fewer images."
            )
    shares = [(int(i), _shares(h)) for i, h in colours]
    shares = [(i, h) for i, h in shares if h]
    if len(shares) >= 2:
        (base_it, base), (last_it, last) = shares[0], shares[-1]
        colour = max(last, key=lambda c: last[c] - base.get(c, 0.0))
        was, now = base.get(colour, 0.0), last[colour]
        if now - was > max_colour_share_rise:
            out.append(
                f"The palette is collapsing: {colour} went from {100 * was:.0f}% of the detected colours (iteration "
                f"{base_it}) to {100 * now:.0f}% (iteration {last_it}). Prompts that leave the colour free do not "
                "score it, so the policy may be drifting to the colours the judge reads best; look at the samples."
            )
    return out


def _shares(histogram: dict[str, float]) -> dict[str, float]:
    """Each colour's share of a histogram's detections ({} when it has none)."""
    counts = {str(c): float(n) for c, n in histogram.items() if _finite(n) and n >= 0}
    total = sum(counts.values())
    return {c: n / total for c, n in counts.items()} if total > 0 else {}


def warnings_from_metrics(records: Sequence[dict[str, Any]], **thresholds: float) -> list[str]:
    """:func:`hacking_warnings` on the records of a ``metrics.jsonl`` (iteration and evaluation records)."""
    train, evals = split_records(records)
    name, scores = headline_series(evals)
    diversity = [(e["iteration"], v) for e in evals if (v := _scalar(e.get("eval/diversity"))) is not None]
    colours = [(e["iteration"], h["colors"]) for e in evals if isinstance(h := e.get("eval/histogram"), dict)
               and isinstance(h.get("colors"), dict)]  # fmt: skip
    return hacking_warnings(
        [t["reward"] for t in train if "reward" in t], scores, diversity, colours, score_name=name, **thresholds
    )


def split_records(records: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training iteration records, evaluation records), each sorted by iteration."""
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    train = [r for r in records if not any(k.startswith("eval/") for k in r)]
    key = lambda r: r.get("iteration", 0)  # noqa: E731
    return sorted(train, key=key), sorted(evals, key=key)


def headline_series(evals: Sequence[dict[str, Any]]) -> tuple[str, list[tuple[int, float]]]:
    """The held-out score the warning follows: strict accuracy when judged, else the first evaluation reward."""
    if evals and all(_finite(e.get("eval/overall")) for e in evals):
        return "eval strict accuracy", [(e["iteration"], e["eval/overall"]) for e in evals]
    names = [n for e in evals for n in (e.get("eval/rewards") or {})]
    if names:
        name = names[0]
        return f"eval {name}", [
            (e["iteration"], e["eval/rewards"][name])
            for e in evals
            if _finite((e.get("eval/rewards") or {}).get(name))
        ]
    return "eval score", []


# ----------------------------------------------------------------------------------------------------------------
# Reading the run folder


@dataclasses.dataclass
class Run:
    """What the page is made from."""

    path: Path
    config_text: str
    config: dict[str, Any]
    meta: dict[str, Any]
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    reports: dict[int, dict[str, Any]]
    grids: dict[int, Path]
    summary: str


def load_run(run_dir: str | Path) -> Run:
    """Read a run folder. Raises FileNotFoundError when it holds no ``config.yaml``."""
    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{path} is not a run folder (no config.yaml)")
    text = (path / "config.yaml").read_text(encoding="utf-8")
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{path / 'config.yaml'} is not valid YAML: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path / 'config.yaml'} does not hold a mapping")
    summary = ""
    try:
        from rewardflow.config import from_yaml

        summary = from_yaml(text).summary()
    except Exception:  # noqa: BLE001 - a config from another version still gets a page, without the summary
        pass
    meta: dict[str, Any] = {}
    if (path / "meta.json").is_file():
        try:
            meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            meta = {"meta.json": "unreadable"}
    # A run still writing (or killed while writing) may end in a line cut short: read_jsonl drops it.
    records = [r for r in read_jsonl(path / "metrics.jsonl", tolerate_cut_last_line=True)
               if isinstance(r, dict) and isinstance(r.get("iteration"), int)]  # fmt: skip
    train, evals = split_records(records)
    reports = {}
    for f in sorted((path / "eval").glob("iter_*.json")):
        it = _iteration_of(f)
        try:
            reports[it] = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError):
            continue
    grids = {_iteration_of(f): f for f in sorted((path / "samples").glob("eval_*.png"))}
    grids = {k: v for k, v in sorted(grids.items()) if k >= 0}
    return Run(path, text, config, meta, train, evals, reports, grids, summary)


def _iteration_of(path: Path) -> int:
    m = re.search(r"(\d+)$", path.stem)
    return int(m.group(1)) if m else -1


# ----------------------------------------------------------------------------------------------------------------
# Plots


COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _fig_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return _png_uri(buf.getvalue())


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
        good = [a for a in acc if _finite(a)]
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
    if any(_finite(s) for s in std):
        lo = [r - s if _finite(s) else r for r, s in zip(reward, std)]
        hi = [r + s if _finite(s) else r for r, s in zip(reward, std)]
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
            vals = [r for r in reward[part] if _finite(r)]
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
        pts = [(e["iteration"], _num(e.get(key))) for e in evals if _finite(e.get(key))]
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
        pts = [(e["iteration"], e[key]) for e in evals if _finite(e.get(key))]
        if pts:
            title = EVAL_TITLES.get(key[5:], key[5:])
            panels.append((title, [(title, [p[0] for p in pts], [p[1] for p in pts])], None))
    return _panels(panels, 3, (3.8, 2.9)) if panels else ""


EVAL_SHOWN = ("overall", "clean_overall", "held_out_strict", "seen_strict", "num_prompts", "samples_per_prompt")
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
        if k not in TRAIN_SKIP and not k.startswith("reward/") and any(_finite(t.get(k)) for t in train)
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
# Sample grids


def grid_cells(path: Path, columns: int = GRID_COLUMNS) -> list[bytes] | None:
    """The cells of a ``save_grid`` PNG as PNG bytes (blank trailing cells dropped), or None if it is not one."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError):
        return None
    height, width = arr.shape[:2]
    for scale in (3, 1, 2, 4, 5, 6):
        if width % scale or height % scale or (width // scale - 1) % columns:
            continue
        cell = (width // scale - 1) // columns - 1
        if cell < 1 or (height // scale - 1) % (cell + 1):
            continue
        step = (cell + 1) * scale
        border = np.concatenate([arr[:, :scale].reshape(-1, 3), arr[:scale].reshape(-1, 3)])
        if not (border >= 250).all():
            continue
        cells = []
        for r in range((height // scale - 1) // (cell + 1)):
            for c in range(columns):
                y, x = scale + r * step, scale + c * step
                cells.append(arr[y : y + cell * scale, x : x + cell * scale])
        while cells and (cells[-1] >= 250).all():
            cells.pop()
        out = []
        for c in cells:
            buf = io.BytesIO()
            Image.fromarray(c).save(buf, format="PNG")
            out.append(buf.getvalue())
        return out
    return None


def grid_prompts(config: dict[str, Any]) -> list[tuple[str, str]] | None:
    """(prompt, category) of each grid cell, in order, when the run's evaluation prompts can be read."""
    source = (config.get("eval") or {}).get("prompts")
    if not isinstance(source, str):
        return None
    try:
        from rewardflow.data.prompts import load_prompts

        records = load_prompts(source)
    except Exception:  # noqa: BLE001 - a prompt file that moved: the cells are numbered instead
        return None
    return [(r.prompt, str(r.metadata.get("category", ""))) for r in records[::GRID_PROMPT_STRIDE]]


def _spread(items: list[int], n: int) -> list[int]:
    """At most ``n`` of ``items``, evenly spaced, always with the first and the last."""
    if len(items) <= n:
        return items
    picks = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in picks]


# ----------------------------------------------------------------------------------------------------------------
# The page


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's HTML page (default ``RUN_DIR/report.html``); returns its path.

    Raises:
        FileNotFoundError: ``run_dir`` is not a run folder (no ``config.yaml``).
    """
    run = load_run(run_dir)
    target = Path(out) if out is not None else run.path / "report.html"
    page = render(run)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    return target


def render(run: Run) -> str:
    """The whole page as a string."""
    sections = [
        ("overview", "Overview", _overview(run)),
        ("checks", "Reward-hacking checks", _checks(run)),
        ("reward", "Training reward", _reward_section(run)),
        ("eval", "Evaluation", _eval_section(run)),
        ("metrics", "Algorithm metrics", _metrics_section(run)),
        ("samples", "Evaluation samples", _samples_section(run)),
        ("final", "Final evaluation report", _final_section(run)),
        ("config", "Configuration", f"<pre>{_e(run.config_text)}</pre>"),
    ]
    nav = " · ".join(f'<a href="#{sid}">{title}</a>' for sid, title, _ in sections)
    body = "\n".join(
        f'<section id="{sid}">\n<h2>{title}</h2>\n{content}\n</section>' for sid, title, content in sections
    )
    name = _e(run.path.resolve().name)
    return PAGE.format(title=f"rewardflow report: {name}", name=name, nav=nav, body=body, css=CSS, script=SCRIPT)


def _overview(run: Run) -> str:
    cfg = run.config
    model = cfg.get("model") or {}
    reward = cfg.get("reward") or {}
    done = max((t["iteration"] for t in run.train), default=0)
    rows: list[tuple[str, Any]] = [
        ("run folder", str(run.path.resolve())),
        ("algorithm", cfg.get("algorithm", "?")),
        ("setup", run.summary or "(config.yaml is not readable by this version)"),
        ("model", ", ".join(f"{k} {model[k]}" for k in ("kind", "checkpoint", "path", "lora_rank") if model.get(k))),
        ("reward", " + ".join(str(n) for n in reward.get("names") or ()) or "?"),
        ("training prompts", cfg.get("train_prompts", "?")),
        ("evaluation prompts", (cfg.get("eval") or {}).get("prompts", "?")),
        ("iterations done", f"{done} of {cfg.get('iterations', '?')}"),
        ("evaluations", ", ".join(str(e["iteration"]) for e in run.evals) or "none yet"),
    ]
    times = [t["time_iteration"] for t in run.train if _finite(t.get("time_iteration"))]
    if times:
        rows.append(("training time", f"{sum(times) / 60:.1f} min ({sum(times) / len(times):.1f} s per iteration)"))
    rows += [(k, v) for k, v in run.meta.items()]
    rows.append(("report written", datetime.datetime.now().strftime("%Y-%m-%d %H:%M")))
    table = _kv_table(rows)
    cards = []
    if run.evals:
        first, last = run.evals[0], run.evals[-1]
        for key, label in (("eval/overall", "eval strict"), ("eval/clean_overall", "eval clean")):
            if _finite(first.get(key)) and _finite(last.get(key)):
                delta = last[key] - first[key]
                cards.append(
                    f'<div class="card"><div class="label">{label}</div><div class="big">{last[key]:.3f}</div>'
                    f'<div class="{_sign(delta)}">{delta:+.3f} vs iteration {first["iteration"]}</div></div>'
                )
        for name, value in (last.get("eval/rewards") or {}).items():
            base = (first.get("eval/rewards") or {}).get(name)
            if _finite(value):
                diff = f"{value - base:+.3f} vs iteration {first['iteration']}" if _finite(base) else ""
                cards.append(
                    f'<div class="card"><div class="label">eval {_e(name)}</div><div class="big">{value:.3f}</div>'
                    f'<div class="{_sign(value - base if _finite(base) else 0)}">{diff}</div></div>'
                )
    if run.train and _finite(run.train[-1].get("reward")):
        trend = reward_trend([t.get("reward") for t in run.train])
        trend_text = f"{trend:+.3f} last vs first quarter" if trend is not None else ""
        cards.append(
            f'<div class="card"><div class="label">training reward (last it.)</div>'
            f'<div class="big">{run.train[-1]["reward"]:.3f}</div>'
            f'<div class="{_sign(trend or 0)}">{trend_text}</div></div>'
        )
    return f'<div class="cards">{"".join(cards)}</div>\n{table}'


def _checks(run: Run) -> str:
    warnings = warnings_from_metrics(run.train + run.evals)
    rule = (
        f"Rule: warn when the training reward rose by at least {MIN_REWARD_RISE} (mean of the last quarter of "
        f"iterations minus the first quarter) while the last evaluation is more than {MAX_EVAL_DROP} below the "
        f"best one or below the base; when the evaluation diversity (if recorded) fell more than "
        f"{100 * MAX_DIVERSITY_DROP:.0f}% from the base; and when one colour's share of the detected colours (if "
        f"recorded) rose more than {100 * MAX_COLOUR_SHARE_RISE:.0f} points above the base's."
    )
    if warnings:
        items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
        box = f'<div class="warning" role="alert"><strong>Warning</strong><ul>{items}</ul></div>'
        return f'{box}<p class="note">{rule}</p>'
    if len(run.evals) < 2 or len(run.train) < 2:
        state = "Not enough data yet (needs two training iterations and two evaluations)."
    else:
        state = "No sign of reward hacking by this rule."
    has_div = any(_scalar(e.get("eval/diversity")) is not None for e in run.evals)
    extra = "" if has_div else " The evaluation reports carry no diversity field, so diversity is not checked."
    return f'<div class="ok">{state}</div><p class="note">{rule}{extra}</p>'


def _reward_section(run: Run) -> str:
    if not any(_finite(t.get("reward")) for t in run.train):
        return '<p class="empty">No training iterations recorded yet.</p>'
    return _img(reward_plot(run.train), "training reward per iteration", "plot")


def _eval_section(run: Run) -> str:
    if not run.evals:
        return '<p class="empty">No evaluation recorded yet.</p>'
    uri = eval_plots(run.evals)
    return _img(uri, "evaluation scores per iteration", "plot") if uri else '<p class="empty">Nothing numeric.</p>'


def _metrics_section(run: Run) -> str:
    uri = metrics_plot(run.train)
    if not uri:
        return '<p class="empty">No training iterations recorded yet.</p>'
    keys = ", ".join(_e(k) for k in metric_keys(run.train))
    return f'<p class="note">Every numeric field of the iteration records: {keys}.</p>' + _img(
        uri, "training metrics per iteration", "plot"
    )


def _samples_section(run: Run) -> str:
    if not run.grids:
        return '<p class="empty">No evaluation samples (samples/eval_*.png) yet.</p>'
    parts = []
    its = list(run.grids)
    shown = _spread(its, PROMPT_COLUMNS)
    cells = {it: grid_cells(run.grids[it]) for it in shown}
    if all(c for c in cells.values()):
        prompts = grid_prompts(run.config)
        count = min(len(c) for c in cells.values())
        if prompts is not None and len(prompts) < max(len(c) for c in cells.values()):
            prompts = None  # the grid does not match the prompt file as it is now
        picked = _spread(list(range(count)), PROMPT_ROWS)
        cards = []
        for k in picked:
            if prompts:
                text, cat = prompts[k]
                label = f'{_e(text)} <span class="cat">{_e(cat)}</span>'
            else:
                label = f"grid cell {k + 1}"  # the prompt file is not readable from here
            imgs = "".join(
                f'<figure class="pcell"><img class="cell" alt="prompt {k + 1}, iteration {it}" '
                f'src="{_png_uri(cells[it][k])}"><figcaption>{_short_label(it)}</figcaption></figure>'
                for it in shown
            )
            cards.append(f'<div class="pcard"><div class="ptext">{label}</div><div class="prow">{imgs}</div></div>')
        more = "" if len(its) == len(shown) else f"; {len(shown)} of the {len(its)} evaluations, evenly spaced"
        parts.append(
            f"<h3>{len(picked)} of the grid's {count} prompts at each checkpoint{more}</h3>"
            f'<div class="prompts">{"".join(cards)}</div>'
        )
    figures = []
    for it, path in run.grids.items():
        data = path.read_bytes()
        if not data.startswith(b"\x89PNG"):
            figures.append(f"<figure><figcaption>{_iteration_label(it)}: not a PNG</figcaption></figure>")
            continue
        score = next((e for e in run.evals if e["iteration"] == it), {})
        head = f" — strict {score['eval/overall']:.3f}" if _finite(score.get("eval/overall")) else ""
        figures.append(
            f"<figure><figcaption>{_iteration_label(it)}{head}</figcaption>"
            f'<img class="grid" data-eval-grid="{it}" alt="evaluation samples at iteration {it}" '
            f'src="{_png_uri(data)}"></figure>'
        )
    parts.append(
        '<h3>Whole evaluation grids</h3><p class="note">The same evaluation prompts and initial noise at every '
        "checkpoint (one sample of every third prompt of the set, up to 48, read left to right).</p>"
        f'<div class="grids">{"".join(figures)}</div>'
    )
    return "\n".join(parts)


def _final_section(run: Run) -> str:
    if run.reports:
        last_it = max(run.reports)
        last = run.reports[last_it]
    elif run.evals:
        last_it = run.evals[-1]["iteration"]
        last = {k[5:]: v for k, v in run.evals[-1].items() if k.startswith("eval/")}
    else:
        return '<p class="empty">No evaluation report yet.</p>'
    base = run.reports.get(0)
    if base is None and run.evals and run.evals[0]["iteration"] == 0:
        base = {k[5:]: v for k, v in run.evals[0].items() if k.startswith("eval/")}
    out = [f'<p class="note">eval/iter_{last_it:05d}.json, compared with the base (iteration 0).</p>']
    cats = list((last.get("categories") or {}).keys())
    if cats:
        with_base = base is not None and last_it != 0
        head = "<tr><th>category</th><th>strict</th>"
        head += "<th>base strict</th><th>change</th>" if with_base else ""
        head += "<th>clean</th>" + ("<th>base clean</th>" if with_base else "") + "<th>detections / image</th></tr>"
        rows = []
        for cat in [*cats, None]:
            strict = last.get("overall") if cat is None else last["categories"].get(cat)
            clean = last.get("clean_overall") if cat is None else (last.get("clean_categories") or {}).get(cat)
            det = None if cat is None else (last.get("detections_per_image") or {}).get(cat)
            cells = [_e(cat) if cat else "<strong>overall</strong>", _fmt(strict)]
            if with_base:
                bs = base.get("overall") if cat is None else (base.get("categories") or {}).get(cat)
                diff = strict - bs if _finite(strict) and _finite(bs) else None
                cells += [_fmt(bs), f'<span class="{_sign(diff or 0)}">{_fmt(diff, signed=True)}</span>']
            cells.append(_fmt(clean))
            if with_base:
                bc = base.get("clean_overall") if cat is None else (base.get("clean_categories") or {}).get(cat)
                cells.append(_fmt(bc))
            cells.append(_fmt(det))
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        out.append(f'<table class="data">{head}{"".join(rows)}</table>')
    shown = {"overall", "categories", "clean_overall", "clean_categories", "detections_per_image"}
    rest = _flatten({k: v for k, v in last.items() if k not in shown})
    if rest:
        out.append("<h3>Other fields</h3>" + _kv_table(rest))
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------------
# Small helpers


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: Any) -> float:
    return float(value) if _finite(value) else math.nan


def _scalar(value: Any) -> float | None:
    """A number, or the mean of a mapping's numbers (a per-category field), or None."""
    if _finite(value):
        return float(value)
    if isinstance(value, dict):
        nums = [float(v) for v in value.values() if _finite(v)]
        return sum(nums) / len(nums) if nums else None
    return None


def _keys(records: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in records for k in r))


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, signed: bool = False) -> str:
    if not _finite(value):
        return "–" if value is None else _e(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:+.3f}" if signed else f"{value:.3f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def _sign(value: float) -> str:
    return "up" if value > 0 else "down" if value < 0 else "flat"


def _iteration_label(it: int) -> str:
    return "iteration 0 (base)" if it == 0 else f"iteration {it}"


def _short_label(it: int) -> str:
    return "base" if it == 0 else f"it. {it}"


def _img(uri: str, alt: str, cls: str) -> str:
    return f'<img class="{cls}" alt="{_e(alt)}" src="{uri}">'


def _kv_table(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_fmt(v) if _finite(v) else _e(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _flatten(obj: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for k, v in obj.items():
        if isinstance(v, dict) and v and not any(isinstance(x, (dict, list)) for x in v.values()):
            rows.append((f"{prefix}{k}", ", ".join(f"{a} {_fmt(b) if _finite(b) else b}" for a, b in v.items())))
        elif isinstance(v, dict):
            rows += _flatten(v, f"{prefix}{k}.")
        elif isinstance(v, list):
            rows.append((f"{prefix}{k}", ", ".join(str(x) for x in v)))
        else:
            rows.append((f"{prefix}{k}", "–" if v is None else v))
    return rows


CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1d2330;
       background: #f3f4f7; margin: 0; }
header { background: #1d2330; color: #fff; padding: 18px 28px 12px; }
header h1 { margin: 0 0 6px; font-size: 22px; }
header nav a { color: #b9c7ff; text-decoration: none; font-size: 13px; }
main { max-width: 1160px; margin: 0 auto; padding: 8px 20px 40px; }
section { background: #fff; border-radius: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.08); margin: 16px 0;
          padding: 12px 20px 18px; }
h2 { font-size: 17px; margin: 4px 0 10px; border-bottom: 1px solid #e4e6ec; padding-bottom: 6px; }
h3 { font-size: 14px; margin: 14px 0 6px; }
img.plot { max-width: 100%; height: auto; display: block; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin-bottom: 12px; }
.card { border: 1px solid #e4e6ec; border-radius: 6px; padding: 8px 14px; min-width: 150px; }
.card .label { font-size: 12px; color: #5b6275; }
.card .big { font-size: 24px; font-weight: 600; }
.up { color: #137333; } .down { color: #b3261e; } .flat { color: #5b6275; }
table { border-collapse: collapse; }
table.kv th { text-align: left; font-weight: 500; color: #5b6275; padding: 2px 16px 2px 0; vertical-align: top; }
table.kv td { padding: 2px 0; font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12.5px;
              word-break: break-all; }
table.data th, table.data td { border-bottom: 1px solid #e4e6ec; padding: 4px 12px; text-align: right; }
table.data td:first-child, table.data th:first-child { text-align: left; }
.prompts { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 10px; }
.pcard { border: 1px solid #e4e6ec; border-radius: 6px; padding: 6px 8px; }
.ptext { font-size: 12.5px; margin-bottom: 4px; overflow-wrap: anywhere; }
.prow { display: flex; flex-wrap: wrap; gap: 4px; }
figure.pcell figcaption { font-weight: 400; font-size: 11px; color: #5b6275; text-align: center; margin: 1px 0 0; }
.cat { color: #8a90a0; font-size: 11px; }
img.cell { width: 72px; height: 72px; image-rendering: pixelated; display: block; }
.grids { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 14px; }
figure { margin: 0; }
figcaption { font-weight: 600; font-size: 13px; margin-bottom: 4px; }
img.grid { width: 100%; height: auto; image-rendering: pixelated; border: 1px solid #e4e6ec; }
.warning { background: #fdecea; border: 2px solid #b3261e; color: #5f1410; border-radius: 6px; padding: 10px 16px; }
.warning ul { margin: 6px 0 0; padding-left: 20px; }
.ok { background: #e8f4ea; border: 1px solid #8cc79a; border-radius: 6px; padding: 8px 14px; }
.note { color: #5b6275; font-size: 12.5px; }
.empty { color: #8a90a0; font-style: italic; }
pre { background: #f6f7f9; border: 1px solid #e4e6ec; border-radius: 6px; padding: 10px 14px; font-size: 12px;
      max-height: 560px; overflow: auto; }
"""

# Counts the images that decoded, for tests and for anyone checking the file in a browser's console.
SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; } }
  document.body.setAttribute("data-images-loaded", String(ok));
  document.body.setAttribute("data-images-total", String(imgs.length));
});
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
<script>{script}</script>
</head>
<body>
<header><h1>{name}</h1><nav>{nav}</nav></header>
<main>
{body}
</main>
</body>
</html>
"""
