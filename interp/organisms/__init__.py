"""Model organisms: small transformers trained here on synthetic tasks whose mechanism is known.

An interpretability method earns trust by recovering a mechanism that is known to be there. Each
organism is an ordinary `HookedTransformer` checkpoint under ``data/organisms/NAME`` (load it with
``interp.load_model("organism:NAME")``), with a task generator that returns ground-truth labels,
a CPU training recipe (deterministic from a seed) and acceptance criteria.

- ``induction``: induction heads (Elhage et al. 2021; Olsson et al. 2022), learned from scratch;
  ``induction-1layer`` is its one-layer control (it must fail the textbook test).
- ``multihop``: in-context two-hop lookup, one-hop control (Yang et al. 2024; Biran et al. 2024).
- ``retrieval-learned`` / ``retrieval-rotary`` / ``retrieval-nope``: key->value retrieval at a
  controlled distance, three positional schemes (Haviv et al. 2022; Kazemnejad et al. 2023).
- ``planning``: a cue determines a multi-token word before it is emitted (Pal et al. 2023;
  Wu, Morris & Levine 2024).
- ``retry`` / ``retry-clean``: a step chain with wrong steps, a back-off marker and the correct
  step, and its error-free control (Ye et al. 2024, Physics of Language Models 2.2).
- ``reach-direct`` / ``reach-cot`` / ``reach-continuous``: in-context graph reachability answered
  directly, after a token chain of thought, or after continuous thoughts (Hao et al. 2024 Coconut;
  Zhu et al. 2025).

Every organism module offers ``config()``, ``tokenizer()``, ``dataset(n, seed)``,
``train(steps, seed, progress)``, ``evaluate(model, n, seed)`` and ``ACCEPTANCE``; those with a
declared circuit (in the manifest's ``circuit``, see `interp.circuits`) also offer
``circuit_prompts(n, seed)``: fixed-layout clean / corrupted prompts with named positions.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import platform
from importlib.metadata import version as _version
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # imported where used: `interp organisms --help` must not import torch
    from interp.organisms.base import Criterion
    from interp.organisms.training import TrainLog
    from interp.tl import HookedTransformer, HookedTransformerConfig
    from interp.tokens import VocabTokenizer

log = logging.getLogger(__name__)

NAMES: tuple[str, ...] = ("induction", "induction-1layer", "multihop", "retrieval-learned",
                          "retrieval-rotary", "retrieval-nope", "planning", "retry", "retry-clean",
                          "reach-direct", "reach-cot", "reach-continuous")

_MODULES = {"induction": "induction", "induction-1layer": "induction", "multihop": "multihop", "retrieval-learned": "retrieval",
            "retrieval-rotary": "retrieval", "retrieval-nope": "retrieval", "planning": "planning",
            "retry": "retry", "retry-clean": "retry",
            "reach-direct": "reach", "reach-cot": "reach", "reach-continuous": "reach"}


@runtime_checkable
class Organism(Protocol):
    """What `get(name)` returns: a module (or, for the retrieval variants, a bound variant)."""

    NAME: str
    TASK: str
    MECHANISM: str
    DEFAULT_STEPS: int
    ACCEPTANCE: tuple[Criterion, ...]

    def config(self) -> HookedTransformerConfig: ...

    def tokenizer(self) -> VocabTokenizer: ...

    def dataset(self, n: int, seed: int) -> Any: ...

    def train(self, steps: int = ..., seed: int = ..., progress: bool = ...,
              threads: int | None = ...) -> tuple[HookedTransformer, TrainLog]: ...

    def evaluate(self, model: HookedTransformer, n: int = ..., seed: int = ...) -> dict[str, Any]: ...


def get(name: str) -> Organism:
    """The organism module (or retrieval variant) called `name`."""
    if name not in _MODULES:
        close = difflib.get_close_matches(name, NAMES, n=3)
        raise ValueError(f"organism {name!r}: expected one of {list(NAMES)}, got an unknown name"
                         + (f"; did you mean {close}?" if close else ""))
    module: ModuleType = importlib.import_module(f"interp.organisms.{_MODULES[name]}")
    if _MODULES[name] in ("retrieval", "induction", "retry", "reach"):
        return module.variant(name)  # type: ignore[no-any-return]
    return module  # type: ignore[return-value]


def train(name: str, steps: int | None = None, seed: int = 0, progress: bool = True,
          threads: int | None = 1) -> tuple[HookedTransformer, TrainLog]:
    """Train organism `name` from scratch; returns the model and its loss log."""
    org = get(name)
    return org.train(steps=steps or org.DEFAULT_STEPS, seed=seed, progress=progress, threads=threads)


def evaluate(name_or_model: str | HookedTransformer, n: int | None = None, seed: int = 1,
             name: str | None = None) -> dict[str, Any]:
    """Metrics of a shipped organism (by name) or of a model (then pass the organism `name`)."""
    from interp.models import load_model

    if isinstance(name_or_model, str):
        name = name_or_model
        model = load_model(f"organism:{name}")
    else:
        model = name_or_model
        if name is None:
            arch = str(model.cfg.original_architecture or "")
            name = arch.removeprefix("interp-organism-") if arch.startswith("interp-organism-") else None
            if name is None and arch == "interp-NoPE":
                name = "retrieval-nope"
        if name not in NAMES:
            raise ValueError(f"evaluate(model): expected `name=` one of {list(NAMES)} for a model "
                             f"that is not a shipped organism, got {name!r}")
    org = get(name)
    return org.evaluate(model, **({"n": n} if n else {}), seed=seed)


def manifest(name: str, model_log: TrainLog, metrics: dict[str, Any],
             model: HookedTransformer | None = None) -> dict[str, Any]:
    """The JSON manifest facts for a trained organism (save_model adds the sha256)."""
    import torch

    from interp.models import config_to_dict
    from interp.organisms.base import check, failures

    org = get(name)
    return {
        "organism": name,
        "config": config_to_dict(model.cfg if model is not None else org.config()),
        "task": org.TASK,
        "mechanism": org.MECHANISM,
        "seed": model_log.seed,
        "steps": model_log.steps,
        "train_seconds": round(model_log.seconds, 1),
        "train_hardware": f"{platform.machine()} CPU, torch threads used in training: 1",
        "metrics": metrics,
        "acceptance": check(org.ACCEPTANCE, metrics),
        "accepted": not failures(org.ACCEPTANCE, metrics),
        "training": model_log.summary(),
        "versions": {"torch": torch.__version__, "transformer_lens": _version("transformer-lens")},
    }


class AcceptanceError(RuntimeError):
    """A trained organism missed its acceptance criteria."""


def train_and_save(name: str, steps: int | None = None, seed: int = 0, out: str | Path | None = None,
                   progress: bool = True, eval_n: int | None = None, save_failed: bool = False,
                   overwrite: bool = False) -> tuple[Path | None, dict[str, Any]]:
    """Train, evaluate on held-out data and save to `out` (default data/organisms/NAME).

    A model that misses its acceptance criteria is not saved (unless `save_failed`) and raises
    `AcceptanceError` listing what failed, so a bad run never replaces a shipped checkpoint.
    An existing model directory at `out` (a shipped checkpoint included) is replaced only with
    `overwrite=True`; that, and a folder that is not a model, is refused before training.
    """
    from interp.atomic import check_destination
    from interp.models import MODEL_DIR, organisms_dir, save_model
    from interp.organisms.base import failures

    org = get(name)
    dest = Path(out) if out else organisms_dir() / name
    check_destination(dest, MODEL_DIR, overwrite=overwrite)
    model, train_log = train(name, steps=steps, seed=seed, progress=progress)
    metrics = evaluate(model, n=eval_n, name=name)
    facts = manifest(name, train_log, metrics, model)
    failed = failures(org.ACCEPTANCE, metrics)
    path = None
    if not failed or save_failed:
        path = save_model(model, dest, manifest=facts, vocab=list(org.tokenizer().vocab), overwrite=overwrite)
    if failed:
        raise AcceptanceError(f"organism {name!r} after {train_log.steps} steps: expected all "
                              f"acceptance criteria to pass, got failures: {failed}"
                              + (f" (saved anyway to {path})" if path else " (not saved)"))
    return path, facts


__all__ = ["NAMES", "AcceptanceError", "Organism", "evaluate", "get", "manifest", "train",
           "train_and_save"]
