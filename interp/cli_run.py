"""`interp run multihop|plan-ahead|decay|last-token|routes|course-correction|continuous --model SPEC [--prompts FILE.jsonl] [--baseline auto|random|none] [--out report.html]`.

Each run writes its own report: by default `reports/run-NAME-MODEL.html` (a free name: `-2`, `-3`
… are appended rather than replace an earlier run's report); an explicit `--out` that exists is
replaced only with `--overwrite`.

Lives outside `interp.hypotheses` so that `interp run --help` does not import the investigations
(and torch): importing a submodule always runs its package's `__init__`."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from interp.atomic import DestinationError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()

OUT = typer.Option(None, "--out", help="offline HTML report (default: reports/run-NAME-MODEL.html, never "
                                         "an earlier run's)")
OVERWRITE = typer.Option(False, "--overwrite", help="replace an existing --out file")
SEED = typer.Option(0, help="dataset and baseline seed")
BASELINE = typer.Option("auto", "--baseline", help="auto: a random-initialised model of the same shape for a model of "
                                                    "at most 1 GiB, none above (said in the report); random: always "
                                                    "(a second model of the same size); none: no baseline, no verdict")
PROMPTS = typer.Option(None, "--prompts", help="a JSONL prompt set (schema: data/prompts/README.md), tokenized "
                                               "with the model's tokenizer; prompts of any lengths")


def _runner():  # noqa: ANN202
    from interp.hypotheses import run

    return run


def report_path(name: str, models: str | list[str], out: Path | None = None, *, overwrite: bool = False,
                root: Path = Path("reports")) -> Path:
    """Where `interp run NAME` writes its report, never over an earlier run's file by accident.

    Default: ``root/run-NAME-MODEL.html`` (model specs slugged), with ``-2``, ``-3`` … appended
    when that name is taken. An explicit `out` that exists raises unless `overwrite`.
    """
    if out is not None:
        out = Path(out)
        if out.is_dir():
            raise DestinationError(f"--out {out}: expected an HTML file path, got a directory; "
                                   f"name a file such as {out / ('run-' + name + '.html')}")
        if out.exists() and not overwrite:
            raise DestinationError(f"--out {out}: expected a new file, got an existing one; pass --overwrite to "
                                   f"replace it or choose another path")
        return out
    specs = [models] if isinstance(models, str) else list(models)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", "+".join(Path(m).name if "/" in m else m for m in specs)).strip("_")
    stem = f"run-{name}-{slug[:80] or 'model'}"
    path, k = root / f"{stem}.html", 2
    while path.exists():
        path, k = root / f"{stem}-{k}.html", k + 1
    return path


def check_baseline(baseline: str) -> str:
    """`--baseline` validated (before any model is loaded)."""
    if baseline not in ("auto", "random", "none"):
        raise typer.BadParameter(f"expected auto, random or none, got {baseline!r}", param_hint="--baseline")
    return baseline


def _run(name: str, models: str | list[str], out: Path | None, overwrite: bool,
         investigate: Callable[[Any, dict[str, Any]], Any], seed: int, *, shared_js: bool = False,
         baseline: str = "auto") -> None:
    """Choose the report path (refused before any work), load the models, run
    `investigate(runner, loaded)` with progress lines, write the report with its provenance."""
    import time

    from interp.progress import progress

    check_baseline(baseline)
    path = report_path(name, models, out, overwrite=overwrite)
    runner = _runner()
    specs = [models] if isinstance(models, str) else list(models)
    t0 = time.perf_counter()
    with progress(console, f"loading {', '.join(specs)}"):
        loaded = {s: runner.load(s) for s in specs}
    with progress(console, f"running {name}"):
        result = investigate(runner, loaded)
    console.print(f"[bold]{name}[/]: {result.verdict} ({time.perf_counter() - t0:.1f} s)")
    from interp.report import Provenance, report_for

    prov = Provenance.collect(loaded, seeds={"seed": seed})
    path = report_for(name, result, prov).write(path, shared_js=shared_js)
    console.print(f"report written: {path.resolve()}")


SHARED_JS = typer.Option(False, "--shared-js", help="refer to one plotly.min.js in the report's folder instead of "
                                                    "embedding plotly.js (~4.6 MB) in each report")


@app.command("multihop")
def multihop_cmd(model: str = typer.Option("organism:multihop", "--model"), n: int = 400, seed: int = SEED,
                 prompts: Path | None = PROMPTS, out: Path | None = OUT, overwrite: bool = OVERWRITE,
                 shared_js: bool = SHARED_JS, baseline: str = BASELINE) -> None:
    """Is the bridge entity computed internally, where, and does patching it move the answer?"""
    _run("multihop", model, out, overwrite,
         lambda r, m: r.run_multihop(model, n, seed, prompts, model=m[model], baseline=baseline),
         seed, shared_js=shared_js, baseline=baseline)


@app.command("plan-ahead")
def plan_cmd(model: str = typer.Option("organism:planning", "--model"), n: int = 400, seed: int = SEED,
             out: Path | None = OUT, overwrite: bool = OVERWRITE, shared_js: bool = SHARED_JS,
             baseline: str = BASELINE) -> None:
    """Do hidden states encode x_{t+2}, x_{t+3}? (future lens vs bigram baseline)"""
    _run("plan-ahead", model, out, overwrite, lambda r, m: r.run_plan_ahead(model, n, seed, baseline=baseline), seed,
         shared_js=shared_js, baseline=baseline)


@app.command("decay")
def decay_cmd(model: list[str] = typer.Option(["organism:retrieval-learned", "organism:retrieval-rotary",
                                                "organism:retrieval-nope"], "--model"),
              n_per: int = 48, seed: int = SEED, prompts: Path | None = PROMPTS,
              bins: list[int] | None = typer.Option(None, "--bin", help="upper edge of a distance bin (repeat; default: "
                                                                   "one group per distance)"),
              out: Path | None = OUT, overwrite: bool = OVERWRITE, shared_js: bool = SHARED_JS,
              baseline: str = BASELINE) -> None:
    """Positional-information decay across models (e.g. positional schemes)."""
    _run("decay", model, out, overwrite,
         lambda r, m: r.run_decay(model, n_per, seed, prompts, bins=bins or None,
                                  models={s.removeprefix("organism:"): x for s, x in m.items()}, baseline=baseline),
         seed, shared_js=shared_js, baseline=baseline)


@app.command("last-token")
def last_token_cmd(model: str = typer.Option("organism:multihop", "--model"), n: int = 400, seed: int = SEED,
                   prompts: Path | None = PROMPTS, out: Path | None = OUT, overwrite: bool = OVERWRITE,
                   shared_js: bool = SHARED_JS, baseline: str = BASELINE) -> None:
    """From which layer does the last position's residual alone suffice?"""
    _run("last-token", model, out, overwrite,
         lambda r, m: r.run_last_token(model, n, seed, prompts, model=m[model], baseline=baseline),
         seed, shared_js=shared_js, baseline=baseline)


@app.command("routes")
def routes_cmd(model: str = typer.Option("organism:induction", "--model"), n: int = 32, seed: int = SEED,
               prompts: Path | None = PROMPTS, out: Path | None = OUT, overwrite: bool = OVERWRITE,
               shared_js: bool = SHARED_JS, baseline: str = BASELINE) -> None:
    """Residual-first vs K/V-first routes (the induction copy, or a prompt set with a `source` span)."""
    _run("routes", model, out, overwrite,
         lambda r, m: r.run_routes(model, n, seed, prompts, model=m[model], baseline=baseline),
         seed, shared_js=shared_js, baseline=baseline)


@app.command("course-correction")
def course_correction_cmd(model: str = typer.Option("organism:planning", "--model"), n: int = 400, seed: int = SEED,
                          surprise: str = typer.Option("lowest", help="lowest | random | a token's text (forced after "
                                                                      "every prompt; one token of the model's tokenizer)"),
                          steps: int = typer.Option(4, help="tokens decoded after the surprise"),
                          prompts: Path | None = PROMPTS, out: Path | None = OUT, overwrite: bool = OVERWRITE,
                          shared_js: bool = SHARED_JS, baseline: str = BASELINE) -> None:
    """After a forced wrong token: finish the plan, restart, back off, re-plan or drift? Which route carries recovery?"""
    _run("course-correction", model, out, overwrite,
         lambda r, m: r.run_course_correction(model, n, seed, surprise, model=m[model], prompts=prompts, steps=steps,
                                              baseline=baseline),
         seed, shared_js=shared_js, baseline=baseline)


@app.command("continuous")
def continuous_cmd(model: str = typer.Option("organism:reach-continuous", "--model", help="a reach model; "
                                             "organism:reach-cot is read as a token model, others as continuous"),
                   n: int = 1000,
                   seed: int = typer.Option(1, help="held-out dataset and probe seed"), out: Path | None = OUT,
                   overwrite: bool = OVERWRITE, shared_js: bool = SHARED_JS) -> None:
    """What does a continuous thought hold: several frontier nodes at once (superposition), vs a token chain?"""
    def investigate(r: Any, m: dict[str, Any]) -> Any:
        from interp.hypotheses.continuous import run_continuous
        from interp.models import list_organisms

        kind = "cot" if model == "organism:reach-cot" else "continuous"
        models = {kind: m[model]}
        if model in ("organism:reach-cot", "organism:reach-continuous"):
            models |= {k: r.load(f"organism:reach-{k}") for k in ("cot", "direct")
                       if k not in models and f"reach-{k}" in list_organisms()}
        return run_continuous(model, n, seed, models=models)

    _run("continuous", model, out, overwrite, investigate, seed, shared_js=shared_js)
