"""One self-contained HTML page per training run (``rewardflow report RUN_DIR``): reading the run folder, the layout.

The page reads only what the training loop leaves in the run folder (``config.yaml``, ``meta.json``,
``metrics.jsonl``, ``eval/iter_*.json``, ``samples/eval_*.png``) and embeds everything it shows: the plots are
PNGs drawn with matplotlib's Agg canvas and the sample grids are the run's own PNGs, all as ``data:`` URIs, so
the file can be mailed, archived or opened offline. Every string that comes from the run folder is HTML-escaped.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from rewardflow.report.figures import eval_plots, metric_keys, metrics_plot, png_uri, reward_plot
from rewardflow.report.hacking import (
    MAX_COLOUR_SHARE_RISE,
    MAX_DIVERSITY_DROP,
    MAX_EVAL_DROP,
    MIN_REWARD_RISE,
    is_finite_number,
    reward_trend,
    scalar_of,
    split_records,
    warnings_from_metrics,
)
from rewardflow.utils.logging import read_jsonl

GRID_COLUMNS = 8  # rewardflow.utils.logging.save_grid's default layout of samples/eval_*.png
GRID_PROMPT_STRIDE = 3  # run_eval saves the first sample of every third evaluation prompt
PROMPT_ROWS = 16  # prompts in the per-prompt comparison table, evenly spaced over the grid
PROMPT_COLUMNS = 6  # at most this many checkpoints in that table (the base and the last always among them)


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


def distinct_cells(prompts: list[tuple[str, str]] | None, count: int, n: int) -> list[int]:
    """At most ``n`` of the first ``count`` grid cells, each a different prompt, taken from every category in turn.

    Evaluation sets repeat prompts (a prompt seen in training and held out, or in two categories): evenly spaced
    cells would show the same one several times. Without the prompts, evenly spaced cells.
    """
    if not prompts:
        return _spread(list(range(count)), n)
    by_category: dict[str, list[int]] = {}
    seen: set[str] = set()
    for k, (text, category) in enumerate(prompts[:count]):
        if text not in seen:
            seen.add(text)
            by_category.setdefault(category, []).append(k)
    queues = [_spread(cells, n) for cells in by_category.values()]
    picked: list[int] = []
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return sorted(picked)


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
    times = [t["time_iteration"] for t in run.train if is_finite_number(t.get("time_iteration"))]
    if times:
        rows.append(("training time", f"{sum(times) / 60:.1f} min ({sum(times) / len(times):.1f} s per iteration)"))
    rows += [(k, v) for k, v in run.meta.items()]
    rows.append(("report written", datetime.datetime.now().strftime("%Y-%m-%d %H:%M")))
    table = _kv_table(rows)
    cards = []
    if run.evals:
        first, last = run.evals[0], run.evals[-1]
        for key, label in (("eval/overall", "eval strict"), ("eval/clean_overall", "eval clean")):
            if is_finite_number(first.get(key)) and is_finite_number(last.get(key)):
                delta = last[key] - first[key]
                cards.append(
                    f'<div class="card"><div class="label">{label}</div><div class="big">{last[key]:.3f}</div>'
                    f'<div class="{_sign(delta)}">{delta:+.3f} vs iteration {first["iteration"]}</div></div>'
                )
        for name, value in (last.get("eval/rewards") or {}).items():
            base = (first.get("eval/rewards") or {}).get(name)
            if is_finite_number(value):
                diff = f"{value - base:+.3f} vs iteration {first['iteration']}" if is_finite_number(base) else ""
                cards.append(
                    f'<div class="card"><div class="label">eval {_e(name)}</div><div class="big">{value:.3f}</div>'
                    f'<div class="{_sign(value - base if is_finite_number(base) else 0)}">{diff}</div></div>'
                )
    if run.train and is_finite_number(run.train[-1].get("reward")):
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
    has_div = any(scalar_of(e.get("eval/diversity")) is not None for e in run.evals)
    extra = "" if has_div else " The evaluation reports carry no diversity field, so diversity is not checked."
    return f'<div class="ok">{state}</div><p class="note">{rule}{extra}</p>'


def _reward_section(run: Run) -> str:
    if not any(is_finite_number(t.get("reward")) for t in run.train):
        return '<p class="empty">No training iterations recorded yet.</p>'
    return _img(reward_plot(run.train), "training reward per iteration", "plot")


def _eval_section(run: Run) -> str:
    if not run.evals:
        return '<p class="empty">No evaluation recorded yet.</p>'
    uri = eval_plots(run.evals)
    if not uri:
        return '<p class="empty">Nothing numeric.</p>'
    every = (run.config.get("eval") or {}).get("subset_every") or 0
    counts = [e.get("eval/num_prompts") for e in run.evals]
    note = ""
    if every > 1 and len(set(counts)) > 1:
        note = (f'<p class="note">The evaluations of the base and of the end of training score all '
                f"{max(c or 0 for c in counts)} prompts; the ones between score 1 prompt in {every} (the same prompts "
                "and initial noise each time), so their points are noisier. Diversity and drift are drawn from "
                "0.</p>")  # fmt: skip
    return note + _img(uri, "evaluation scores per iteration", "plot")


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
        picked = distinct_cells(prompts, count, PROMPT_ROWS)
        cards = []
        for k in picked:
            if prompts:
                text, cat = prompts[k]
                label = f'{_e(text)} <span class="cat">{_e(cat)}</span>'
            else:
                label = f"grid cell {k + 1}"  # the prompt file is not readable from here
            imgs = "".join(
                f'<figure class="pcell"><img class="cell" alt="prompt {k + 1}, iteration {it}" '
                f'src="{png_uri(cells[it][k])}"><figcaption>{_short_label(it)}</figcaption></figure>'
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
        head = f" — strict {score['eval/overall']:.3f}" if is_finite_number(score.get("eval/overall")) else ""
        figures.append(
            f"<figure><figcaption>{_iteration_label(it)}{head}</figcaption>"
            f'<img class="grid" data-eval-grid="{it}" alt="evaluation samples at iteration {it}" '
            f'src="{png_uri(data)}"></figure>'
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
                diff = strict - bs if is_finite_number(strict) and is_finite_number(bs) else None
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


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, signed: bool = False) -> str:
    if not is_finite_number(value):
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
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_fmt(v) if is_finite_number(v) else _e(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _flatten(obj: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for k, v in obj.items():
        if isinstance(v, dict) and v and not any(isinstance(x, (dict, list)) for x in v.values()):
            rows.append(
                (f"{prefix}{k}", ", ".join(f"{a} {_fmt(b) if is_finite_number(b) else b}" for a, b in v.items()))
            )
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
