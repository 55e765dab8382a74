"""`interp run multihop|plan-ahead|decay|last-token|routes --model SPEC --out report.html`.

Lives outside `interp.hypotheses` so that `interp run --help` does not import the investigations
(and torch): importing a submodule always runs its package's `__init__`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()

OUT = typer.Option(Path("reports/run.html"), "--out", help="offline HTML report")
SEED = typer.Option(0, help="dataset and baseline seed")


def _runner():  # noqa: ANN202
    from interp.hypotheses import run

    return run


def _write(name: str, result: object, out: Path) -> None:
    console.print(f"[bold]{name}[/]: {result.verdict}")  # type: ignore[attr-defined]
    path = _runner().report_for(name, result).write(out)
    console.print(f"report written: {path.resolve()}")


@app.command("multihop")
def multihop_cmd(model: str = typer.Option("organism:multihop", "--model"), n: int = 400, seed: int = SEED,
                 out: Path = OUT) -> None:
    """Is the bridge entity computed internally, where, and does patching it move the answer?"""
    _write("multihop", _runner().run_multihop(model, n, seed), out)


@app.command("plan-ahead")
def plan_cmd(model: str = typer.Option("organism:planning", "--model"), n: int = 400, seed: int = SEED,
             out: Path = OUT) -> None:
    """Do hidden states encode x_{t+2}, x_{t+3}? (future lens vs bigram baseline)"""
    _write("plan-ahead", _runner().run_plan_ahead(model, n, seed), out)


@app.command("decay")
def decay_cmd(model: list[str] = typer.Option(["organism:retrieval-learned", "organism:retrieval-rotary",
                                                "organism:retrieval-nope"], "--model"),
              n_per: int = 48, seed: int = SEED, out: Path = OUT) -> None:
    """Positional-information decay across models (e.g. positional schemes)."""
    _write("decay", _runner().run_decay(model, n_per, seed), out)


@app.command("last-token")
def last_token_cmd(model: str = typer.Option("organism:multihop", "--model"), n: int = 400, seed: int = SEED,
                   out: Path = OUT) -> None:
    """From which layer does the last position's residual alone suffice?"""
    _write("last-token", _runner().run_last_token(model, n, seed), out)


@app.command("routes")
def routes_cmd(model: str = typer.Option("organism:induction", "--model"), n: int = 32, seed: int = SEED,
               out: Path = OUT) -> None:
    """Residual-first vs K/V-first routes of the induction copy."""
    _write("routes", _runner().run_routes(model, n, seed), out)
