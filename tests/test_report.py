"""The run report (rewardflow/report/): hacking.py's rule on synthetic metrics, page.py's pages of synthetic runs."""

import base64
import dataclasses
import json
import re
from html.parser import HTMLParser

import pytest
import torch

from rewardflow.cli import main
from rewardflow.config import to_yaml
from rewardflow.evaluate import EvalConfig
from rewardflow.presets import get_preset
from rewardflow.report import grid_cells, hacking_warnings, reward_trend, warnings_from_metrics, write_report
from rewardflow.utils.logging import save_grid

CATEGORIES = ("single_object", "counting", "position")


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs = []
        self.links = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs)
        for name in ("src", "href"):
            if name in attrs:
                self.links.append(attrs[name])


def parse(page: str) -> Images:
    p = Images()
    p.feed(page)
    return p


# ------------------------------------------------------------------------------------------------------------
# The rule, on plain lists


def test_reward_trend_compares_last_and_first_quarter():
    assert reward_trend([]) is None and reward_trend([0.5]) is None
    assert reward_trend([0.2, 0.4]) == pytest.approx(0.2)
    assert reward_trend([0.1, 0.1, 0.3, 0.3, 0.5, 0.5, 0.7, 0.7]) == pytest.approx(0.6)
    assert reward_trend([0.5, float("nan"), 0.7]) == pytest.approx(0.2)


RISING = [0.40 + 0.01 * i for i in range(20)]  # +0.15 last quarter vs first
FLAT = [0.50 + 0.005 * (-1) ** i for i in range(20)]


def test_rule_warns_when_reward_rises_and_eval_falls_from_its_best():
    out = hacking_warnings(RISING, [(0, 0.50), (10, 0.60), (20, 0.55)])
    assert len(out) == 1 and "reward hacking" in out[0] and "below its best" in out[0]
    assert "0.600 at iteration 10" in out[0]


def test_rule_warns_when_eval_ends_below_the_base():
    out = hacking_warnings(RISING, [(0, 0.50), (10, 0.51), (20, 0.49)])
    assert len(out) == 1 and "below the base" in out[0] and "below its best" not in out[0]


def test_rule_quiet_for_healthy_or_ambiguous_runs():
    assert hacking_warnings(RISING, [(0, 0.50), (10, 0.55), (20, 0.60)]) == []  # both rise
    assert hacking_warnings(RISING, [(0, 0.50), (10, 0.56), (20, 0.54)]) == []  # 0.02 dip: within 0.03
    assert hacking_warnings(FLAT, [(0, 0.50), (10, 0.60), (20, 0.40)]) == []  # eval falls, reward flat
    assert hacking_warnings([0.4, 0.41], [(0, 0.5), (2, 0.3)]) == []  # rise 0.01 < 0.02
    assert hacking_warnings(RISING, [(0, 0.50)]) == []  # one evaluation: nothing to compare
    assert hacking_warnings([0.1], [(0, 0.5), (1, 0.1)]) == []  # one iteration: no trend
    assert hacking_warnings([], []) == []


def test_rule_thresholds_are_parameters():
    evals = [(0, 0.50), (10, 0.56), (20, 0.54)]
    assert hacking_warnings(RISING, evals, max_eval_drop=0.01)
    assert not hacking_warnings(RISING, [(0, 0.5), (10, 0.6), (20, 0.5)], min_reward_rise=0.5)


def test_rule_flags_falling_diversity_and_ignores_its_absence():
    out = hacking_warnings(FLAT, [(0, 0.5), (10, 0.5)], [(0, 0.20), (10, 0.15)])
    assert len(out) == 1 and out[0].startswith("Diversity is falling") and "25% lower" in out[0]
    assert hacking_warnings(FLAT, [(0, 0.5), (10, 0.5)], [(0, 0.20), (10, 0.18)]) == []  # 10% < 15%
    assert hacking_warnings(FLAT, [(0, 0.5), (10, 0.5)], [(0, 0.20)]) == []
    assert hacking_warnings(FLAT, [(0, 0.5), (10, 0.5)]) == []


def test_rule_flags_one_colour_taking_over_the_palette():
    evals = [(0, 0.5), (10, 0.6)]
    base = (0, {"white": 29, "red": 41, "blue": 30})
    later = [(5, {"white": 35, "red": 35, "blue": 30}), (10, {"white": 48, "red": 22, "blue": 30})]
    out = hacking_warnings(FLAT, evals, colours=[base, *later])
    assert len(out) == 1 and out[0].startswith("The palette is collapsing: white went from 29%")
    assert "to 48% (iteration 10)" in out[0]
    assert hacking_warnings(FLAT, evals, colours=[base, (10, {"white": 40, "red": 30, "blue": 30})]) == []  # +11
    # A colour the base never drew counts from 0; the share is of all detections, whatever their number.
    (out,) = hacking_warnings(FLAT, evals, colours=[base, (10, {"white": 58, "red": 82, "blue": 60, "purple": 100})])
    assert "purple went from 0% of the detected colours (iteration 0) to 33%" in out
    assert hacking_warnings(FLAT, evals, colours=[base]) == []  # nothing to compare
    assert hacking_warnings(FLAT, evals, colours=[(0, {}), (10, {"white": 5})]) == []  # the base detected nothing
    assert (
        hacking_warnings(FLAT, evals, colours=[base, (10, {"white": 48, "red": 22})], max_colour_share_rise=0.5) == []
    )


# ------------------------------------------------------------------------------------------------------------
# Synthetic run folders


def train_records(rewards, extra=None):
    return [
        {
            "iteration": i + 1,
            "reward": r,
            "reward_std": 0.2,
            "reward/shapes-judge": r,
            "reward/jpeg-compressibility": 0.3,
            "kl": 1e-4 * i,
            "clip_frac": 0.2,
            "zero_std_groups": 0.1,
            "time_iteration": 3.0,
            **(extra or {}),
        }
        for i, r in enumerate(rewards)
    ]


def eval_report(score, diversity=None, colours=None):
    cats = {c: min(1.0, score + 0.1 * k) for k, c in enumerate(CATEGORIES)}
    report = {
        "overall": sum(cats.values()) / len(cats),
        "categories": cats,
        "clean_overall": score - 0.05,
        "clean_categories": {c: v - 0.05 for c, v in cats.items()},
        "num_prompts": 18,
        "samples_per_prompt": 2,
        "mean_score": score,
        "detections_per_image": dict.fromkeys(CATEGORIES, 1.5),
        "histogram": {"colors": colours or {"red": 3, "blue": 4}, "shapes": {"circle": 7}, "blobs": 1},
        "rewards": {"shapes-score": 0.7 + score / 10},
        "settings": {"num_steps": 4, "seed": 1, "prompts": "shapes:eval"},
    }
    if diversity is not None:
        report["diversity"] = diversity
    return report


def make_run(
    tmp_path, name, rewards, evals, *, diversity=None, colours=None, prompts=None, grids=True, meta=None, extra=None
):
    """A run folder as train.py writes one; ``evals``: {iteration: strict score}; ``colours``: a histogram each."""
    run = tmp_path / name
    (run / "samples").mkdir(parents=True)
    (run / "eval").mkdir()
    cfg = dataclasses.replace(get_preset("shapes_grpo_cpu"), run_dir=str(run), iterations=len(rewards) or 1)
    if prompts is not None:
        cfg.eval = EvalConfig(prompts=str(prompts), samples_per_prompt=2, num_steps=4)
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / "meta.json").write_text(json.dumps(meta or {"rewardflow_version": "0.1.0", "git_commit": "abc123"}))
    records = train_records(rewards, extra)
    gen = torch.Generator().manual_seed(0)
    for k, (it, score) in enumerate(sorted(evals.items())):
        report = eval_report(
            score, None if diversity is None else diversity[k], None if colours is None else colours[k]
        )
        (run / "eval" / f"iter_{it:05d}.json").write_text(json.dumps(report))
        records.append({"iteration": it, **{f"eval/{k}": v for k, v in report.items() if k != "settings"}})
        if grids:
            save_grid(torch.rand(6, 3, 8, 8, generator=gen), run / "samples" / f"eval_{it:05d}.png")
    records.sort(key=lambda r: r["iteration"])
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


HEALTHY = dict(rewards=[0.4 + 0.01 * i for i in range(12)], evals={0: 0.5, 6: 0.55, 12: 0.6})
HACKED = dict(rewards=[0.4 + 0.02 * i for i in range(12)], evals={0: 0.5, 6: 0.6, 12: 0.45})


def test_warnings_from_metrics_reads_metrics_records(tmp_path):
    healthy = json_lines(make_run(tmp_path, "a", **HEALTHY, grids=False))
    hacked = json_lines(make_run(tmp_path, "b", **HACKED, grids=False))
    assert warnings_from_metrics(healthy) == []
    (warning,) = warnings_from_metrics(hacked)
    assert "eval strict accuracy" in warning
    # Without a judge the first evaluation reward is followed instead.
    judgeless = [{k: v for k, v in r.items() if k != "eval/overall"} for r in hacked]
    (warning,) = warnings_from_metrics(judgeless)
    assert "eval shapes-score" in warning


def json_lines(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_page_is_self_contained_with_every_eval_grid(tmp_path):
    run = make_run(tmp_path, "healthy", **HEALTHY)
    out = write_report(run)
    assert out == run / "report.html"
    page = out.read_text()
    assert "http://" not in page and "https://" not in page
    parsed = parse(page)
    assert all(link.startswith(("data:image/png;base64,", "#")) for link in parsed.links), parsed.links
    grids = {int(img["data-eval-grid"]): img["src"] for img in parsed.imgs if "data-eval-grid" in img}
    assert set(grids) == {0, 6, 12}
    for it, src in grids.items():
        assert base64.b64decode(src.split(",", 1)[1]) == (run / "samples" / f"eval_{it:05d}.png").read_bytes()
    assert 'class="warning"' not in page and "No sign of reward hacking" in page
    for text in ("Training reward", "Algorithm metrics", "Final evaluation report", "abc123", "iteration 0 (base)"):
        assert text in page
    for cat in CATEGORIES:
        assert f"<td>{cat}</td>" in page
    assert "run_dir:" in page and "<pre>" in page  # the config
    assert "zero_std_groups" in page and "clip_frac" in page  # the metric grid lists what it plots


def test_page_warns_for_a_hacked_run(tmp_path):
    page = write_report(make_run(tmp_path, "hacked", **HACKED)).read_text()
    assert 'class="warning"' in page and "Possible reward hacking" in page
    assert re.search(r"held-out eval strict accuracy ended at 0\.\d+ \(iteration 12\)", page)


def test_page_warns_when_diversity_falls(tmp_path):
    page = write_report(make_run(tmp_path, "collapse", **HEALTHY, diversity=[0.2, 0.15, 0.1])).read_text()
    assert 'class="warning"' in page and "Diversity is falling" in page
    assert "diversity is not checked" not in page
    assert warnings_from_metrics(json_lines(make_run(tmp_path, "varied", **HEALTHY, diversity=[0.2, 0.21, 0.2]))) == []


def test_page_warns_when_one_colour_takes_over(tmp_path):
    palette = [{"red": 5, "white": 5}, {"red": 4, "white": 6}, {"red": 2, "white": 8}]
    page = write_report(make_run(tmp_path, "white", **HEALTHY, colours=palette)).read_text()
    assert 'class="warning"' in page and "The palette is collapsing: white went from 50%" in page
    assert "rose more than 15 points above the base" in page  # the rule, stated under the box


def test_strings_from_files_are_escaped(tmp_path):
    bad = '<script>alert("x")</script> & <b>'
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{bad} {i}\n" for i in range(18)))
    run = make_run(
        tmp_path,
        "escape",
        rewards=[0.5, 0.5],
        evals={0: 0.5, 2: 0.5},
        prompts=prompts,
        meta={"git_commit": bad},
        extra={"<i>odd</i>": 1.0},
    )
    with open(run / "config.yaml", "a") as f:
        f.write(f"# {bad}\n")
    page = write_report(run).read_text()
    assert "<script>alert" not in page and "<b>" not in page and "<i>odd" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;" in page
    assert "&lt;i&gt;odd&lt;/i&gt;" in page
    # The prompts label the per-prompt comparison: cell k of the grid is prompt 3k.
    assert "&lt;b&gt; 3" in page and "&lt;b&gt; 15" in page and "&lt;b&gt; 1 " not in page


def test_run_without_evaluations_or_with_only_the_base(tmp_path):
    page = write_report(make_run(tmp_path, "noeval", rewards=[0.3, 0.4, 0.5], evals={})).read_text()
    assert "No evaluation recorded yet" in page and "No evaluation samples" in page
    assert "Not enough data yet" in page
    base = make_run(tmp_path, "base", rewards=[], evals={0: 0.5})
    page = write_report(base).read_text()
    assert "No training iterations recorded yet" in page
    assert [img["data-eval-grid"] for img in parse(page).imgs if "data-eval-grid" in img] == ["0"]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text((base / "config.yaml").read_text())
    assert "No evaluation report yet" in write_report(bare).read_text()


def test_not_a_run_folder(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"is not a run folder \(no config.yaml\)"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run folder (no config.yaml)" in capsys.readouterr().err


def test_cli_report(tmp_path, capsys):
    run = make_run(tmp_path, "cli", rewards=[0.5, 0.6], evals={0: 0.5, 2: 0.5}, grids=False)
    out = tmp_path / "sub" / "page.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert not (run / "report.html").exists()
    bare = tmp_path / "bare"  # nothing to plot: quick
    bare.mkdir()
    (bare / "config.yaml").write_text((run / "config.yaml").read_text())
    assert main(["report", str(bare)]) == 0 and (bare / "report.html").is_file()


def test_grid_cells_cut_a_saved_grid_back_into_its_images(tmp_path):
    images = torch.rand(11, 3, 5, 5, generator=torch.Generator().manual_seed(1)) * 0.9
    save_grid(images, tmp_path / "g.png")
    cells = grid_cells(tmp_path / "g.png")
    assert cells is not None and len(cells) == 11
    from io import BytesIO

    import numpy as np
    from PIL import Image

    first = np.asarray(Image.open(BytesIO(cells[0])))
    assert first.shape == (15, 15, 3)
    expected = (images[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert (first[::3, ::3] == expected).all()
    Image.new("RGB", (40, 30), "red").save(tmp_path / "other.png")
    assert grid_cells(tmp_path / "other.png") is None


def test_sample_cells_show_distinct_prompts_from_every_category():
    from rewardflow.report.page import distinct_cells

    prompts = [("a circle", "single")] * 4 + [("a square", "single"), ("two circles", "counting")] * 3
    prompts += [("a red circle", "colors"), ("a circle left of a square", "position")]
    picked = distinct_cells(prompts, len(prompts), 4)
    texts = [prompts[k][0] for k in picked]
    assert len(set(texts)) == len(texts) == 4
    assert {prompts[k][1] for k in picked} == {"single", "counting", "colors", "position"}
    assert distinct_cells(None, 10, 3) == [0, 4, 9]  # without the prompts: evenly spaced


def test_distances_are_drawn_from_zero_and_drift_starts_at_the_base(monkeypatch):
    from rewardflow.report import figures

    drawn = {}
    monkeypatch.setattr(figures, "_panels", lambda panels, *a: drawn.update({t: (s, y) for t, s, y in panels}) or "x")
    evals = [{"iteration": 0, "eval/overall": 0.5, "eval/diversity": 0.230}]
    evals += [{"iteration": i, "eval/overall": 0.5 + i / 1000, "eval/diversity": 0.229, "eval/drift": 0.01 * i}
              for i in (30, 60, 90, 150)]  # fmt: skip
    figures.eval_plots(evals)
    (_, xs, ys), ylim = (
        drawn["drift from the base (RMS distance)"][0][0],
        drawn["drift from the base (RMS distance)"][1],
    )
    assert xs == [0, 30, 60, 90, 150] and ys[0] == 0.0 and ylim[0] == 0.0
    series, ylim = drawn["diversity (pairwise RMS distance)"]
    assert ylim[0] == 0.0 and ylim[1] > 0.23  # a 1% change looks like one, not like a cliff
    assert len(drawn["accuracy"][0][0][1]) == 5
