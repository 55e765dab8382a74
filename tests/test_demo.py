"""The README's main job: `interp demo` writes one offline report that renders in a browser, and
a JSON summary beside it whose verdicts and numbers match the organisms' known ground truth.

The investigations run once per session (the `demo_run` fixture in conftest.py)."""

from __future__ import annotations

import html as htmllib
import json
import re

import pytest
from browser import CHROMIUM, render, screenshot

from interp import cli

ROOT_DATA = __import__("pathlib").Path(__file__).resolve().parent.parent / "data"
KEYS = ("multihop", "plan-ahead", "decay", "last-token", "routes")


def test_demo_report_is_offline_with_a_figure_per_investigation(demo_run):
    html = demo_run.report.read_text()
    assert not re.findall(r"<script[^>]*\bsrc=", html)  # no external scripts: plotly.js is inline
    assert "Plotly.newPlot" in html
    assert html.count('class="plotly-graph-div"') >= 5
    for key in KEYS:
        assert htmllib.escape(demo_run.summary[key]["verdict"]) in html  # the verdict the JSON states


def test_demo_json_holds_the_organisms_ground_truth(demo_run):
    s = demo_run.summary
    assert all(s[k]["supported"] for k in KEYS), {k: s[k]["verdict"] for k in KEYS}
    m = s["multihop"]  # hop 1 before hop 2; patching the bridge's layer moves the answer
    assert m["bridge_decodable_from"] < m["answer_decodable_from"]
    assert m["iia"]["value"] >= 0.95 and m["iia_baseline"] < m["iia"]["low"]
    assert m["bridge_probe"]["low"] > m["bridge_probe_baseline"]["high"] and m["bridge_probe"]["value"] > m["bridge_probe_control"]
    for off in ("t2", "t3"):  # the future lens beats the bigram predictor and the random-init model
        p = s["plan-ahead"][off]
        assert p["accuracy_last_layer"]["low"] > max(p["bigram"], p["baseline_model_last_layer"])
    d = s["decay"]  # NoPE carries no position in its embedding, builds it with depth
    assert d["nope"]["position_r2_first_layer"] < 0.05 < 0.3 < d["nope"]["position_r2_last_layer"]
    assert d["learned"]["accuracy"]["2"]["value"] > 0.8
    t = s["last-token"]
    assert t["knockout_final_max_kl"] == 0 and t["clean_accuracy"] > 0.9
    assert 0 < t["sufficient_from"] and t["knockout_accuracy"]["0"]["value"] < 0.2
    r = s["routes"]  # the induction copy travels through layer 1's keys, not its values
    # (K-composition: the full run measures 96% through the keys, 0.3% through the values)
    assert r["share joint -> L1 (k)"] > 0.8 and abs(r["share joint -> L1 (v)"]) < 0.1
    assert abs(r["baseline_total"]) < 0.2
    assert s["sizes"]["multihop"] == m["n"]


def test_reference_summary_matches_this_code(demo_run):
    """data/demo.json (a full-size run, the README's source) reaches the verdicts and layers that
    this code reaches now: a change of result makes the reference, and so the README, stale."""
    ref = json.loads((ROOT_DATA / "demo.json").read_text())
    s = demo_run.summary
    for k in KEYS:
        assert ref[k]["supported"] == s[k]["supported"], k
    for k, field in [("multihop", "bridge_decodable_from"), ("multihop", "answer_decodable_from"),
                     ("last-token", "sufficient_from"), ("routes", "largest_single_route")]:
        assert ref[k][field] == s[k][field], (k, field)


def test_demo_command_prints_verdicts_and_writes_report_and_json(demo_run, tmp_path, monkeypatch, capsys):
    import interp.demo

    monkeypatch.setattr(interp.demo, "run_investigations", lambda sizes, console=None: demo_run.results)
    out = tmp_path / "r" / "demo.html"
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--fast", "--out", str(out)])
    assert e.value.code in (0, None)
    stdout = capsys.readouterr().out
    assert "report written" in stdout and out.name in stdout
    assert json.loads(out.with_suffix(".json").read_text()) == demo_run.summary
    # no temp files left; the tidy frames beside the report, one CSV per investigation
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo.html", "demo.json", "demo_data"]
    assert sorted(p.name for p in (out.parent / "demo_data").iterdir()) == sorted(f"{k}.csv" for k in KEYS)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (make test installs it as root)")
def test_report_renders_in_headless_chromium(demo_run, tmp_path_factory):
    page = render(demo_run.report)
    assert page.script_errors == 0
    assert page.n_plot_divs >= 5 and page.n_rendered == page.n_plot_divs
    assert page.blank_figures == 0  # every drawn figure has traces
    assert page.overflow_px == 0  # nothing wider than the window (tables scroll inside their box)
    # a full-page screenshot among the test artefacts, to look at
    png = screenshot(demo_run.report, tmp_path_factory.mktemp("screenshots") / "demo.png", page.height_px)
    print(f"screenshot of the demo report: {png}")
    assert png.stat().st_size > 50_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
