"""Render an HTML file in headless Chromium and report what a reader would see."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=20000"]
WIDTH = 1200  # px: the window the report is checked and photographed at


@dataclass(frozen=True)
class Rendered:
    n_plot_divs: int  # plotly figure containers in the page
    n_rendered: int  # of those, how many plotly drew (an <svg class="main-svg"> inside)
    script_errors: int  # uncaught script errors counted by the page
    blank_figures: int = -1  # drawn figures without a single trace (-1: the page does not report it)
    overflow_px: int = -1  # horizontal overflow of the page at WIDTH px (-1: not reported)
    height_px: int = -1  # the page's full height (-1: not reported)


def _chromium(args: list[str], timeout: float) -> str:
    if CHROMIUM is None:
        raise RuntimeError("headless Chromium: expected a chromium binary on PATH, got none "
                           "(apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout, check=True).stdout


def _attr(dom: str, name: str, default: int = -1) -> int:
    m = re.search(rf'{name}="(\d+)"', dom)
    return int(m.group(1)) if m else default


def render(path: Path, timeout: float = 120) -> Rendered:
    """Load `path` with no network, let scripts run, and inspect the resulting DOM."""
    out = _chromium([f"--window-size={WIDTH},900", "--dump-dom", Path(path).resolve().as_uri()], timeout)
    divs = re.findall(r'class="plotly-graph-div"', Path(path).read_text(encoding="utf-8"))
    # each drawn figure gets its own container with svg.main-svg children
    rendered = len(re.findall(r'class="plot-container plotly"', out))
    return Rendered(len(divs), rendered, _attr(out, "data-script-errors", 0), _attr(out, "data-blank-figures"),
                    _attr(out, "data-overflow-px"), _attr(out, "data-page-height"))


def screenshot(path: Path, png: Path, height: int, timeout: float = 120) -> Path:
    """A full-page screenshot of `path` (a window `height` px tall: the page's height) to `png`."""
    _chromium([f"--window-size={WIDTH},{max(600, height)}", f"--screenshot={Path(png).resolve()}",
               Path(path).resolve().as_uri()], timeout)
    return png
