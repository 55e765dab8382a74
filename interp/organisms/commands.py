"""`interp organisms list | train NAME | eval NAME`: the organism zoo from the command line."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Model organisms: small transformers with known mechanisms.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def acceptance_line(manifest: dict[str, object]) -> str:
    """The held-out acceptance results of a manifest: each measured value with the bar it had to clear."""
    acc = manifest.get("acceptance", {})
    return "; ".join(f"{c.get('what', k)}: {c['value']:.3g} (needs {c['op']} {c['threshold']})"
                     for k, c in acc.items()) if isinstance(acc, dict) else ""


@app.command("list")
def list_cmd() -> None:
    """List the organisms, their tasks and the shipped checkpoints' held-out acceptance results."""
    from interp.models import ModelLoadError, read_manifest
    from interp.organisms import NAMES, get

    table = Table(title="Organisms (load with interp.load_model('organism:NAME'))", expand=True, show_lines=True)
    table.add_column("name", no_wrap=True)
    table.add_column("task", overflow="fold", ratio=3)
    table.add_column("held-out acceptance", overflow="fold", ratio=3)
    table.add_column("train s", no_wrap=True, justify="right")
    for name in NAMES:
        try:
            m = read_manifest(f"organism:{name}")
            shown, secs = acceptance_line(m) or "—", f"{float(m.get('train_seconds', 0) or 0):.0f}"
        except ModelLoadError:
            shown, secs = "(not shipped: run `interp organisms train " + name + "`)", ""
        table.add_row(name, get(name).TASK, shown, secs)
    console.print(table)


@app.command("train")
def train_cmd(
    name: str = typer.Argument(..., help="organism name (see `interp organisms list`)"),
    steps: int = typer.Option(0, help="training steps (0: the organism's default)"),
    seed: int = typer.Option(0, help="seed for initial weights and data"),
    out: Path = typer.Option(None, help="output directory (default: data/organisms/NAME)"),
    save_failed: bool = typer.Option(False, help="save even if acceptance fails"),
    overwrite: bool = typer.Option(False, help="replace an existing model directory at OUT (other files kept)"),
) -> None:
    """Train an organism from scratch on CPU, check acceptance, and save the checkpoint."""
    _quiet()
    from interp.organisms import AcceptanceError, train_and_save

    try:
        path, facts = train_and_save(name, steps=steps or None, seed=seed, out=out,
                                     save_failed=save_failed, overwrite=overwrite)
    except (AcceptanceError, ValueError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    console.print(f"saved {path} after {facts['train_seconds']} s; held-out acceptance: {acceptance_line(facts)}")


@app.command("eval")
def eval_cmd(
    name: str = typer.Argument(..., help="organism name"),
    model: str = typer.Option("", help="model directory to evaluate (default: the shipped one)"),
    n: int = typer.Option(0, help="held-out examples (0: the organism's default)"),
    seed: int = typer.Option(1, help="evaluation data seed"),
    as_json: bool = typer.Option(False, "--json", help="print all metrics as JSON"),
) -> None:
    """Evaluate a shipped (or given) organism on held-out data and check its acceptance criteria."""
    _quiet()
    from interp.models import ModelLoadError, load_model
    from interp.organisms import evaluate, get
    from interp.organisms.base import check

    try:
        org = get(name)
        m = load_model(model or f"organism:{name}")
    except (ModelLoadError, ValueError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    metrics = evaluate(m, n=n or None, seed=seed, name=name)
    results = check(org.ACCEPTANCE, metrics)
    passed = all(r["passed"] for r in results.values())
    if as_json:  # pure JSON on stdout (no table), so that it pipes into jq / json.loads
        typer.echo(json.dumps({"organism": name, "metrics": metrics, "acceptance": results, "passed": passed},
                              default=float))
        if not passed:
            raise typer.Exit(1)
        return
    table = Table(title=f"{name}: acceptance")
    for col in ("criterion", "value", "threshold", "passed"):
        table.add_column(col)
    for r in results.values():
        table.add_row(r["what"], f"{r['value']:.4f}", f"{r['op']} {r['threshold']}",
                      "yes" if r["passed"] else "[red]no[/red]")
    console.print(table)
    if not all(r["passed"] for r in results.values()):
        raise typer.Exit(1)
