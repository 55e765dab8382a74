"""The README's main job: `interp demo` writes one offline report that renders in a browser."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from browser import CHROMIUM, render


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "report.html"
    res = subprocess.run([sys.executable, "-m", "interp.cli", "demo", "--fast", "--out", str(out)],
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res.stdout


def test_demo_prints_verdicts_and_report_path(demo_report):
    out, stdout = demo_report
    assert "report written" in stdout and str(out.name) in stdout
    for key in ("multihop", "plan-ahead", "decay", "last-token", "routes"):
        assert key in stdout
    html = out.read_text()
    assert not re.findall(r"<script[^>]*\bsrc=", html)  # no external scripts: plotly.js is inline
    assert "Plotly.newPlot" in html
    assert html.count('class="plotly-graph-div"') >= 5


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (make test installs it as root)")
def test_report_renders_in_headless_chromium(demo_report):
    out, _ = demo_report
    page = render(out)
    assert page.script_errors == 0
    assert page.n_plot_divs >= 5 and page.n_rendered == page.n_plot_divs
