"""`interp sae ...`: train, evaluate and inspect SAEs from the command line.

    interp sae train organism:multihop --hook blocks.2.hook_resid_post --out data/sae/multihop-L2
    interp sae eval sae:multihop-L2 --model organism:multihop
    interp sae dashboard sae:multihop-L2 --model organism:multihop --out features.html
    interp sae planted --n-features 512 --d-model 256

Data for a model comes from its organism's task generator (``dataset(n, seed)``) or from a
``.safetensors`` file holding a ``tokens`` tensor (``--tokens``).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from torch import Tensor

app = typer.Typer(help="Train and evaluate sparse autoencoders (sae-lens).", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
console = Console()


def _quiet(threads: int) -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch  # here, not at import: `interp sae --help` stays fast

    # oversubscribed BLAS threads on a shared CPU are far slower than one thread
    torch.set_num_threads(threads)


def load_data(model_spec: str, tokens: Path | None, n: int, seed: int) -> tuple[Tensor, Tensor | None, Any]:
    """(tokens, CE targets or None, tokenizer or None) for a model spec."""
    from interp.models import ORGANISM_PREFIX

    if tokens is not None:
        from safetensors.torch import load_file

        t = load_file(str(tokens))
        if "tokens" not in t:
            raise typer.BadParameter(f"{tokens}: expected a 'tokens' tensor, got keys {sorted(t)}")
        return t["tokens"][:n].long(), None, None
    if not model_spec.startswith(ORGANISM_PREFIX):
        raise typer.BadParameter(f"{model_spec}: expected organism:NAME (its task generator supplies the data) "
                                 f"or --tokens FILE.safetensors")
    return organism_data(model_spec.removeprefix(ORGANISM_PREFIX), n, seed)


def organism_data(name: str, n: int, seed: int) -> tuple[Tensor, Tensor | None, Any]:
    """An organism's prompts, CE targets (its answers at the query position, when it has them)
    and its tokenizer."""
    import torch

    from interp import organisms

    org = organisms.get(name)
    data = org.dataset(n, seed)
    targets = None
    if hasattr(data, "answer") and hasattr(data, "query_pos"):
        targets = torch.full_like(data.tokens, -1)
        targets[torch.arange(data.tokens.shape[0]), data.query_pos] = data.answer
    return data.tokens, targets, org.tokenizer()


def write_dashboards(trace: Any, features: Any, path: str | Path, *, title: str | None = None) -> Path:
    """Dashboards of several features (`interp.sae.FeatureTrace.plot`) in one offline HTML file
    (plotly.js embedded once)."""
    from interp.report import Report

    report = Report(title or f"SAE features at {trace.hook_name}")
    for f in features:
        i = trace.index(int(f))
        report.add(f"feature {int(f)}", f"frequency {float(trace.frequency[i]):.4f}, mean activation "
                                        f"{float(trace.mean_activation[i]):.4f}", [trace.plot(int(f))])
    return report.write(path)


def _eval_table(ev: Any) -> Table:
    table = Table(title=f"SAE at {ev.hook_name} ({ev.n_tokens} tokens)")
    table.add_column("metric")
    table.add_column("CE targets")
    table.add_column("value", justify="right")
    for k in ("variance_explained", "mse", "l0", "dead_fraction", "dense_fraction"):
        table.add_row(k, "", f"{getattr(ev, k):.4f}")
    for c in ev.ce:
        for k in ("clean", "sae", "ablate", "score"):
            table.add_row(f"ce_{k}", c.targets, f"{getattr(c, k):.4f}")
        table.add_row("ce_n", c.targets, str(c.n_targets))
    return table


def _target_sets(toks: Tensor, answer_targets: Tensor | None) -> dict[str, Tensor]:
    """CE target sets: next-token prediction everywhere, and the task's answer position if known."""
    from interp.sae.evaluation import NEXT_TOKEN, next_token_targets
    from interp.tokens import Batch

    sets = {NEXT_TOKEN: next_token_targets(Batch.of(toks))}
    if answer_targets is not None:
        sets["answer"] = answer_targets
    return sets


@app.command("train")
def train_cmd(
    model: str = typer.Argument(..., help="organism:NAME, a saved model directory, or a pretrained name"),
    hook: str = typer.Option(..., help="hook to read, e.g. blocks.2.hook_resid_post"),
    out: Path = typer.Option(..., help="directory to write (sae-lens format + manifest.json)"),
    tokens: Path | None = typer.Option(None, help=".safetensors file with a 'tokens' tensor"),
    n_prompts: int = typer.Option(8000, help="training prompts"),
    n_eval: int = typer.Option(1000, help="held-out prompts for the evaluation in the manifest"),
    seed: int = typer.Option(0),
    d_sae: int = typer.Option(512),
    k: int = typer.Option(8, help="active features per token (topk / batchtopk)"),
    architecture: str = typer.Option("topk"),
    samples: int = typer.Option(2_000_000, help="training activations (with repetition)"),
    lr: float = typer.Option(3e-3),
    batch_size: int = typer.Option(1024),
    positions: str = typer.Option("all", help="all | last"),
    threads: int = typer.Option(1),
    overwrite: bool = typer.Option(False, help="replace an existing SAE directory at OUT (other files kept)"),
) -> None:
    """Train an SAE at HOOK of MODEL, evaluate it on held-out prompts, save it with a manifest."""
    _quiet(threads)
    import torch

    from interp.atomic import check_destination
    from interp.models import load_model
    from interp.sae.evaluation import evaluate
    from interp.sae.io import SAE_DIR, save
    from interp.sae.training import TrainConfig, train

    check_destination(out, SAE_DIR, overwrite=overwrite)  # refuse before any training
    m = load_model(model)
    toks, _, _ = load_data(model, tokens, n_prompts, seed)
    sae_kwargs = {"k": k} if architecture in ("topk", "batchtopk", "abstopk") else {}
    cfg = TrainConfig(architecture=architecture, d_sae=d_sae, sae_kwargs=sae_kwargs, lr=lr, batch_size=batch_size,
                      training_samples=samples, seed=seed)
    res = train(m, toks, hook, cfg, positions=positions, model_name=model)
    eval_toks, targets, _ = load_data(model, tokens, n_eval, seed + 1_000_003)
    if tokens is not None:
        eval_toks = toks[-n_eval:]
    ev = evaluate(m, res.sae, eval_toks, targets=_target_sets(eval_toks, targets), positions=positions)
    manifest = {
        "model": model, "model_weights": res.sae.cfg.metadata.get("model_weights"), "hook_name": res.hook_name, "train_config": cfg.to_dict(), "positions": positions,
        "data": {"source": str(tokens) if tokens else f"{model} dataset", "n_prompts": n_prompts, "seed": seed,
                 "eval_seed": seed + 1_000_003, "n_eval": n_eval},
        "training_seconds": round(res.seconds, 2), "steps": res.steps, "eval": ev.values,
        "command": (f"interp sae train {model} --hook {hook} --out {out} --n-prompts {n_prompts} --seed {seed} "
                    f"--d-sae {d_sae} --k {k} --architecture {architecture} --samples {samples} --lr {lr} "
                    f"--batch-size {batch_size} --positions {positions}"
                    + (f" --tokens {tokens}" if tokens else "")),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
    }
    save(res.sae, out, manifest=manifest, overwrite=overwrite)
    console.print(_eval_table(ev))
    console.print(f"saved {out} (trained in {res.seconds:.1f} s)")


@app.command("eval")
def eval_cmd(
    sae: str = typer.Argument(..., help="sae:NAME, an SAE directory (sae-lens format)"),
    model: str = typer.Option(..., help="the model the SAE reads"),
    tokens: Path | None = typer.Option(None, help=".safetensors file with a 'tokens' tensor"),
    n_prompts: int = typer.Option(1000),
    seed: int = typer.Option(1),
    positions: str = typer.Option("all", help="all | last"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    allow_mismatch: bool = typer.Option(False, help="evaluate even if MODEL is not the one the SAE was trained on"),
    threads: int = typer.Option(1),
) -> None:
    """Evaluate an SAE: variance explained, L0, dead/dense fractions, CE score on each target set
    (next-token; the answer position too for an organism with answers)."""
    _quiet(threads)
    from interp.models import load_model
    from interp.sae.evaluation import evaluate
    from interp.sae.io import load

    m = load_model(model)
    s = load(sae)
    toks, targets, _ = load_data(model, tokens, n_prompts, seed)
    ev = evaluate(m, s, toks, targets=_target_sets(toks, targets), positions=positions,
                  allow_mismatch=allow_mismatch)
    if json_out:
        console.print_json(json.dumps(ev.values))
    else:
        console.print(_eval_table(ev))


@app.command("dashboard")
def dashboard_cmd(
    sae: str = typer.Argument(..., help="sae:NAME or an SAE directory"),
    model: str = typer.Option(...),
    out: Path = typer.Option(Path("sae_features.html")),
    features: str = typer.Option("", help="comma-separated feature ids (default: the 8 most frequent)"),
    n_prompts: int = typer.Option(1000),
    seed: int = typer.Option(1),
    allow_mismatch: bool = typer.Option(False, help="trace even if MODEL is not the one the SAE was trained on"),
    threads: int = typer.Option(1),
) -> None:
    """Write an offline HTML page with feature dashboards."""
    _quiet(threads)
    from interp.models import load_model
    from interp.sae.io import load
    from interp.sae.tracing import trace

    m = load_model(model)
    s = load(sae)
    toks, _, tok = load_data(model, None, n_prompts, seed)
    tr = trace(m, s, toks, tokenizer=tok, allow_mismatch=allow_mismatch)
    feats = ([int(f) for f in features.split(",") if f.strip()] if features
             else tr.features[tr.frequency.argsort(descending=True)[:8]].tolist())
    write_dashboards(tr, feats, out)
    console.print(f"wrote {out} ({len(feats)} features)")


@app.command("planted")
def planted_cmd(
    n_features: int = typer.Option(512),
    d_model: int = typer.Option(256),
    k: int = typer.Option(6),
    samples: int = typer.Option(3_000_000),
    p: float = typer.Option(0.01, help="firing probability of each planted feature"),
    threads: int = typer.Option(1),
) -> None:
    """Planted ground truth: recover known feature directions from superposition (sae-lens synthetic data)."""
    from interp.sae.planted import main

    main(["--n-features", str(n_features), "--d-model", str(d_model), "--k", str(k), "--samples", str(samples),
          "--p", str(p), "--threads", str(threads)])


if __name__ == "__main__":
    app()
