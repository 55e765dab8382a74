"""The `probes` command: run and inspect config-driven probe sweeps.

    probes sweep probes/configs/multihop_bridge.yaml --workers 2
    probes sweep CONFIG.yaml --backend ray --address auto
    probes plan CONFIG.yaml            # list the cells and which are done
    probes grid GRID.yaml --backend ray --address auto   # patching / investigation sweeps (probes.grid)
    probes grid-plan GRID.yaml
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from interp.models import ModelLoadError
from interp.store import StoreError
from probes.backends import BACKENDS
from probes.config import load_config
from probes.sweep import plan, summary, sweep

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Config-driven, resumable linear-probe sweeps (interp.probing).")
console = Console()
# errors about the user's input (config, files, models, stores); anything else is a bug and shows its traceback
USER_ERRORS = (ValueError, FileNotFoundError, ImportError, ModelLoadError, StoreError)


def _fail(e: Exception, debug: bool) -> NoReturn:
    if debug:
        raise e
    console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)  # unwrapped: paths stay copyable
    console.print("(rerun with --debug for the traceback)", highlight=False)
    raise typer.Exit(2) from None


@app.command("sweep")
def sweep_cmd(
    config: Path = typer.Argument(..., help="sweep config (YAML)"),
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="local worker processes (or Ray CPUs)"),
    backend: str = typer.Option("auto", help=f"one of {list(BACKENDS)}"),
    address: str | None = typer.Option(None, help="Ray cluster address (backend ray)"),
    out: Path | None = typer.Option(None, help="output folder (overrides the config's `out`)"),
    quiet: bool = typer.Option(False, help="no progress bars"),
    debug: bool = typer.Option(False, help="show the full traceback of an error"),
) -> None:
    """Run every unfinished cell of CONFIG and write probes.parquet/.csv/.html.

    Cells whose resolved spec (data, probe, seed, model weights ...) changed since the last run
    in the same folder are recomputed; the run logs what changed."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    try:
        cfg = load_config(config)
        if out is not None:
            from dataclasses import replace

            cfg = replace(cfg, out=str(out))
        res = sweep(cfg, workers=workers, backend=backend, address=address, progress=not quiet)
    except USER_ERRORS as e:
        _fail(e, debug)
    console.print(f"sweep {cfg.name}: fitted {res.n_fitted} cells, skipped {res.n_skipped} finished cells")
    for kind, path in res.paths.items():
        console.print(f"  {kind}: {path}")


@app.command("plan")
def plan_cmd(config: Path = typer.Argument(..., help="sweep config (YAML)"),
             debug: bool = typer.Option(False, help="show the full traceback of an error")) -> None:
    """List the cells of CONFIG and whether each is done (for this exact config)."""
    try:
        cfg = load_config(config)
        text = summary(plan(cfg), cfg)
    except USER_ERRORS as e:
        _fail(e, debug)
    console.print(text, highlight=False)


@app.command("grid")
def grid_cmd(
    config: Path = typer.Argument(..., help="grid config (YAML or JSON): models x prompt sets x methods"),
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="local worker processes (or Ray CPUs)"),
    backend: str = typer.Option("auto", help=f"one of {list(BACKENDS)}"),
    address: str | None = typer.Option(None, help="Ray cluster address (backend ray)"),
    gpus: float = typer.Option(0.0, min=0.0, help="GPUs per Ray task (with `device: cuda` in the config)"),
    out: Path | None = typer.Option(None, help="output folder (overrides the config's `out`)"),
    quiet: bool = typer.Option(False, help="log only warnings"),
    debug: bool = typer.Option(False, help="show the full traceback of an error"),
) -> None:
    """Run every unfinished cell of a patching / investigation grid and write grid.parquet/.csv.

    Each cell is keyed on its content (model fingerprint, prompt set, method, parameters, seed):
    an interrupted run resumes, a rerun computes nothing, a changed input makes new cells."""
    from probes.grid import grid, load_grid_config

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    try:
        cfg = load_grid_config(config)
        if out is not None:
            from dataclasses import replace

            cfg = replace(cfg, out=str(out))
        res = grid(cfg, workers=workers, backend=backend, address=address, gpus=gpus)
    except USER_ERRORS as e:
        _fail(e, debug)
    console.print(f"grid {cfg.name}: computed {res.n_computed} cells, skipped {res.n_skipped} finished cells")
    for kind, path in res.paths.items():
        console.print(f"  {kind}: {path}")


@app.command("grid-plan")
def grid_plan_cmd(config: Path = typer.Argument(..., help="grid config (YAML or JSON)"),
                  debug: bool = typer.Option(False, help="show the full traceback of an error")) -> None:
    """List the cells of a grid config and whether each is done (for this exact content)."""
    from probes.grid import load_grid_config
    from probes.grid import summary as grid_summary

    try:
        text = grid_summary(load_grid_config(config))
    except USER_ERRORS as e:
        _fail(e, debug)
    console.print(text, highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
