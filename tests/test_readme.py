"""The README is executable and its numbers are checked, so it cannot go stale silently.

- every ```python block runs as written (in a fresh namespace, in order);
- every number tagged `NUMBER<!-- demo: KEY/PATH -->` (or `VALUE [LOW, HIGH]<!-- demo: ... -->`,
  or `NN%<!-- ... -->` for a share) equals, to the digits it shows, the value at that path in
  `data/demo.json`, the summary a full `interp demo` run writes (`reports/demo.json`; refresh with
  `interp demo && cp reports/demo.json data/demo.json`, then edit the README until this passes);
  `NUMBER<!-- organism: NAME/PATH -->` the same in a shipped organism's manifest;
- the declared-circuit table is the shipped manifests' circuits, the leaderboard table is
  bench/leaderboard.csv (as `interp.circuits.leaderboard_markdown` writes it), and the seeds
  table's rows are bench/seeds.json's;
- `data/demo.json` itself agrees with this code: the suite's own (fast) demo run must reach the
  same verdicts and layers (tests/test_demo.py::test_reference_summary_matches_this_code).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
REFERENCE = ROOT / "data" / "demo.json"

NUM = r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?"  # 16,000 or 0.968
TAG = re.compile(rf"(?P<value>{NUM})(?P<pct>%?)(?: \[(?P<low>{NUM}), (?P<high>{NUM})\])?\s*"
                 rf"<!-- (?P<src>demo|organism): (?P<path>.+?) -->")
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)


def lookup(data: dict, path: str, source: str = "data/demo.json") -> object:
    node: object = data
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"README tag {path!r}: expected key {part!r} in {source}, got "
                           f"{sorted(node) if isinstance(node, dict) else node!r}")
        node = node[part]
    return node


def agrees(shown: str, actual: float, percent: bool) -> bool:
    """`shown` is `actual` rounded to the digits shown (x100 for a percentage)."""
    shown = shown.replace(",", "")
    digits = len(shown.split(".")[1]) if "." in shown else 0
    want = actual * 100 if percent else actual
    return abs(float(shown) - want) <= 0.5 * 10 ** -digits + 1e-9


def test_readme_has_python_snippets():
    assert SNIPPETS, "the README's examples are ```python blocks"


@pytest.mark.parametrize("i", range(len(SNIPPETS)))
def test_readme_snippet_runs(i, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a snippet that writes files writes them here
    exec(compile(SNIPPETS[i], f"README.md python block {i + 1}", "exec"), {"__name__": "__readme__"})


def stale_tags(tags: list[re.Match], data: dict, source: str, path_of=lambda p: p) -> list[str]:
    """The tagged numbers that differ from `data` at their path."""
    stale = []
    for m in tags:
        node = lookup(data, path_of(m["path"]), source)
        pct = bool(m["pct"])
        if isinstance(node, dict):
            pairs = [(m["value"], node["value"])] + ([(m["low"], node["low"]), (m["high"], node["high"])]
                                                     if m["low"] is not None else [])
        else:
            assert m["low"] is None, f"{m['path']}: the README shows a CI, {source} has one number"
            pairs = [(m["value"], node)]
        for shown, actual in pairs:
            if actual is None or not agrees(shown, float(actual), pct):
                stale.append(f"{m['path']}: README says {shown}{m['pct']}, {source} has {actual}")
    return stale


def test_readme_numbers_match_the_demo_summary():
    data = json.loads(REFERENCE.read_text())
    tags = [m for m in TAG.finditer(README) if m["src"] == "demo"]
    tagged = {m["path"].split("/")[0] for m in tags}
    assert {"multihop", "plan-ahead", "decay", "last-token", "routes"} <= tagged, tagged
    stale = stale_tags(tags, data, "data/demo.json")
    assert not stale, "README numbers differ from data/demo.json:\n" + "\n".join(stale)


def test_readme_numbers_match_the_shipped_manifests():
    tags = [m for m in TAG.finditer(README) if m["src"] == "organism"]
    names = {m["path"].split("/")[0] for m in tags}
    assert {"induction", "induction-1layer"} <= names, names
    stale = []
    for name in sorted(names):
        manifest = json.loads((ROOT / "data" / "organisms" / name / "manifest.json").read_text())
        mine = [m for m in tags if m["path"].split("/")[0] == name]
        stale += stale_tags(mine, manifest, f"data/organisms/{name}/manifest.json", lambda p: p.split("/", 1)[1])
    assert not stale, "README numbers differ from the shipped manifests:\n" + "\n".join(stale)


def _table(heading: str) -> list[list[str]]:
    """The cells of the first Markdown table whose header row starts with `heading`."""
    lines = README.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_readme_circuit_table_is_the_shipped_circuits():
    from interp.circuits import CIRCUIT_ORGANISMS, circuit_of

    rows = {r[0].strip("`"): r for r in _table("| organism | declared edges")}
    assert set(rows) == set(CIRCUIT_ORGANISMS), sorted(rows)
    for name in CIRCUIT_ORGANISMS:
        c = circuit_of(name)
        edges = ", ".join(f"L{e.layer}H{e.head} {e.query}←{e.key} ({e.share:.2f})" for e in c.edges)
        ev = c.evidence
        want = [f"`{name}`", edges, f"{c.declared_share:.3f} / {c.undeclared_share:.3f}",
                f"{ev['max_undeclared_share']:.3f}", f"{ev['n_prompts']}, {ev['n_candidates']}"]
        assert rows[name] == want, (name, rows[name], want)


def test_readme_leaderboard_is_bench_leaderboard_csv():
    import pandas as pd

    from interp.circuits import leaderboard_markdown

    table = leaderboard_markdown(pd.read_csv(ROOT / "bench" / "leaderboard.csv"))
    assert table in README, "README leaderboard differs from bench/leaderboard.csv; paste:\n" + table


def test_readme_seeds_table_is_bench_seeds_json():
    runs = {(r["organism"], r["seed"]): r for r in json.loads((ROOT / "bench" / "seeds.json").read_text())}
    rows = _table("| organism | seed | train s")
    assert {(r[0].strip("`"), int(r[1])) for r in rows} == set(runs), "README seeds table rows != bench/seeds.json"
    names = {"induction": "best_induction_score", "prev-token": "best_prev_token_score", "loss": "loss_repeated_half"}
    for r in rows:
        run = runs[(r[0].strip("`"), int(r[1]))]
        seconds, *steps = re.findall(NUM, r[2])
        assert agrees(seconds, run["train_seconds"], False), (r, run["train_seconds"])
        if steps:
            assert agrees(steps[0], run["steps"], False), (r, run["steps"])
        assert r[3].startswith("pass" if run["accepted"] else "fail"), (r, run["accepted"])
        for label, value in re.findall(rf"(induction|prev-token|loss) ({NUM})", r[3]):
            assert agrees(value, run["metrics"][names[label]], False), (r, label, run["metrics"][names[label]])
        for cell, key in ((r[4], "same_circuit"), (r[5], "same_roles")):
            assert cell.startswith("—") if key not in run else cell.startswith("yes" if run[key] else "no"), (r, key)


def test_tag_parser_and_rounding():
    text = ("iia 1.000 [0.990, 1.000]<!-- demo: a/b --> and 95%<!-- demo: c --> from layer 2<!-- demo: d -->, "
            "16,000<!-- organism: x/steps -->")
    got = [(m["value"], m["low"], m["high"], m["pct"], m["src"], m["path"]) for m in TAG.finditer(text)]
    assert got == [("1.000", "0.990", "1.000", "", "demo", "a/b"), ("95", None, None, "%", "demo", "c"),
                   ("2", None, None, "", "demo", "d"), ("16,000", None, None, "", "organism", "x/steps")]
    assert agrees("16,000", 16000, False) and not agrees("16,000", 15999, False)
    assert agrees("0.62", 0.6249, False) and not agrees("0.62", 0.6251, False)
    assert agrees("95", 0.951, True) and not agrees("95", 0.96, True) and agrees("2", 2, False)
