"""Offline HTML reports a researcher can publish from.

A report opens with a header (the command, the date, the toolkit version, the git commit when
there is one, each model's spec, shape and weight fingerprint, the seeds). Each section of an
investigation then shows: the question, the verdict, the figure, a compact summary table (a few
rows of formatted numbers), a "how measured" line (n, the CI method and level, the baseline) and
a link to the full tidy frame, written as a CSV beside the report (``NAME_data/SECTION.csv``).

plotly.js is embedded once per file by default, so one file renders with no network; with
``shared_js=True`` it is written once as ``plotly.min.js`` in the report's folder and every
report of that folder refers to it (still offline, ~4.6 MB saved per extra report).
"""

from __future__ import annotations

import datetime as _dt
import html
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from interp.atomic import atomic_file

CI_METHOD = "95% percentile bootstrap over examples (1000 resamples)"
PLOTLY_JS = "plotly.min.js"
# what a headless browser reads back (tests/browser.py): figures drawn without a single trace,
# horizontal overflow of the page (px) and its full height, set on <html> once the page settled
PAGE_CHECK = """<script>window.addEventListener('load',function(){setTimeout(function(){
var d=document.documentElement,divs=document.querySelectorAll('.plotly-graph-div'),blank=0;
divs.forEach(function(g){if(!g.querySelector('.main-svg .trace'))blank++;});
d.setAttribute('data-blank-figures',String(blank));
d.setAttribute('data-overflow-px',String(Math.max(0,d.scrollWidth-d.clientWidth)));
d.setAttribute('data-page-height',String(d.scrollHeight));},300);});</script>"""

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:auto;padding:1em 1.5em;
color:#222;line-height:1.45;overflow-wrap:break-word}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.88em;margin:.6em 0;max-width:100%;display:block;overflow-x:auto}
td,th{border:1px solid #d4d4d4;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.question{font-style:italic}.verdict{padding:.5em .8em;border-left:4px solid #2ca02c;background:#f3faf3}
.verdict.none{border-color:#999;background:#f6f6f6}.measured{font-size:.88em;color:#444}
.header td{border:none;padding:1px 10px 1px 0}.header{font-size:.9em}
.plotly-graph-div{max-width:100%}
"""


# ------------------------------------------------------------------------------- provenance

@dataclass(frozen=True)
class ModelInfo:
    """One model a report's numbers come from: its spec, its shape and its weight fingerprint."""

    spec: str
    fingerprint: str
    shape: str

    @staticmethod
    def of(spec: str, model: Any) -> ModelInfo:
        from interp.arch import Arch
        from interp.models import weights_fingerprint

        a = Arch.of(model)
        kv = getattr(a, "n_kv_heads", None) or getattr(a, "n_key_value_heads", None)
        heads = f"{a.n_heads} heads" + (f" ({kv} KV groups)" if kv and kv != a.n_heads else "")
        n_params = sum(p.numel() for p in model.parameters())
        return ModelInfo(spec, weights_fingerprint(model),
                         f"{a.n_layers} layers, d_model {a.d_model}, {heads}, {n_params / 1e6:.2f}M parameters")


@dataclass(frozen=True)
class Provenance:
    """Where a report's numbers come from (the report's header)."""

    command: str
    date: str
    version: str
    commit: str | None
    models: tuple[ModelInfo, ...] = ()
    seeds: Mapping[str, int] = field(default_factory=dict)

    @staticmethod
    def collect(models: Mapping[str, Any] | Sequence[str] = (), *, command: str | None = None,
                seeds: Mapping[str, int] | None = None) -> Provenance:
        """The current command line, UTC time, toolkit version and git commit; `models`: spec ->
        loaded model (or specs, loaded here) for their fingerprints."""
        from interp import __version__

        if not isinstance(models, Mapping):
            from interp.models import load_model

            models = {s: load_model(s) for s in models}
        cmd = command if command is not None else "interp " + shlex.join(sys.argv[1:])
        now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        return Provenance(cmd, now, __version__, git_commit(),
                          tuple(ModelInfo.of(s, m) for s, m in models.items()), dict(seeds or {}))

    def to_html(self) -> str:
        rows = [("command", f"<code>{html.escape(self.command)}</code>"), ("date", html.escape(self.date)),
                ("interp", html.escape(self.version) + (f" (git {html.escape(self.commit)})" if self.commit
                                                         else " (not a git checkout)"))]
        if self.seeds:
            rows.append(("seeds", html.escape(", ".join(f"{k} {v}" for k, v in self.seeds.items()))))
        for m in self.models:
            rows.append(("model", f"<code>{html.escape(m.spec)}</code>: {html.escape(m.shape)}; weights "
                                  f"sha256 <code>{html.escape(m.fingerprint[:16])}</code>"))
        body = "".join(f"<tr><td><b>{k}</b></td><td>{v}</td></tr>" for k, v in rows)
        return f"<table class='header'>{body}</table>"


def git_commit(where: Path | None = None) -> str | None:
    """The short commit of the checkout holding the toolkit (with ``+dirty`` for local edits), or None."""
    where = where or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=where, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) or None


# ------------------------------------------------------------------------------- sections

@dataclass
class Section:
    """One part of a report. Only `title` is required; an investigation's section has them all."""

    title: str
    text: str = ""
    figures: list[go.Figure] = field(default_factory=list)
    table_html: str = ""
    question: str = ""
    verdict: str = ""
    supported: bool | None = None
    summary: pd.DataFrame | None = None
    how_measured: str = ""
    frame: pd.DataFrame | None = None  # the full tidy frame: written as a CSV beside the report
    key: str = ""  # file-name stem of that CSV (default: from the title)

    def csv_name(self) -> str:
        return (self.key or re.sub(r"[^A-Za-z0-9]+", "-", self.title).strip("-").lower() or "section") + ".csv"


@dataclass
class Report:
    """An ordered list of sections rendered to one HTML file (offline)."""

    title: str
    sections: list[Section] = field(default_factory=list)
    provenance: Provenance | None = None
    intro: str = ""

    def add(self, title: str, text: str = "", figures: list[go.Figure] | None = None,
            table_html: str = "") -> Section:
        s = Section(title, text, list(figures or []), table_html)
        self.sections.append(s)
        return s

    def to_html(self, *, data_dir: str | None = None, shared_js: bool = False) -> str:
        """The page; `data_dir`: the folder (relative to the page) the sections' CSVs are linked in."""
        js = (f"<script src='{PLOTLY_JS}'></script>" if shared_js
              # plotly.js once, inline: the report must render with no network
              else f"<script type='text/javascript'>{get_plotlyjs()}</script>")
        parts = [
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
            "<meta name='viewport' content='width=device-width, initial-scale=1'>",
            f"<title>{html.escape(self.title)}</title><style>{CSS}</style>",
            # count script errors on the page itself, so a headless browser can check them
            "<script>window.__scriptErrors=0;window.addEventListener('error',function(){"
            "window.__scriptErrors++;document.documentElement.setAttribute('data-script-errors',"
            "String(window.__scriptErrors));});</script>", js, "</head><body>",
            f"<h1>{html.escape(self.title)}</h1>",
        ]
        if self.provenance is not None:
            parts.append(self.provenance.to_html())
        if self.intro:
            parts.extend(f"<p>{html.escape(p)}</p>" for p in self.intro.split("\n\n"))
        for s in self.sections:
            parts.append(_section_html(s, data_dir))
        parts.append(PAGE_CHECK)
        parts.append("</body></html>")
        return "\n".join(parts)

    def write(self, path: str | Path, *, shared_js: bool = False) -> Path:
        """Write the report atomically; the sections' tidy frames go to ``STEM_data/*.csv`` beside
        it. `shared_js`: refer to one ``plotly.min.js`` in the report's folder (written if absent)
        instead of embedding plotly.js."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data_dir = f"{path.stem}_data"
        frames = [s for s in self.sections if s.frame is not None]
        if frames:
            (path.parent / data_dir).mkdir(exist_ok=True)
            for s in frames:
                with atomic_file(path.parent / data_dir / s.csv_name()) as tmp:
                    s.frame.to_csv(tmp, index=False)  # type: ignore[union-attr]
        if shared_js:
            js = get_plotlyjs()
            target = path.parent / PLOTLY_JS
            if not target.is_file() or target.read_text(encoding="utf-8") != js:
                with atomic_file(target) as tmp:
                    tmp.write_text(js, encoding="utf-8")
        with atomic_file(path) as tmp:
            tmp.write_text(self.to_html(data_dir=data_dir if frames else None, shared_js=shared_js), encoding="utf-8")
        return path


def _section_html(s: Section, data_dir: str | None) -> str:
    out = [f"<section><h2>{html.escape(s.title)}</h2>"]
    if s.question:
        out.append(f"<p class='question'><b>Question.</b> {html.escape(s.question)}</p>")
    if s.text:
        out.extend(f"<p>{html.escape(p)}</p>" for p in s.text.split("\n\n"))
    if s.verdict:
        cls = "verdict" if s.supported is not False else "verdict none"
        out.append(f"<p class='{cls}'><b>Verdict.</b> {html.escape(s.verdict)}</p>")
    for fig in s.figures:
        out.append(pio.to_html(fig, include_plotlyjs=False, full_html=False, config={"responsive": True}))
    if s.summary is not None and len(s.summary):
        out.append(_table_html(s.summary))
    if s.table_html:
        out.append(s.table_html)
    if s.how_measured:
        out.append(f"<p class='measured'><b>How measured.</b> {html.escape(s.how_measured)}</p>")
    if s.frame is not None and data_dir is not None:
        href = f"{data_dir}/{s.csv_name()}"
        out.append(f"<p class='measured'>Full tidy table ({len(s.frame)} rows, columns "
                   f"{html.escape(', '.join(map(str, s.frame.columns)))}): "
                   f"<a href='{html.escape(href)}' download>{html.escape(href)}</a></p>")
    out.append("</section>")
    return "\n".join(out)


def _table_html(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for _, r in frame.iterrows():
        cells = []
        for v in r:
            text = fmt(v) if isinstance(v, float) else str(v)
            num = bool(re.fullmatch(r"[-+]?[\d.]+%?( \[.*\])?|—", text))
            cells.append(f"<td{' class=num' if num else ''}>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def figures_to_html(figures: list[go.Figure], path: str | Path, title: str = "interp") -> Path:
    """One offline HTML page holding `figures`."""
    r = Report(title)
    r.add(title, figures=figures)
    return r.write(path)


# ------------------------------------------------------------------------------- formatting

def fmt(v: Any, digits: int = 3) -> str:
    """A number for a table: fixed digits, '—' for a missing one, an Estimate as 'v [lo, hi]'."""
    if v is None:
        return "—"
    if hasattr(v, "low") and hasattr(v, "high") and hasattr(v, "value"):
        return f"{fmt(v.value, digits)} [{fmt(v.low, digits)}, {fmt(v.high, digits)}]"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if x != x:
        return "—"
    if abs(x) < 0.5 * 10 ** -digits:
        x = 0.0  # no "-0.000"
    return f"{x:.{digits}f}"


def _pct(x: float) -> str:
    return "—" if x != x else f"{100 * x:.0f}%"


# ------------------------------------------------------------------------------- summaries

@dataclass(frozen=True)
class Summary:
    """A compact table of an investigation's key numbers and how they were measured."""

    table: pd.DataFrame
    how_measured: str


def _measured(n: int | str, baseline: str, seed: int | None = None) -> str:
    s = f" (seed {seed})" if seed is not None else ""
    return f"n = {n} prompts; CIs: {CI_METHOD}; baseline: {baseline}{s}."


def _baseline_text(r: Any, has: bool, text: str) -> str:
    """`text` (what the baseline was) when the result has one, else its `baseline_note`."""
    return text if has else f"no model baseline ({getattr(r, 'baseline_note', None) or 'none was run'})"


def _summ_multihop(r: Any) -> Summary:
    from interp.hypotheses.base import estimate
    from interp.prompts import LAST

    rows = []
    lab = r.labels
    for (pos, target), p in r.probes.items():
        b = r.baseline_probes.get((pos, target))
        at = r.decodable_from.get((pos, target))
        i = p.layers.index(at) if at is not None else len(p.layers) - 1
        rows.append({"measure": f"probe accuracy: {target} @ {pos}", "layer": lab[p.layers[i]],
                     "trained": fmt(_est(p, i)), "random-init": fmt(_est(b, i)) if b is not None else "—",
                     "decodable from": lab[at] if at is not None else "—"})
    best = max(((pn, li) for pn in r.iia for li in range(len(r.iia[pn]))),
               key=lambda k: float(r.shift_estimate(*k).value))
    bridge_at = r.decodable_from.get((LAST, "bridge"))
    at = (LAST, bridge_at) if bridge_at is not None and LAST in r.iia else best
    rows.append({"measure": f"interchange accuracy @ {at[0]}" + (" (bridge's layer)" if at != best else ""),
                 "layer": lab[at[1]], "trained": fmt(r.iia_estimate(*at)),
                 "random-init": fmt(estimate(r.baseline_iia[at[0]][at[1]].correct)) if r.baseline_iia else "—",
                 "decodable from": ""})
    rows.append({"measure": f"largest logit-difference shift (patch @ {best[0]}, nats)", "layer": lab[best[1]],
                 "trained": fmt(r.shift_estimate(*best)),
                 "random-init": fmt(r.shift_estimate(*best, baseline=True)) if r.baseline_iia_logit_diff else "—",
                 "decodable from": ""})
    rows.append({"measure": "clean two-hop accuracy", "layer": "", "trained": fmt(estimate(r.clean.correct)),
                 "random-init": "", "decodable from": ""})
    return Summary(pd.DataFrame(rows), _measured(int(r.clean.correct.numel()), _baseline_text(
        r, bool(r.baseline_iia), "random-initialised model of the same shape") + "; probe control task and shuffled "
                                                                                 "labels"))


def _est(p: Any, i: int) -> Any:
    from interp.stats import Estimate

    return Estimate(float(p.value[i]), float(p.ci_low[i]), float(p.ci_high[i]))


def _summ_plan(r: Any) -> Summary:
    from interp.stats import Estimate

    lens, rows = r.lens, []
    last = len(lens.layers) - 1
    for j, k in enumerate(lens.offsets):
        first = lens.beats_bigram(k)
        rows.append({"token": f"x[t+{k}]", "lens accuracy (last layer)":
                     fmt(Estimate(float(lens.accuracy[j, last]), float(lens.ci_low[j, last]),
                                  float(lens.ci_high[j, last]))),
                     "bigram": fmt(float(lens.baselines[j, 0, 0])),
                     "random-init model": fmt(float(r.baseline.accuracy[j, last])) if r.baseline is not None else "—",
                     "beats bigram from": lens.labels[lens.layers.index(first[0])] if first else "—",
                     "held-out tokens": int(lens.n_test_tokens[j])})
    return Summary(pd.DataFrame(rows), _measured(int(lens.n_test_examples[0]), "bigram predictor from x[t]; " +
                                                 _baseline_text(r, r.baseline is not None, "the same lens on a "
                                                                "random-initialised model")))


def _summ_decay(r: Any) -> Summary:
    rows = []
    near, far = min(r.distances), max(r.distances)
    for name, m in r.models.items():
        fit = m.decay_fit
        rows.append({"model": name, f"accuracy d={near}": fmt(m.accuracy(near)),
                     f"accuracy d={far}": fmt(m.accuracy(far)),
                     f"knockout drop d={near} (nats)": fmt(m.drop(near), 2),
                     f"knockout drop d={far} (nats)": fmt(m.drop(far), 2),
                     "position R² first → last layer": f"{fmt(float(m.position_probe.value[0]), 2)} → "
                                                        f"{fmt(float(m.position_probe.value[-1]), 2)}",
                     "profile": m.profile or "—",
                     "decay length (tokens)": fmt(fit.length, 0) if fit.length is not None else "none"})
    n = sorted({int(o.correct.numel()) for m in r.models.values() for o in m.clean.values()})
    return Summary(pd.DataFrame(rows), _measured(f"{n[0]}" + (f"–{n[-1]}" if len(n) > 1 else "") + " per distance "
                                                 f"({len(r.distances)} distances)",
                                                 "; ".join(dict.fromkeys(
                                                     _baseline_text(m, bool(m.baseline_clean),
                                                                    "random-initialised models of the same shapes")
                                                     for m in r.models.values())) + "; probes on shuffled labels"))


def _summ_last_token(r: Any) -> Summary:
    from interp.hypotheses.base import estimate

    res, kv = r.share_in_residual(), r.share_via_kv()
    rows = []
    for i, layer in enumerate(r.layers):
        rows.append({"from layer l": layer, "knockout accuracy": fmt(estimate(r.knockout[i].correct)),
                     "transplant accuracy": fmt(estimate(r.transplant[i].correct)),
                     "share in the last residual": fmt(res[i]), "share via K/V": fmt(kv[i])})
    return Summary(pd.DataFrame(rows), _measured(int(r.clean.correct.numel()), _baseline_text(
        r, r.baseline_clean is not None, "random-initialised model of the same shape")
                                                 + f"; clean accuracy {fmt(estimate(r.clean.correct))}"))


def _summ_routes(r: Any) -> Summary:
    from interp.hypotheses.base import estimate

    single = sorted((x for x in r.routes if x.kind != "joint"), key=lambda x: -abs(r.share(x)))[:4]
    joint = [x for x in r.routes if x.kind == "joint"]
    rows = [{"route": x.name, "kind": x.kind, "effect (log-prob)": fmt(x.estimate()), "share of total": _pct(r.share(x)),
             "n": int(x.effect.isfinite().sum())} for x in [*single, *joint]]
    rows.append({"route": "total (clean - corrupted)", "kind": "", "effect (log-prob)": fmt(estimate(r.total)),
                 "share of total": "100%", "n": int(r.total.numel())})
    return Summary(pd.DataFrame(rows), _measured(int(r.total.numel()), _baseline_text(
        r, r.baseline_total is not None,
        f"random-initialised model of the same shape, total "
        f"{fmt(estimate(r.baseline_total)) if r.baseline_total is not None else ''}")))


def _summ_course_correction(r: Any) -> Summary:
    n = int(r.model.m_forced.isfinite().sum())
    return Summary(r.summary(), _measured(n, _baseline_text(r, r.baseline is not None, "random-initialised model of "
                                                            "the same shape, same prompts and surprises")))


SUMMARIES: dict[str, Callable[[Any], Summary]] = {
    "MultihopResult": _summ_multihop, "PlanAheadResult": _summ_plan, "DecayResult": _summ_decay,
    "LastTokenResult": _summ_last_token, "RoutesResult": _summ_routes,
    "CourseCorrectionResult": _summ_course_correction}


def summarise(result: Any) -> Summary:
    """The compact table of an investigation's result (a generic head of its frame for others)."""
    f = SUMMARIES.get(type(result).__name__)
    if f is not None:
        return f(result)
    frame = result.to_frame()
    keep = [c for c in frame.columns if frame[c].notna().any()][:8]
    return Summary(frame[keep].head(8), f"CIs: {CI_METHOD}.")


def section(title: str, result: Any, intro: str = "", *, question: str = "", key: str = "",
            figure: go.Figure | None = None) -> Section:
    """A report section for an investigation's result: question, verdict, figure, summary table,
    how it was measured, and its full tidy frame (written as a CSV beside the report)."""
    s = summarise(result)
    verdict = result.verdict
    return Section(title, intro, [figure if figure is not None else result.plot()], question=question,
                   verdict=str(verdict), supported=bool(getattr(verdict, "supported", True)), summary=s.table,
                   how_measured=s.how_measured, frame=result.to_frame(), key=key)


QUESTIONS = {
    "multihop": "Is the bridge entity of a two-hop query computed internally, at which layer, and does "
                "patching it move the answer?",
    "plan-ahead": "Does the hidden state already encode the 2nd and 3rd tokens ahead, beyond a bigram guess?",
    "decay": "How do decodable position and the use of a fact fade with the fact's distance, per positional scheme?",
    "last-token": "From which layer does the last position's residual alone suffice for the answer?",
    "routes": "Which routes carry the information from the source to the prediction: residual-first or K/V-first, "
              "through keys or values?",
    "course-correction": "After a forced wrong token, does the model finish its plan, restart it, back off, re-plan "
                         "or drift, and which route (K/V of the context or the surprise's own residual) carries it?",
}


def report_for(name: str, result: Any, provenance: Provenance | None = None) -> Report:
    """A one-section report of `interp run NAME`."""
    r = Report(f"interp run {name}", provenance=provenance)
    r.sections.append(section(name, result, question=QUESTIONS.get(name, ""), key=name))
    return r


# ------------------------------------------------------------------------ continuous thought


def _summ_continuous(r: Any) -> Summary:
    """Per thought step: frontier nodes recovered by the probe (vs shuffled), the lens and the
    written token, for the continuous and the token-CoT model; then the patching result."""
    rows = []
    for s in r.steps:
        rows.append({"step": s.step, "model": s.model, "frontier size": fmt(s.frontier_size, 1),
                     "probe (nodes)": fmt(s.probe), "shuffled": fmt(s.shuffled), "logit lens": fmt(s.lens),
                     "written token": fmt(s.written) if s.written.value == s.written.value else "— (a thought)",
                     "entropy (bits)": fmt(s.entropy, 2)})
    for i, (f, c) in enumerate(zip(r.patch_follow, r.patch_control_follow, strict=True)):
        rows.append({"step": i + 1, "model": "continuous", "frontier size": "",
                     "probe (nodes)": f"patch from other root: follows {fmt(f)}",
                     "shuffled": f"control: {fmt(c)}", "logit lens": "", "written token": "", "entropy (bits)": ""})
    acc = "; ".join(f"{k} accuracy {fmt(e)}" for k, e in r.accuracy.items())
    return Summary(pd.DataFrame(rows), _measured(r.n, f"probes on shuffled labels; for patching, the same "
                                                      f"example with its edges reordered. {acc}"))


SUMMARIES["ContinuousResult"] = _summ_continuous
QUESTIONS["continuous"] = ("Does the i-th continuous thought hold the whole search frontier at depth i "
                           "(several nodes at once), where a token chain commits to one node?")


def continuous_section(result: Any) -> Section:
    """The report section of `interp.hypotheses.continuous.continuous_thought`."""
    return section("What a continuous thought holds", result, question=QUESTIONS["continuous"], key="continuous")
