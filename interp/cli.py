"""The `interp` command: models, caching, organisms, SAEs, investigations and the demo."""

from __future__ import annotations

import importlib
import logging
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="interp: mechanistic interpretability on hooked transformers.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(soft_wrap=True)

EXAMPLE_PRETRAINED = ["gpt2", "gpt2-medium", "pythia-70m", "pythia-160m", "TinyLlama-1.1B-Chat-v1.0"]


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _mount(module: str, name: str, help_text: str) -> None:
    """Mount a sub-app owned by a subpackage, if that subpackage is present."""
    try:
        sub = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return
        raise
    app.add_typer(sub.app, name=name, help=help_text)


@app.command("models")
def models_cmd() -> None:
    """List the shipped organisms and example pretrained names."""
    from interp.models import list_organisms, read_manifest

    table = Table(title="Shipped organisms (load with organism:NAME)")
    table.add_column("spec")
    table.add_column("task")
    table.add_column("metrics")
    for name in list_organisms():
        m = read_manifest(f"organism:{name}")
        metrics = m.get("metrics", {})
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in list(metrics.items())[:4])
        table.add_row(f"organism:{name}", str(m.get("task", "")), shown)
    console.print(table)
    console.print("Pretrained (TransformerLens names; need the HF cache or a hub): "
                  + ", ".join(EXAMPLE_PRETRAINED))


@app.command("cache")
def cache_cmd(
    model: str = typer.Argument(..., help="organism:NAME, a saved model directory, or a pretrained name"),
    data: Path = typer.Argument(..., help="JSONL file, one {'tokens': [...]} or {'text': ...} per line"),
    hooks: list[str] = typer.Option(..., "--hooks", help="hook names or glob patterns (repeatable)"),
    out: Path = typer.Option(..., "--out", help="store directory (resumes if it exists)"),
    positions: str = typer.Option("all", help="'all', 'last' or comma-separated indices"),
    layers: str = typer.Option("", help="comma-separated layers to keep (default: all)"),
    dtype: str = typer.Option("", help="storage dtype: float32, float16 or bfloat16 (default: model's)"),
    batch_size: int = typer.Option(64, help="prompts per forward pass"),
) -> None:
    """Cache activations of MODEL over DATA into a sharded on-disk store."""
    _quiet()
    import torch

    from interp.cache import collect
    from interp.data import read_token_jsonl
    from interp.models import load_model

    m = load_model(model)
    batch = read_token_jsonl(data, tokenizer=_tokenizer_for(model, m))
    pos: object = positions if positions in ("all", "last") else [int(p) for p in positions.split(",")]
    dt = None
    if dtype:
        if dtype not in ("float32", "float16", "bfloat16"):
            raise typer.BadParameter(f"expected float32, float16 or bfloat16, got {dtype!r}", param_hint="--dtype")
        dt = getattr(torch, dtype)
    store = collect(m, batch, hooks=hooks, positions=pos,  # type: ignore[arg-type]
                    layers=[int(x) for x in layers.split(",")] if layers else None,
                    dtype=dt, batch_size=batch_size, out=out)
    console.print(f"cached {store.n_examples} prompts x {len(store.hook_names)} hooks into {out}")


def _tokenizer_for(spec: str, model: object):  # noqa: ANN202
    from interp.models import ORGANISM_PREFIX, TOKENIZER, organisms_dir
    from interp.tokens import HFTokenizer, VocabTokenizer

    if spec.startswith(ORGANISM_PREFIX):
        return VocabTokenizer.load(organisms_dir() / spec.removeprefix(ORGANISM_PREFIX) / TOKENIZER)
    if (Path(spec) / TOKENIZER).is_file():
        return VocabTokenizer.load(Path(spec) / TOKENIZER)
    tok = getattr(model, "tokenizer", None)
    return HFTokenizer(tok) if tok is not None else None


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("reports/demo.html"), help="where to write the offline HTML report"),
    fast: bool = typer.Option(False, help="fewer examples (for tests)"),
) -> None:
    """Run the investigations on the shipped organisms and write one offline HTML report."""
    _quiet()
    from interp.demo import run_demo

    path = run_demo(out, fast=fast, console=console)
    console.print(f"[bold green]report written:[/] {path.resolve()}")


@app.command("probe-sweep", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def probe_sweep_cmd(ctx: typer.Context) -> None:
    """Run a config-driven probe sweep (the `probes sweep` command; arguments pass through)."""
    import os
    import shutil
    import sys

    # interp never imports probes: hand over to its console script in the same environment
    exe = Path(sys.executable).with_name("probes")
    exe_path = str(exe) if exe.exists() else shutil.which("probes")
    if exe_path is None:
        raise FileNotFoundError("probes: expected the `probes` console script next to this Python, got none "
                                "(pip install -e . installs it)")
    os.execv(exe_path, [exe_path, "sweep", *ctx.args])


def main() -> None:
    _mount("interp.organisms.commands", "organisms", "Train, evaluate and list the model organisms.")
    _mount("interp.sae.commands", "sae", "Train and evaluate sparse autoencoders.")
    _mount("interp.hypotheses.commands", "run", "Run a hypothesis investigation.")
    try:
        app()
    except Exception as e:  # a clear one-line error for known failure kinds, not a stack trace
        from interp.hooks import HookError
        from interp.models import ModelLoadError
        from interp.store import StoreError

        if isinstance(e, (ModelLoadError, StoreError, HookError, ValueError, TypeError, FileNotFoundError)):
            Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {e}", markup=True, highlight=False)
            raise SystemExit(2) from None
        raise


if __name__ == "__main__":
    main()
