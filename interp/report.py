"""Offline HTML reports: plotly.js embedded once, so the page renders with no network."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from interp.atomic import atomic_file


@dataclass
class Section:
    title: str
    text: str = ""
    figures: list[go.Figure] = field(default_factory=list)
    table_html: str = ""


@dataclass
class Report:
    """An ordered list of sections rendered to one self-contained HTML file."""

    title: str
    sections: list[Section] = field(default_factory=list)

    def add(self, title: str, text: str = "", figures: list[go.Figure] | None = None,
            table_html: str = "") -> Section:
        s = Section(title, text, list(figures or []), table_html)
        self.sections.append(s)
        return s

    def to_html(self) -> str:
        parts = [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(self.title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
            "table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #ccc;padding:2px 6px}"
            "</style>",
            # count script errors on the page itself, so a headless browser can check them
            "<script>window.__scriptErrors=0;window.addEventListener('error',function(){"
            "window.__scriptErrors++;document.documentElement.setAttribute('data-script-errors',"
            "String(window.__scriptErrors));});</script>",
            # plotly.js once, inline: the report must render with no network
            f"<script type='text/javascript'>{get_plotlyjs()}</script>",
            "</head><body>",
            f"<h1>{html.escape(self.title)}</h1>",
        ]
        for s in self.sections:
            parts.append(f"<h2>{html.escape(s.title)}</h2>")
            if s.text:
                parts.extend(f"<p>{html.escape(p)}</p>" for p in s.text.split("\n\n"))
            for fig in s.figures:
                parts.append(pio.to_html(fig, include_plotlyjs=False, full_html=False))
            if s.table_html:
                parts.append(s.table_html)
        parts.append("</body></html>")
        return "\n".join(parts)

    def write(self, path: str | Path) -> Path:
        """Write the report atomically (temp file, then rename)."""
        path = Path(path)
        with atomic_file(path) as tmp:
            tmp.write_text(self.to_html(), encoding="utf-8")
        return path


def figures_to_html(figures: list[go.Figure], path: str | Path, title: str = "interp") -> Path:
    """One offline HTML page holding `figures`."""
    r = Report(title)
    r.add(title, figures=figures)
    return r.write(path)


def section(title: str, result: Any, intro: str = "", table_rows: int = 40) -> Section:
    """A report section for an investigation's result: the verdict, the figure and the head of the tidy table."""
    import pandas as pd

    frame = result.to_frame()
    if isinstance(frame, pd.DataFrame) and len(frame) > table_rows:
        frame = frame.head(table_rows)
    table = frame.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0) if isinstance(
        frame, pd.DataFrame) else ""
    text = (intro + "\n\n" if intro else "") + "Verdict: " + str(result.verdict)
    return Section(title, text, [result.plot()], table)


def report_for(name: str, result: Any) -> Report:
    """A one-section report of `interp run NAME`."""
    r = Report(f"interp run {name}")
    r.sections.append(section(name, result))
    return r
