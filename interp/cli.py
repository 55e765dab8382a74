"""The `interp` command: models, caching, organisms, SAEs, investigations and the demo.

Start-up is cheap: this module imports no subpackage at import time (torch and TransformerLens
take ~10 s to import on a shared CPU), the `organisms`, `sae`, `run` and `circuits` groups are imported only
when invoked, and each command imports what it needs inside its function.

Errors: a validation error raised by interp's own code (`ValueError`, `TypeError`,
`FileNotFoundError`, or one of its exception types) is printed as one line; anything else — a
real bug, or an error from deep inside torch — keeps its traceback. `--debug` (anywhere on the
command line) or `INTERP_DEBUG=1` shows the traceback of every error.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from pathlib import Path
from types import TracebackType

import click
import typer
from rich.console import Console

app = typer.Typer(help="interp: mechanistic interpretability on hooked transformers.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(soft_wrap=True)

EXAMPLE_PRETRAINED = ["gpt2", "gpt2-medium", "pythia-70m", "pythia-160m", "TinyLlama-1.1B-Chat-v1.0"]


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


class _LazyGroup(click.Command):
    """A sub-app owned by a subpackage, listed by name and help, imported only when invoked."""

    def __init__(self, name: str, module: str, help_text: str) -> None:
        super().__init__(name, help=help_text, short_help=help_text)
        self.module = module

    def _load(self) -> click.Command:
        cmd = typer.main.get_command(importlib.import_module(self.module).app)
        cmd.name, cmd.help = self.name, cmd.help or self.help
        return cmd

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: object) -> click.Context:
        return self._load().make_context(info_name, args, parent=parent, **extra)  # type: ignore[arg-type]


SUBAPPS = (("organisms", "interp.organisms.commands", "Train, evaluate and list the model organisms."),
           ("sae", "interp.sae.commands", "Train and evaluate sparse autoencoders."),
           ("run", "interp.cli_run", "Run a hypothesis investigation."),
           ("circuits", "interp.cli_circuits", "Declared circuits and the circuit-discovery leaderboard."))


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show the full traceback of an error "
                                                              "(or set INTERP_DEBUG=1)")) -> None:
    """interp: mechanistic interpretability on hooked transformers."""


@app.command("models")
def models_cmd() -> None:
    """List the shipped organisms (shape and held-out acceptance) and example pretrained names."""
    from rich.table import Table

    from interp.models import list_organisms, read_manifest
    from interp.organisms.commands import acceptance_line

    table = Table(title="Shipped organisms (load with organism:NAME)", expand=True, show_lines=True)
    table.add_column("spec", no_wrap=True)
    table.add_column("task", overflow="fold", ratio=3)
    table.add_column("shape", overflow="fold", ratio=1)
    table.add_column("held-out acceptance", overflow="fold", ratio=2)
    for name in list_organisms():
        m = read_manifest(f"organism:{name}")
        a = m.get("architecture", {})
        shape = f"{a.get('n_layers', '?')} layers, d_model {a.get('d_model', '?')}, {a.get('n_heads', '?')} heads"
        accepted = acceptance_line(m)  # measured results only, not the evaluation's settings (seed, n)
        table.add_row(f"organism:{name}", str(m.get("task", "")), shape, accepted or "—")
    console.print(table)
    console.print("Pretrained (TransformerLens names; need the HF cache or a hub): "
                  + ", ".join(EXAMPLE_PRETRAINED), soft_wrap=False)


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
    prepend_bos: bool | None = typer.Option(None, "--prepend-bos/--no-prepend-bos",
                                            help="'text' records of a Hugging Face tokenizer: force a BOS in or out "
                                                 "(default: the tokenizer's own rule, as Prompts.from_text)"),
) -> None:
    """Cache activations of MODEL over DATA into a sharded on-disk store."""
    _quiet()
    import torch

    from interp.cache import collect
    from interp.data import read_token_jsonl
    from interp.models import load_model

    m = load_model(model)
    batch = read_token_jsonl(data, tokenizer=_tokenizer_for(model, m, prepend_bos))
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


def _tokenizer_for(spec: str, model: object, prepend_bos: bool | None = None):  # noqa: ANN202
    """The tokenizer for 'text' records: an organism's or saved model's word list, else the model's
    Hugging Face tokenizer with BOS as its own post-processor / ``add_bos_token`` puts it (Llama:
    yes, GPT-2: no; `interp.prompts.special_prefix`), or as `prepend_bos` forces."""
    from interp.models import ORGANISM_PREFIX, TOKENIZER, organisms_dir
    from interp.prompts import special_prefix
    from interp.tokens import HFTokenizer, VocabTokenizer

    if spec.startswith(ORGANISM_PREFIX):
        return VocabTokenizer.load(organisms_dir() / spec.removeprefix(ORGANISM_PREFIX) / TOKENIZER)
    tok = getattr(model, "tokenizer", None)
    if tok is None:  # a saved model's word list (a Hugging Face folder's tokenizer.json is attached above)
        return VocabTokenizer.load(Path(spec) / TOKENIZER) if (Path(spec) / TOKENIZER).is_file() else None
    bos = getattr(tok, "bos_token_id", None)
    if prepend_bos is None:
        prepend_bos = bos is not None and special_prefix(tok)[:1] == [bos]
    elif prepend_bos and bos is None:
        raise typer.BadParameter(f"expected a tokenizer with a BOS token, got {type(tok).__name__} without one",
                                 param_hint="--prepend-bos")
    return HFTokenizer(tok, prepend_bos=prepend_bos)


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("reports/demo.html"), help="where to write the offline HTML report"),
    fast: bool = typer.Option(False, help="fewer examples (for tests)"),
    shared_js: bool = typer.Option(False, "--shared-js", help="write plotly.js once as plotly.min.js beside the "
                                                              "report instead of embedding it (offline still)"),
) -> None:
    """Run the investigations on the shipped organisms and write one offline HTML report
    (tidy tables as CSVs beside it, verdicts and key numbers in a JSON file)."""
    _quiet()
    from interp.demo import run_demo

    path = run_demo(out, fast=fast, console=console, shared_js=shared_js)
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


def _ours(tb: TracebackType | None) -> bool:
    """True when the innermost frame of a traceback is interp's own code (its validation)."""
    here = Path(__file__).resolve().parent
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    if last is None:
        return False
    return Path(last.tb_frame.f_code.co_filename).resolve().is_relative_to(here)


def _one_line(e: BaseException) -> bool:
    """Is `e` an error we raised on purpose (one line), rather than a bug (a traceback)?"""
    kinds = {"ModelLoadError": "interp.models", "StoreError": "interp.store", "HookError": "interp.hooks"}
    for kind, module in kinds.items():  # only when already imported: checking must not import torch
        cls = getattr(sys.modules.get(module), kind, None)
        if cls is not None and isinstance(e, cls):
            return True
    return isinstance(e, (ValueError, TypeError, FileNotFoundError)) and _ours(e.__traceback__)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("INTERP_DEBUG", "") not in ("", "0")
    command = typer.main.get_command(app)
    for name, module, help_text in SUBAPPS:
        command.add_command(_LazyGroup(name, module, help_text))  # type: ignore[attr-defined]
    try:
        command.main([a for a in args if a != "--debug"], prog_name="interp")
    except Exception as e:
        if debug or not _one_line(e):
            raise
        from rich.text import Text

        err = Console(stderr=True, soft_wrap=True)
        err.print(Text.assemble(("error: ", "bold red"), str(e)), highlight=False)
        err.print("(run with --debug or INTERP_DEBUG=1 for the traceback)", markup=False, highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
