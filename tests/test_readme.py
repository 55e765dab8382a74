"""The README is executable and its numbers are checked, so it cannot go stale silently.

- every ```python block runs as written (in a fresh namespace, in order);
- every number tagged `NUMBER<!-- demo: KEY/PATH -->` (or `VALUE [LOW, HIGH]<!-- demo: ... -->`,
  or `NN%<!-- ... -->` for a share) equals, to the digits it shows, the value at that path in
  `data/demo.json`, the summary a full `interp demo` run writes (`reports/demo.json`; refresh with
  `interp demo && cp reports/demo.json data/demo.json`, then edit the README until this passes);
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

NUM = r"-?\d+(?:\.\d+)?"
TAG = re.compile(rf"(?P<value>{NUM})(?P<pct>%?)(?: \[(?P<low>{NUM}), (?P<high>{NUM})\])?\s*<!-- demo: (?P<path>.+?) -->")
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)


def lookup(data: dict, path: str) -> object:
    node: object = data
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"README tag {path!r}: expected key {part!r} in data/demo.json, got "
                           f"{sorted(node) if isinstance(node, dict) else node!r}")
        node = node[part]
    return node


def agrees(shown: str, actual: float, percent: bool) -> bool:
    """`shown` is `actual` rounded to the digits shown (x100 for a percentage)."""
    digits = len(shown.split(".")[1]) if "." in shown else 0
    want = actual * 100 if percent else actual
    return abs(float(shown) - want) <= 0.5 * 10 ** -digits + 1e-9


def test_readme_has_python_snippets():
    assert SNIPPETS, "the README's examples are ```python blocks"


@pytest.mark.parametrize("i", range(len(SNIPPETS)))
def test_readme_snippet_runs(i, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a snippet that writes files writes them here
    exec(compile(SNIPPETS[i], f"README.md python block {i + 1}", "exec"), {"__name__": "__readme__"})


def test_readme_numbers_match_the_demo_summary():
    data = json.loads(REFERENCE.read_text())
    tags = list(TAG.finditer(README))
    tagged = {m["path"].split("/")[0] for m in tags}
    assert {"multihop", "plan-ahead", "decay", "last-token", "routes"} <= tagged, tagged
    stale = []
    for m in tags:
        node = lookup(data, m["path"])
        pct = bool(m["pct"])
        if isinstance(node, dict):
            pairs = [(m["value"], node["value"])] + ([(m["low"], node["low"]), (m["high"], node["high"])]
                                                     if m["low"] is not None else [])
        else:
            assert m["low"] is None, f"{m['path']}: the README shows a CI, data/demo.json has one number"
            pairs = [(m["value"], node)]
        for shown, actual in pairs:
            if actual is None or not agrees(shown, float(actual), pct):
                stale.append(f"{m['path']}: README says {shown}{m['pct']}, data/demo.json has {actual}")
    assert not stale, "README numbers differ from data/demo.json:\n" + "\n".join(stale)


def test_tag_parser_and_rounding():
    text = "iia 1.000 [0.990, 1.000]<!-- demo: a/b --> and 95%<!-- demo: c --> from layer 2<!-- demo: d -->"
    got = [(m["value"], m["low"], m["high"], m["pct"], m["path"]) for m in TAG.finditer(text)]
    assert got == [("1.000", "0.990", "1.000", "", "a/b"), ("95", None, None, "%", "c"), ("2", None, None, "", "d")]
    assert agrees("0.62", 0.6249, False) and not agrees("0.62", 0.6251, False)
    assert agrees("95", 0.951, True) and not agrees("95", 0.96, True) and agrees("2", 2, False)
