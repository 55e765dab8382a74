"""`interp demo`: every investigation on the shipped organisms, in one offline HTML report."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from rich.console import Console

from interp.hypotheses import run as runner
from interp.models import list_organisms, read_manifest
from interp.report import Report, Section

INTRO = {
    "multihop": "organism:multihop reads a hop marker, four one-token facts a>b, b>c, d>e, e>f (random order) "
                "and the queried entity a, and answers c (two hops; one hop is the control). Probes and the "
                "logit lens read the bridge b and the answer c by layer; interchange interventions patch the "
                "last position's residual from a prompt whose bridge differs.",
    "plan-ahead": "organism:planning emits a multi-token word chosen by an earlier cue. At the position before "
                  "the word, does the hidden state already encode the 2nd and 3rd tokens ahead?",
    "decay": "Three retrieval organisms that differ only in positional scheme (learned, rotary, none) retrieve "
             "the value of a queried key whose pair sits d tokens back.",
    "last-token": "For each layer l: cut the last position's attention to the context at layers >= l "
                  "(knockout), transplant its clean residual into a neutral context, or replace the "
                  "context's keys and values from a neutral run.",
    "routes": "organism:induction copies B after a repeated A. Which routes carry the information from A's "
              "first occurrence to the prediction: residual-first or K/V-first, through keys or values?",
}


def _zoo_section() -> Section:
    rows = []
    for name in list_organisms():
        m = read_manifest(f"organism:{name}")
        accepted = "; ".join(f"{a.get('what', k)}: {a['value']:.3f} (needs {a['op']} {a['threshold']})"
                             for k, a in m.get("acceptance", {}).items())
        rows.append({"organism": name, "task": m.get("task", ""), "known mechanism": m.get("mechanism", ""),
                     "acceptance (held-out)": accepted, "training": f"{m.get('steps')} steps, "
                                                                   f"{m.get('train_seconds', 0):.0f} s"})
    table = pd.DataFrame(rows).to_html(index=False, border=0)
    return Section("The shipped organisms", "Small transformers trained here on tasks with known mechanisms.",
                   [], table)


def run_demo(out: str | Path, *, fast: bool = False, console: Console | None = None) -> Path:
    """Run all investigations on the organisms; write the report to `out`; return its path."""
    console = console or Console()
    sizes = runner.Sizes.fast() if fast else runner.Sizes()
    report = Report("interp demo: investigations on the shipped model organisms")
    report.sections.append(_zoo_section())
    jobs = [
        ("multihop", "Multi-hop planning: the bridge entity", lambda: runner.run_multihop(n=sizes.multihop)),
        ("plan-ahead", "Multi-hop planning: tokens beyond the next one", lambda: runner.run_plan_ahead(n=sizes.plan)),
        ("decay", "Positional-information decay", lambda: runner.run_decay(n_per=sizes.decay_per_distance)),
        ("last-token", "Last-token sufficiency (multihop)", lambda: runner.run_last_token(n=sizes.last_token)),
        ("routes", "Residual vs K/V routes (induction)", lambda: runner.run_routes(n=sizes.routes)),
    ]
    for key, title, job in jobs:
        t0 = time.perf_counter()
        with console.status(f"running {key} ..."):
            result = job()
        console.print(f"[bold]{key}[/] ({time.perf_counter() - t0:.1f} s): {result.verdict}")
        report.sections.append(runner.section(title, result, INTRO[key]))
    return report.write(out)
