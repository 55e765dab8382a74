"""What the demo report shows, checked on the figures it writes (their plotly JSON, read back
from the HTML) and on its header, summary tables and tidy CSVs (the `demo_run` fixture)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import pytest
from plotly.subplots import make_subplots

from interp import viz
from interp.report import CI_METHOD, PLOTLY_JS, Report, Section

KEYS = ("multihop", "plan-ahead", "decay", "last-token", "routes")


def figures_in(html: str) -> list[dict]:
    """Each `Plotly.newPlot(id, data, layout, config)` of the page, as {"data", "layout"}."""
    dec, out = json.JSONDecoder(), []
    for m in re.finditer(r'Plotly\.newPlot\(\s*"[^"]+",\s*', html):
        data, end = dec.raw_decode(html, m.end())
        layout, _ = dec.raw_decode(html, html.index("{", end))
        out.append({"data": data, "layout": layout})
    return out


@pytest.fixture(scope="module")
def demo_figures(demo_run) -> list[dict]:
    figs = figures_in(demo_run.report.read_text(encoding="utf-8"))
    assert len(figs) == len(KEYS)
    return figs


def _axis_keys(fig: dict) -> set[str]:
    keys = set()
    for t in fig["data"]:
        keys.add("xaxis" + t.get("xaxis", "x")[1:])
        keys.add("yaxis" + t.get("yaxis", "y")[1:])
    return keys


def test_every_demo_figure_titles_its_axes_names_its_traces_and_states_its_ci(demo_figures):
    for fig in demo_figures:
        layout = fig["layout"]
        title = layout["title"]["text"]
        for key in _axis_keys(fig):
            assert (layout[key].get("title") or {}).get("text"), (title, key)
        assert all(t.get("name") for t in fig["data"]), title
        caption = layout["meta"]["caption"]
        assert "n = " in caption or "per distance" in caption, title
        assert "95% percentile-bootstrap CI over examples" in caption, title
        # the CI is defined where the reader hovers, on every line that has one
        with_ci = [t for t in fig["data"] if "CI" in (t.get("hovertemplate") or "")]
        assert all(viz.CI_TEXT in t["hovertemplate"] for t in with_ci), title
        assert viz.figure_problems(fig) == [], title


def test_subplot_titles_of_the_demo_figures_do_not_overlap(demo_figures):
    """An independent estimate: each title line at 0.6 em per character (wider than the style's
    0.55) must fit within the distance between neighbouring panel centres at 1000 px."""
    for fig in demo_figures:
        titles = [a for a in fig["layout"].get("annotations", []) if a.get("yanchor") == "bottom"]
        rows: dict[float, list[dict]] = {}
        for a in titles:
            rows.setdefault(round(a["y"], 3), []).append(a)
        for row in rows.values():
            row.sort(key=lambda a: a["x"])
            for left, right in zip(row, row[1:], strict=False):
                gap_px = (right["x"] - left["x"]) * 900
                widths = [0.6 * a["font"]["size"] * max(map(len, a["text"].split("<br>"))) for a in (left, right)]
                assert sum(widths) / 2 < gap_px, (left["text"], right["text"])


def test_layer_axes_are_labelled_like_the_tables(demo_run, demo_figures):
    from interp.lens import layer_labels

    by_title = {f["layout"]["title"]["text"].split(" — ")[0].split(":")[0]: f for f in demo_figures}
    mh = by_title["Multi-hop"]
    n_layers = demo_run.results["multihop"].probes[("last", "bridge")].layers[-1]
    want = layer_labels(n_layers)
    for key in ("xaxis", "xaxis2", "xaxis3"):
        assert mh["layout"][key]["ticktext"] == want and mh["layout"][key]["tickvals"] == list(range(len(want)))
    table = demo_run.report.read_text(encoding="utf-8")
    assert f"<td>{want[demo_run.summary['multihop']['bridge_decodable_from']]}</td>" in table  # the same label


def test_decay_figure_marks_the_training_length_and_starts_accuracy_at_zero(demo_figures):
    fig = next(f for f in demo_figures if f["layout"]["title"]["text"].startswith("Positional"))
    layout = fig["layout"]
    # the retrieval organisms train on distances 2..126 (their manifest); the verdict compares beyond it
    lines = [s for s in layout["shapes"] if s.get("x0") == s.get("x1") == 126]
    assert len(lines) == 2
    acc = [k for k in _axis_keys(fig) if k.startswith("yaxis") and "accuracy" in layout[k]["title"]["text"]]
    assert acc and all(layout[k]["range"][0] <= 0 and layout[k]["range"][1] >= 1 for k in acc)
    # colour is the model, line style the kind of run: trained solid, random-init dashed
    styles = {(t["name"].split(" (")[0], t["name"].split(" (")[1][:-1]): (t["line"]["color"], t["line"]["dash"])
              for t in fig["data"] if t.get("showlegend", True) and " (" in t["name"] and "line" in t}
    for model in ("retrieval-learned", "retrieval-rotary", "retrieval-nope"):
        (c1, d1), (c2, d2) = styles[(model, "trained")], styles[(model, "random-init")]
        assert c1 == c2 and d1 == "solid" and d2 == "dash"
    assert len({styles[(m, "trained")][0] for m in ("retrieval-learned", "retrieval-rotary", "retrieval-nope")}) == 3


def test_last_token_figure_marks_clean_accuracy(demo_run, demo_figures):
    fig = next(f for f in demo_figures if f["layout"]["title"]["text"].startswith("Last-token"))
    clean = float(demo_run.results["last-token"].clean.correct.double().mean())
    assert any(s.get("y0") == s.get("y1") == pytest.approx(clean) for s in fig["layout"]["shapes"])


def test_report_header_says_where_the_numbers_come_from(demo_run):
    from interp import __version__
    from interp.models import load_model, weights_fingerprint

    html = demo_run.report.read_text(encoding="utf-8")
    assert "interp demo --fast" in html and f"<td>{__version__}" in html and "seeds" in html
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", html)
    for name in ("multihop", "induction", "retrieval-nope"):
        fp = weights_fingerprint(load_model(f"organism:{name}"))
        assert f"<code>organism:{name}</code>" in html and fp[:16] in html, name


def test_sections_have_a_compact_table_a_how_measured_line_and_their_tidy_csv(demo_run):
    html = demo_run.report.read_text(encoding="utf-8")
    data = demo_run.report.parent / f"{demo_run.report.stem}_data"
    for key in KEYS:
        frame = demo_run.results[key].to_frame()
        back = pd.read_csv(data / f"{key}.csv")
        assert list(back.columns) == list(frame.columns) and len(back) == len(frame)
        num = frame.select_dtypes("number").columns
        pd.testing.assert_frame_equal(back[num].astype(float), frame[num].astype(float), rtol=1e-9, check_dtype=False)
        assert f"href='{data.name}/{key}.csv'" in html
    sections = html.split("<section>")[1:]
    assert len(sections) == 1 + len(KEYS)  # the organisms, then one per investigation
    for sec in sections[1:]:
        assert "<b>Question.</b>" in sec and "<b>Verdict.</b>" in sec and "plotly-graph-div" in sec
        assert f"CIs: {CI_METHOD}" in sec and "baseline:" in sec and re.search(r"n = \d+", sec)
        table = sec[sec.index("</script>", sec.index("plotly-graph-div")):]
        rows = re.findall(r"<tr>", table[:table.index("</table>")])
        assert 1 <= len(rows) <= 10  # a summary, not the 40-60 row tidy frame
        assert "NaN" not in table and ">nan<" not in table


def test_summary_numbers_are_the_results_numbers(demo_run):
    """The compact tables restate the result objects (checked against the JSON summary, which
    tests/test_demo.py checks against the organisms' ground truth)."""
    html = demo_run.report.read_text(encoding="utf-8")
    s = demo_run.summary
    iia = s["multihop"]["iia"]
    assert f"{iia['value']:.3f} [{iia['low']:.3f}, {iia['high']:.3f}]" in html
    for d in ("2", "248"):
        a = s["decay"]["nope"]["accuracy"][d]
        assert f"{a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}]" in html
    k = s["last-token"]["knockout_accuracy"]["0"]
    assert f"{k['value']:.3f} [{k['low']:.3f}, {k['high']:.3f}]" in html


def test_shared_plotly_js_is_written_once_for_a_folder(tmp_path):
    fig = go.Figure(go.Scatter(x=[0, 1], y=[1, 2], name="a"))
    for name in ("one", "two"):
        r = Report(name)
        r.sections.append(Section(name, figures=[fig]))
        r.write(tmp_path / f"{name}.html", shared_js=True)
    js = tmp_path / PLOTLY_JS
    from plotly.offline import get_plotlyjs

    assert js.read_text(encoding="utf-8") == get_plotlyjs()
    for name in ("one", "two"):
        html = (tmp_path / f"{name}.html").read_text(encoding="utf-8")
        assert f"<script src='{PLOTLY_JS}'></script>" in html and len(html) < 100_000
    default = Report("x")
    default.sections.append(Section("x", figures=[fig]))
    assert len(default.write(tmp_path / "self.html").read_text(encoding="utf-8")) > 3_000_000  # self-contained


def test_figure_problems_finds_what_the_old_figures_had():
    """Regression: the last-token figure had subplot titles running into each other at report
    width, untitled axes, unnamed CI traces and an accuracy axis cut at 0.5."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=(
        "accuracy after knocking out the last position", "KL to the clean output (nats) at the last position",
        "share of the prediction in the residual"))
    for c in (1, 2, 3):
        fig.add_trace(go.Scatter(x=[0, 1], y=[0.6, 0.9]), row=1, col=c)
    fig.update_yaxes(range=[0.5, 1], title_text="accuracy", row=1, col=1)
    fig.update_layout(title="old")
    problems = viz.figure_problems(fig)
    assert any("overlap" in p for p in problems)
    assert "xaxis has no title" in problems and "yaxis2 has no title" in problems
    assert "trace 0 (scatter) has no name" in problems
    assert any("starts at 0.5" in p for p in problems) and "figure without a caption" in problems
    viz.fit_subplot_titles(fig)
    assert not any("overlap" in p for p in viz.figure_problems(fig))


def test_section_without_frame_or_summary_still_renders(tmp_path):
    r = Report("plain")
    r.add("a table", "text", table_html="<table><tr><td>1</td></tr></table>")
    html = r.write(tmp_path / "p.html").read_text(encoding="utf-8")
    assert "<td>1</td>" in html and not (tmp_path / "p_data").exists()
    assert Path(tmp_path / "p.html").is_file()
