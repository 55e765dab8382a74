"""`interp circuits score | declare`: the circuit-discovery leaderboard from the command line.

Lives outside `interp.circuits` so that `interp circuits --help` does not import torch."""

from __future__ import annotations

import json
import logging
import warnings

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Declared circuits of the organisms and the discovery-method leaderboard.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(soft_wrap=True)


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command("score")
def score_cmd(
    method: list[str] = typer.Option([], "--method", help="discovery method(s) (default: all)"),
    organism: list[str] = typer.Option([], "--organism", help="organism(s) (default: every one with a circuit)"),
    n: int = typer.Option(32, help="prompts per organism"),
    boot: int = typer.Option(10, help="bootstrap resamples of the prompts"),
    seed: int = typer.Option(1, help="prompt seed (the declaration used another)"),
    as_json: bool = typer.Option(False, "--json", help="print the tidy frame as JSON records"),
    markdown: bool = typer.Option(False, "--markdown", help="print the methods x organisms table as Markdown"),
) -> None:
    """ROC AUC (and precision at the circuit's size) of each method against each declared circuit."""
    _quiet()
    from interp import circuits

    methods = method or list(circuits.METHODS)
    organisms = organism or list(circuits.CIRCUIT_ORGANISMS)
    for m in methods:
        if m not in circuits.METHODS:
            raise ValueError(f"--method: expected one of {list(circuits.METHODS)}, got {m!r}")
    for o in organisms:
        if o not in circuits.CIRCUIT_ORGANISMS:
            raise ValueError(f"--organism: expected one of {list(circuits.CIRCUIT_ORGANISMS)}, got {o!r}")
    board = circuits.leaderboard(methods, organisms, n=n, n_boot=boot, seed=seed, progress=not as_json)
    frame = board.to_frame()
    if as_json:
        typer.echo(json.dumps(frame.to_dict(orient="records")))
        return
    if markdown:
        typer.echo(board.markdown())
        return
    table = Table(title="Circuit discovery vs the declared circuits (ROC AUC, 95% bootstrap CI)")
    for col in ("organism", "method", "level", "AUC", "P@k", "random AUC", "candidates", "in circuit"):
        table.add_column(col)
    for s in board.scores:
        f = s.to_frame().set_index(["statistic", "ranking"])
        a, p, r = f.loc[("auc", s.method)], f.loc[("precision_at_k", s.method)], f.loc[("auc", "random")]
        table.add_row(s.organism, s.method, s.level, f"{a['value']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]",
                      f"{p['value']:.3f}", f"{r['value']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]",
                      str(len(s.labels)), str(int(s.positive.sum())))
    console.print(table)


@app.command("declare")
def declare_cmd(
    name: str = typer.Argument(..., help="organism name"),
    n: int = typer.Option(64, help="prompts"),
    seed: int = typer.Option(100, help="prompt seed"),
    write: bool = typer.Option(False, "--write", help="write the circuit into the shipped manifest"),
) -> None:
    """Measure every candidate attention edge by noising path patching and declare the circuit."""
    _quiet()
    from interp import circuits

    c = circuits.declare(name, n=n, seed=seed, progress=True)
    table = Table(title=f"{name}: declared circuit (share of the clean-corrupt gap, noising)")
    for col in ("layer", "head", "query", "key", "share"):
        table.add_column(col)
    for e in c.edges:
        table.add_row(str(e.layer), str(e.head), e.query, e.key, f"{e.share:.3f}")
    console.print(table)
    console.print(c.evidence)
    if write:
        path = circuits.write_circuit(name, c)
        console.print(f"written to {path}")
