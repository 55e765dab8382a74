"""`interp demo`: every investigation on the shipped organisms, in one offline HTML report, and
its verdicts and key numbers (with CIs, n and baseline) in a JSON file beside it.

The JSON (`reports/demo.json` next to `reports/demo.html`) is what the tests check against the
organisms' known ground truth and what the README's quoted numbers are checked against
(`tests/test_readme.py`). Its keys are flat, dotted names such as `multihop.iia`; each number
is `{"value", "low", "high"}` (a CI) or a plain number.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from interp.atomic import atomic_file
from interp.hypotheses import run as runner
from interp.hypotheses.base import estimate
from interp.models import list_organisms, read_manifest
from interp.progress import progress
from interp.report import CI_METHOD, QUESTIONS, Provenance, Report, Section, section
from interp.stats import Estimate

INTRO = {
    "multihop": "organism:multihop reads a hop marker, four one-token facts a>b, b>c, d>e, e>f (random order) "
                "and the queried entity a, and answers c (two hops; one hop is the control). Probes and the "
                "logit lens read the bridge b and the answer c by layer; interchange interventions patch the "
                "last position's residual from a prompt whose bridge differs.",
    "plan-ahead": "organism:planning emits a multi-token word chosen by an earlier cue; a linear future lens reads "
                  "the hidden state at the position before the word.",
    "decay": "Three retrieval organisms that differ only in positional scheme (learned, rotary, none) retrieve "
             "the value of a queried key whose pair sits d tokens back.",
    "last-token": "For each layer l: cut the last position's attention to the context at layers >= l "
                  "(knockout), transplant its clean residual into a neutral context, or replace the "
                  "context's keys and values from a neutral run.",
    "routes": "organism:induction copies B after a repeated A. Exact path patching measures each route from the "
              "token after A's first occurrence to the prediction, batched over prompts.",
}


def _zoo_section() -> Section:
    rows = []
    for name in list_organisms():
        m = read_manifest(f"organism:{name}")
        accepted = "; ".join(f"{a.get('what', k)}: {a['value']:.3f} (needs {a['op']} {a['threshold']})"
                             for k, a in m.get("acceptance", {}).items())
        rows.append({"organism": name, "task": m.get("task", ""), "known mechanism": m.get("mechanism", ""),
                     "acceptance (held-out)": accepted,
                     "training": f"{m.get('steps')} steps, {m.get('train_seconds', 0):.0f} s, seed {m.get('seed', '?')}"})
    return Section("The shipped organisms", "Small transformers trained here on tasks with known mechanisms; "
                   "each passed its acceptance test on held-out examples.", [], summary=pd.DataFrame(rows))


TITLES = {"multihop": "Multi-hop planning: the bridge entity",
          "plan-ahead": "Multi-hop planning: tokens beyond the next one",
          "decay": "Positional-information decay",
          "last-token": "Last-token sufficiency (multihop)",
          "routes": "Residual vs K/V routes (induction)"}


def _jobs(sizes: runner.Sizes) -> dict[str, Callable[[], Any]]:
    return {"multihop": lambda: runner.run_multihop(n=sizes.multihop),
            "plan-ahead": lambda: runner.run_plan_ahead(n=sizes.plan),
            "decay": lambda: runner.run_decay(n_per=sizes.decay_per_distance),
            "last-token": lambda: runner.run_last_token(n=sizes.last_token),
            "routes": lambda: runner.run_routes(n=sizes.routes)}


def run_investigations(sizes: runner.Sizes, console: Console | None = None) -> dict[str, Any]:
    """Each investigation's typed result, by key (`multihop`, `plan-ahead`, `decay`, `last-token`, `routes`).

    Progress: a spinner on a terminal; otherwise (a log file, CI) a plain line when each
    investigation starts and ends, and one every 30 s while it runs."""
    console = console or Console()
    results: dict[str, Any] = {}
    jobs = _jobs(sizes)
    for i, (key, job) in enumerate(jobs.items(), 1):
        t0 = time.perf_counter()
        with progress(console, f"[{i}/{len(jobs)}] running {key}"):
            results[key] = job()
        console.print(f"[bold]{key}[/] ({time.perf_counter() - t0:.1f} s): {results[key].verdict}")
    return results


def training_length(spec: str = "organism:retrieval-learned") -> int | None:
    """The longest query-to-fact distance the retrieval organisms saw in training (their manifest's task)."""
    try:
        task = read_manifest(spec).get("task", "")
    except (FileNotFoundError, ValueError):
        return None
    m = re.search(r"uniform over \d+\.\.(\d+)", task)
    return int(m.group(1)) if m else None


def _figure(key: str, result: Any) -> Any:
    return result.plot(training_length=training_length()) if key == "decay" else result.plot()


SPECS = {"multihop": ["organism:multihop"], "plan-ahead": ["organism:planning"],
         "decay": ["organism:retrieval-learned", "organism:retrieval-rotary", "organism:retrieval-nope"],
         "last-token": ["organism:multihop"], "routes": ["organism:induction"]}


def run_demo(out: str | Path, *, fast: bool = False, console: Console | None = None,
             results: Mapping[str, Any] | None = None, shared_js: bool = False,
             command: str | None = None) -> Path:
    """Run all investigations on the organisms (or take their `results`); write the report to
    `out` (tidy frames as CSVs in `STEM_data/` beside it) and its summary to `out` with a `.json`
    suffix; return the report's path. `shared_js`: plotly.js as one file in `out`'s folder."""
    sizes = runner.Sizes.fast() if fast else runner.Sizes()
    results = dict(results) if results is not None else run_investigations(sizes, console)
    specs = sorted({s for k in results for s in SPECS.get(k, [])})
    prov = Provenance.collect(specs, command=command or ("interp demo" + (" --fast" if fast else "")),
                              seeds={"datasets and baselines": 0})
    report = Report("interp demo: investigations on the shipped model organisms", provenance=prov,
                    intro="Each section: the question, the verdict the investigation states (only when the effect "
                          "clears its baseline), the figure, a summary table and how it was measured. Intervals "
                          f"are {CI_METHOD}. Sizes: " + ", ".join(f"{k} {v}" for k, v in vars(sizes).items()) + ".")
    report.sections.append(_zoo_section())
    for key, result in results.items():
        report.sections.append(section(TITLES[key], result, INTRO[key], question=QUESTIONS[key], key=key,
                                       figure=_figure(key, result)))
    path = report.write(out, shared_js=shared_js)
    write_json(Path(out).with_suffix(".json"), summary(results, sizes))
    return path


# ------------------------------------------------------------------------------ machine-readable summary

def _ci(e: Estimate) -> dict[str, float]:
    return {"value": e.value, "low": e.low, "high": e.high}


def _mean(x: Any) -> float:
    return float(x.double().mean())


def _multihop(r: Any) -> dict[str, Any]:
    bridge_at, answer_at = r.decodable_from[("last", "bridge")], r.decodable_from[("last", "answer")]
    out: dict[str, Any] = {"bridge_decodable_from": bridge_at, "answer_decodable_from": answer_at,
                           "n": int(r.clean.correct.numel()), "baseline": "random-initialised model of the same shape",
                           "clean_accuracy": _mean(r.clean.correct)}
    if bridge_at is not None:
        p, b = r.probes[("last", "bridge")], r.baseline_probes[("last", "bridge")]
        i = p.layers.index(bridge_at)
        out["bridge_probe"] = {"value": float(p.value[i]), "low": float(p.ci_low[i]), "high": float(p.ci_high[i])}
        out["bridge_probe_control"] = float(p.control[i])
        out["bridge_probe_baseline"] = {"value": float(b.value[i]), "low": float(b.ci_low[i]), "high": float(b.ci_high[i])}
        out["iia"] = _ci(r.iia_estimate("last", bridge_at))
        out["iia_baseline"] = _mean(r.baseline_iia["last"][bridge_at].correct)
    return out


def _plan(r: Any) -> dict[str, Any]:
    lens, out = r.lens, {"baseline": "bigram predictor; the same lens on a random-initialised model"}
    for j, off in enumerate(lens.offsets):
        out[f"t{off}"] = {"accuracy_last_layer": {"value": float(lens.accuracy[j, -1]), "low": float(lens.ci_low[j, -1]),
                                                  "high": float(lens.ci_high[j, -1])},
                          "bigram": float(lens.baselines[j, 0, 0]),
                          "baseline_model_last_layer": float(r.baseline.accuracy[j, -1])}
    return out


def _decay(r: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"distances": list(r.distances), "baseline": "random-initialised models; shuffled labels"}
    for name, m in r.models.items():
        key = name.removeprefix("retrieval-")
        d_far = max(m.clean)
        out[key] = {"profile": m.profile, "n_per_distance": int(m.clean[d_far].correct.numel()),
                    "accuracy": {str(d): _ci(m.accuracy(d)) for d in sorted(m.clean)},
                    "position_r2_first_layer": float(m.position_probe.value[0]),
                    "position_r2_last_layer": float(m.position_probe.value[-1]),
                    "position_r2_shuffled_max": float(m.position_probe.shuffled.max())}
    return out


def _last_token(r: Any) -> dict[str, Any]:
    return {"n": int(r.clean.correct.numel()), "clean_accuracy": _mean(r.clean.correct),
            "sufficient_from": r.sufficient_from, "baseline": "random-initialised model of the same shape",
            "knockout_accuracy": {str(layer): _ci(estimate(o.correct)) for layer, o in zip(r.layers, r.knockout, strict=True)},
            "knockout_final_max_kl": float(r.knockout[-1].kl.max())}


def _routes(r: Any) -> dict[str, Any]:
    by = {x.name: x for x in r.routes}
    single = max((x for x in r.routes if x.kind != "joint"), key=lambda x: float(x.effect.mean()))
    out = {"n": int(r.total.numel()), "baseline": "random-initialised model of the same shape",
           "baseline_total": _mean(r.baseline_total), "largest_single_route": single.name,
           "largest_single_route_share": r.share(single)}
    for name, x in by.items():
        if x.kind == "joint":
            out[f"share {name}"] = r.share(x)
    return out


SUMMARIES: dict[str, Callable[[Any], dict[str, Any]]] = {
    "multihop": _multihop, "plan-ahead": _plan, "decay": _decay, "last-token": _last_token, "routes": _routes}


def _finite(x: Any) -> Any:
    """JSON has no NaN: a non-finite number becomes null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def summary(results: Mapping[str, Any], sizes: runner.Sizes) -> dict[str, Any]:
    """Per investigation: the verdict (supported, sentence) and its key numbers."""
    out: dict[str, Any] = {"sizes": vars(sizes).copy()}
    for key, r in results.items():
        out[key] = {"supported": bool(r.verdict.supported), "verdict": str(r.verdict), **SUMMARIES[key](r)}
    return _finite(out)


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    """Write `data` as JSON atomically (interp.atomic: temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return path
