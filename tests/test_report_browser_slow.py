"""Slow tier: the report of a real (tiny) training run, rendered by headless Chromium.

Trains three small Flow-GRPO iterations on the shipped base with a small evaluation (about a minute on 2 CPU
cores), writes ``report.html``, then asks Chromium for a screenshot and for the DOM after load: the page's own
script counts the images that decoded. Skipped where ``/usr/bin/chromium`` is absent (Debian:
``apt-get install chromium``). Set ``REWARDFLOW_REPORT_SCREENSHOT=FILE.png`` to keep the screenshot.
"""

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rewardflow.config import apply_overrides
from rewardflow.presets import get_preset
from rewardflow.report import write_report
from rewardflow.report.page import load_run
from rewardflow.train import train

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"


def chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        *args,
        page.resolve().as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


class ImageCount(HTMLParser):
    def __init__(self):
        super().__init__()
        self.count = 0

    def handle_starttag(self, tag, attrs):
        self.count += tag == "img"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (Debian: apt-get install chromium)")
def test_report_of_a_real_run_renders_in_chromium(tmp_path):
    cfg = apply_overrides(
        get_preset("shapes_grpo_cpu"),
        [
            f"run_dir={tmp_path / 'run'}",
            "iterations=4",
            "eval_every=1",
            "save_every=4",
            "prompts_per_iter=2",
            "group_size=4",
            "threads=1",
            "grpo.num_steps=4",
            "grpo.micro_batch=4",
            "grpo.optimizer_steps=1",
            "eval.samples_per_prompt=2",
            "eval.num_steps=4",
        ],
    )
    threads = torch.get_num_threads()
    try:
        run = train(cfg)
    finally:
        torch.set_num_threads(threads)  # train() sets the process-wide count
    grids = sorted((run / "samples").glob("eval_*.png"))
    assert [g.name for g in grids] == ["eval_00000.png", "eval_00004.png"]  # the evaluations of every prompt

    page = write_report(run)
    html = page.read_text()
    # Curves: five evaluations (the three between on 1 prompt in 6), diversity and drift drawn from 0.
    assert "score 1 prompt in 6" in html and 'alt="evaluation scores per iteration"' in html
    evals = [e for e in load_run(run).evals if "eval/overall" in e]
    assert [e["iteration"] for e in evals] == [0, 1, 2, 3, 4] and all("eval/diversity" in e for e in evals)
    counter = ImageCount()
    counter.feed(html)
    assert counter.count > len(grids)
    assert html.count('data-eval-grid="') == len(grids)

    shot = tmp_path / "report.png"
    done = chromium(page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,3000")
    assert shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (3000, 1200)
    assert pixels.std() > 20, "the screenshot is (nearly) blank"
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 100  # text, plots and samples, not a flat page
    if os.environ.get("REWARDFLOW_REPORT_SCREENSHOT"):
        shutil.copy(shot, os.environ["REWARDFLOW_REPORT_SCREENSHOT"])

    dom = chromium(page, tmp_path / "profile", "--dump-dom").stdout
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images-total="(\d+)"', dom)
    assert loaded and total, "the page's load script did not run"
    assert int(loaded.group(1)) == int(total.group(1)) == counter.count
