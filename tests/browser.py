"""Render an HTML file in headless Chromium and report what a reader would see."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@dataclass(frozen=True)
class Rendered:
    n_plot_divs: int  # plotly figure containers in the page
    n_rendered: int  # of those, how many plotly drew (an <svg class="main-svg"> inside)
    script_errors: int  # uncaught script errors counted by the page


def render(path: Path, timeout: float = 120) -> Rendered:
    """Load `path` with no network, let scripts run, and inspect the resulting DOM."""
    if CHROMIUM is None:
        raise RuntimeError("headless Chromium: expected a chromium binary on PATH, got none "
                           "(apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--dump-dom",
             Path(path).resolve().as_uri()],
            capture_output=True, text=True, timeout=timeout, check=True,
        ).stdout
    divs = re.findall(r'class="plotly-graph-div"', Path(path).read_text(encoding="utf-8"))
    # each drawn figure gets its own container with svg.main-svg children
    rendered = len(re.findall(r'class="plot-container plotly"', out))
    m = re.search(r'data-script-errors="(\d+)"', out)
    return Rendered(len(divs), rendered, int(m.group(1)) if m else 0)
