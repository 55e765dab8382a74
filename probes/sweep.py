"""Config-driven, resumable probe sweeps over models x hooks x positions x targets.

Plan, then apply: `plan` enumerates the cells of a `SweepConfig`; `sweep` checks the config
against the dataset and models (before any work is done or any file is written), builds (or
reopens) one activation store per model with `interp.cache.collect(..., out=DIR)`, then runs the
cells that have no output yet on a backend (this process, local worker processes, or Ray). Each
cell fits one probe over all layers of its hook (`interp.probing.fit`) and writes its rows to
``OUT/cells/<cell>.parquet`` atomically, so an interrupted sweep resumes where it stopped and a
rerun fits nothing. The combined table is written as ``OUT/probes.parquet``, ``probes.csv`` and
an offline ``probes.html``.

Stores and cells are named by a content hash of their resolved specs (`probes.identity`): after
a change of `data`, `probe`, `seed`, a model's weights, ... the affected cells get new names and
are recomputed (the run says what changed); outputs of earlier configs stay on disk, unused.

Output folder layout::

    OUT/config.json                 the config of the last run
    OUT/resolved.json               that config plus the model fingerprints (what the next run diffs)
    OUT/stores/<model>-<hash>/      activation stores (sharded safetensors + manifest)
    OUT/cells/<cell>-<hash>.parquet one finished cell (model, hook, position, target; all layers)
    OUT/probes.{parquet,csv,html}
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from rich.progress import Progress
from torch import Tensor

from interp.atomic import atomic_file, write_json_atomic
from interp.graph import Node, Site
from interp.models import load_model, new_model
from interp.probing import fit, plot_frame, save_frame
from interp.tl import HookedTransformer
from interp.tokens import Batch
from probes.backends import get_backend
from probes.config import PositionEntry, SweepConfig, load_config
from probes.identity import (
    RANDOM_PREFIX,
    cell_spec,
    changes,
    digest,
    model_spec_identity,
    n_layers,
    store_spec,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    """One probe fit: a model, a hook (site, all layers), a position entry and a target."""

    model: str
    hook: str
    position: PositionEntry
    target: str

    @property
    def position_label(self) -> str:
        p = self.position
        return ",".join(str(v) for v in p) if isinstance(p, tuple) else str(p)

    @property
    def slug(self) -> str:
        """A file-safe, readable name (not unique: `cell_path` adds the content hash)."""
        return _slug(f"{self.model}__{self.hook}__{self.position_label}__{self.target}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:80]


def plan(config: SweepConfig) -> list[Cell]:
    """Every cell of the sweep, in a stable order."""
    return [Cell(m, h, p, t.name) for m in config.models for h in config.hooks
            for t in config.targets for p in config.positions_of(t)]


def cell_path(config: SweepConfig, cell: Cell, fingerprint: Mapping[str, Any] | None = None) -> Path:
    """Where `cell` is written: its readable slug and a hash of its resolved spec.

    `fingerprint`: the cell model's `model_spec_identity` (computed here when not given).
    """
    fp = model_spec_identity(cell.model, config.seed) if fingerprint is None else fingerprint
    key = digest(cell_spec(config, fp, cell.hook, cell.position, cell.target))
    return config.out_dir / "cells" / f"{cell.slug}-{key}.parquet"


def store_path(config: SweepConfig, model: str, fingerprint: Mapping[str, Any] | None = None) -> Path:
    """The activation store of `model`: its slug and a hash of its resolved spec."""
    fp = model_spec_identity(model, config.seed) if fingerprint is None else fingerprint
    return config.out_dir / "stores" / f"{_slug(model)}-{digest(store_spec(config, fp, store_positions(config)))}"


def store_positions(config: SweepConfig) -> str | list[int]:
    """What each store keeps: every position if any entry is ``all``, else the union of indices."""
    entries = [p for t in config.targets for p in config.positions_of(t)]
    if "all" in entries:
        return "all"
    out: list[int] = []
    for p in entries:
        for v in (p if isinstance(p, tuple) else (-1 if p == "last" else p,)):
            if v not in out:
                out.append(int(v))
    return out


def build_model(spec: str, seed: int = 0) -> HookedTransformer:
    """`interp.load_model(spec)`, or for ``random:SPEC`` a random-initialised model of its shape."""
    if spec.startswith(RANDOM_PREFIX):
        cfg = load_model(spec.removeprefix(RANDOM_PREFIX)).cfg
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            return new_model(cfg)
    return load_model(spec)


def load_dataset(config: SweepConfig) -> Any:
    """The organism's dataset; unknown organisms and keyword arguments are refused by name."""
    from interp.organisms import get

    spec = config.data
    kwargs = dict(spec.kwargs)
    try:
        make = get(spec.organism).dataset
    except ValueError as e:
        raise ValueError(f"data.organism: {e}") from e
    params = inspect.signature(make).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        valid = [k for k in params if k not in ("n", "seed")]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ValueError(f"data.kwargs: expected keyword arguments of the {spec.organism} dataset among "
                             f"{valid}, got unknown {unknown}")
    try:
        return make(spec.n, spec.seed, **kwargs)
    except TypeError as e:
        raise ValueError(f"data ({spec.organism}, kwargs {kwargs}): expected arguments its dataset accepts, "
                         f"got {type(e).__name__}: {e}") from e


# ------------------------------------------------------------------------------------ one cell


def _rows(entry: PositionEntry, stored: str | list[int], lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Store columns and absolute positions [n, k] for a position entry."""
    n = lengths.shape[0]
    if entry == "all":
        width = int(lengths.max())
        if int(lengths.min()) != width:
            raise ValueError(f"positions 'all': expected prompts of one length, got lengths "
                             f"{int(lengths.min())}..{width}")
        cols = torch.arange(width).expand(n, -1)
        return cols, cols
    wanted = list(entry) if isinstance(entry, tuple) else [-1 if entry == "last" else int(entry)]
    wanted_t = torch.tensor(wanted, dtype=torch.long)
    short = int(lengths.min())
    bad = [v for v in wanted if not -short <= v < short]
    if bad:
        raise ValueError(f"positions {list(wanted) if isinstance(entry, tuple) else entry!r}: expected indices in "
                         f"[-{short}, {short}) (the shortest prompt has {short} tokens), got {bad}")
    absolute = torch.where(wanted_t[None] < 0, lengths[:, None] + wanted_t[None], wanted_t[None].expand(n, -1))
    if stored == "all":
        return absolute, absolute
    cols = torch.tensor([stored.index(v) for v in wanted], dtype=torch.long).expand(n, -1)
    return cols, absolute


def _values(data: Any, name: str, what: str) -> Tensor:
    value = getattr(data, name, None)
    if not isinstance(value, Tensor):
        fields = sorted(k for k in dir(data) if not k.startswith("_") and isinstance(getattr(data, k, None), Tensor))
        raise ValueError(f"{what} {name!r}: expected a tensor attribute of the dataset, got "
                         f"{type(value).__name__}; available: {fields}")
    return value


def cell_inputs(config: SweepConfig, cell: Cell, data: Any, lengths: Tensor) -> dict[str, Any]:
    """Everything a worker needs for one cell besides the store: rows, labels, groups, types.

    Computed in the driver from the dataset, so workers never regenerate (or re-import) it.
    """
    target = next(t for t in config.targets if t.name == cell.target)
    cols, absolute = _rows(cell.position, store_positions(config), lengths)
    n, k = cols.shape
    example = torch.arange(n)[:, None].expand(n, k)
    row_tokens = data.tokens[example, absolute].reshape(-1)
    if target.field == "position":
        labels = absolute.reshape(-1).double()
    elif target.field == "token":
        labels = row_tokens
    else:
        labels = _values(data, target.field, f"target {target.name!r} field")[:, None].expand(n, k).reshape(-1)
    if target.kind == "ridge":
        labels = labels.double()
    elif labels.dtype.is_floating_point:
        raise ValueError(f"target {target.name!r}: expected integer classes for a logistic probe, got "
                         f"dtype {labels.dtype}; use kind: ridge for a regression target")
    if target.control == "none":
        types = None
    elif target.control == "token":
        types = row_tokens
    elif target.control == "example":
        types = example.reshape(-1)
    elif target.control.startswith("token@"):  # the token at a per-example position, e.g. token@fact1_pos
        where = _values(data, target.control.removeprefix("token@"), f"target {target.name!r} control position")
        types = data.tokens[torch.arange(n), where.long()][:, None].expand(n, k).reshape(-1)
    else:
        types = _values(data, target.control, f"target {target.name!r} control")[:, None].expand(n, k).reshape(-1)
    return {"cols": cols.contiguous(), "labels": labels.contiguous(), "groups": example.reshape(-1).contiguous(),
            "types": None if types is None else types.contiguous(), "kind": target.kind}


def run_cell(payload: dict[str, Any]) -> dict[str, Any]:
    """Fit one cell and write its rows atomically; top-level so that processes and Ray can run it."""
    from interp.store import open_store

    store = open_store(payload["store"], verify=False)
    cols = payload["cols"]
    n, k = cols.shape
    example = torch.arange(n)[:, None].expand(n, k)
    features = torch.stack([store[name][example, cols].reshape(n * k, -1) for name in payload["hook_names"]])
    res = fit(features, payload["labels"], payload["kind"], groups=payload["groups"], types=payload["types"],
              layers=payload["layers"], meta=payload["meta"], **payload["probe"])
    frame = res.to_frame()
    path = Path(payload["path"])
    with atomic_file(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return {"path": str(path), "rows": len(frame)}


# --------------------------------------------------------------------------------------- sweep


@dataclass(frozen=True)
class SweepResult:
    """The combined table of a sweep and what this run did (cells fitted vs already done)."""

    config: SweepConfig
    frame: pd.DataFrame
    n_fitted: int
    n_skipped: int
    paths: dict[str, Path]
    changed: tuple[str, ...] = ()  # content-relevant config changes since the last run in the same folder

    @property
    def values(self) -> pd.DataFrame:
        return self.frame

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()

    def plot(self) -> go.Figure:
        return plot_frame(self.frame, title=f"Probe sweep {self.config.name}")


def _layers_of(config: SweepConfig, model: str, count: int) -> list[int]:
    if config.layers is None:
        return list(range(count))
    bad = [v for v in config.layers if v >= count]
    if bad:
        raise ValueError(f"layers: expected indices below the {count} layers of {model}, got {bad}")
    return list(config.layers)


def _store_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def _previous_record(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None


RECORD = "resolved.json"


def sweep(
    config: SweepConfig | str | Path,
    *,
    workers: int = 1,
    backend: str = "auto",
    address: str | None = None,
    progress: bool = True,
) -> SweepResult:
    """Run every unfinished cell of `config` (a `SweepConfig` or a YAML path) and combine all cells.

    A cell is finished when a file for its exact resolved spec exists (`probes.identity`); cells
    whose data, probe, seed or model changed since the last run are recomputed, never reused.
    `workers`: local processes (backend ``auto``/``process``) or Ray CPUs when Ray is started
    here (backend ``ray``; `address` joins an existing cluster).
    """
    from interp.cache import collect

    cfg = config if isinstance(config, SweepConfig) else load_config(config)
    runner = get_backend(backend, workers, address)
    # plan and check everything before any work is done or any file is written
    fingerprints = {m: model_spec_identity(m, cfg.seed) for m in cfg.models}
    cells = plan(cfg)
    paths = {c: cell_path(cfg, c, fingerprints[c.model]) for c in cells}
    todo = [c for c in cells if not paths[c].is_file()]
    out = cfg.out_dir
    record = {"config": cfg.to_dict(), "models": fingerprints}
    previous = _previous_record(out)
    changed = tuple(changes(previous, record)) if previous is not None else ()
    if changed:
        log.warning("sweep %s: config changed since the last run in %s (%s); recomputing the cells it affects",
                    cfg.name, out, "; ".join(changed))
    log.info("sweep %s: %d cells, %d already done", cfg.name, len(cells), len(cells) - len(todo))
    p = cfg.probe
    probe_args = {"test_fraction": p.test_fraction, "seed": cfg.seed, "C": p.C, "max_iter": p.max_iter,
                  "tol": p.tol, "alphas": p.alphas, "cv": p.cv, "shuffled": p.shuffled, "n_boot": p.n_boot,
                  "ci": p.ci}
    data: Any = None
    inputs: dict[Cell, dict[str, Any]] = {}
    layers_of: dict[str, list[int] | None] = {}
    if todo:
        data = load_dataset(cfg)
        lengths = Batch.of(data.tokens).lengths  # what `collect` records for a plain token tensor
        inputs = {c: cell_inputs(cfg, c, data, lengths) for c in todo}
        for spec in dict.fromkeys(c.model for c in todo):
            count = n_layers(spec)
            layers_of[spec] = None if count is None else _layers_of(cfg, spec, count)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", cfg.to_dict())
    write_json_atomic(out / RECORD, record)
    payloads: list[dict[str, Any]] = []
    for spec in dict.fromkeys(c.model for c in todo):
        model = build_model(spec, seed=cfg.seed)
        layers = layers_of[spec] or _layers_of(cfg, spec, model.cfg.n_layers)
        hooks = [Node(layer, Site(h)) for h in cfg.hooks for layer in layers]
        spath = store_path(cfg, spec, fingerprints[spec])
        store = collect(model, data.tokens, hooks=hooks, positions=store_positions(cfg),
                        dtype=_store_dtype(cfg.store_dtype), batch_size=cfg.batch_size, out=spath, progress=progress)
        del model
        if not torch.equal(store.lengths.long(), lengths.long()):
            raise ValueError(f"store {spath}: expected {lengths.shape[0]} prompts of the dataset's lengths, got "
                             f"{store.lengths.shape[0]} rows that differ; the store was built from other data: "
                             f"delete it to rebuild")
        for c in (c for c in todo if c.model == spec):
            payloads.append(inputs[c] | {
                "store": str(spath), "path": str(paths[c]), "layers": layers,
                "hook_names": [Node(layer, Site(c.hook)).hook_name for layer in layers],
                "probe": probe_args, "meta": {"model": c.model, "hook": c.hook,
                                              "position": c.position_label, "target": c.target}})
    fitted = 0
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"probe cells ({cfg.name})", total=len(payloads))
        for _ in runner.map(run_cell, payloads):
            fitted += 1
            bar.update(task, advance=1)
    frame = pd.concat([pd.read_parquet(paths[c]) for c in cells], ignore_index=True)
    unused = len({f.name for f in (out / "cells").glob("*.parquet")} - {paths[c].name for c in cells})
    if unused:
        log.info("sweep %s: %d cell files of earlier configs in %s are not part of this table",
                 cfg.name, unused, out / "cells")
    saved = save_frame(frame, out, title=f"Probe sweep {cfg.name}")
    json_summary = {"cells": len(cells), "fitted": fitted, "skipped": len(cells) - len(todo), "changed": list(changed)}
    write_json_atomic(out / "summary.json", json_summary)
    return SweepResult(cfg, frame, fitted, len(cells) - len(todo), saved, changed)


def finished(config: SweepConfig) -> list[Cell]:
    """Cells of `config` whose output (for this exact resolved spec) exists."""
    fingerprints = {m: model_spec_identity(m, config.seed) for m in config.models}
    return [c for c in plan(config) if cell_path(config, c, fingerprints[c.model]).is_file()]


def summary(cells: Sequence[Cell], config: SweepConfig) -> str:
    done = set(finished(config))
    lines = [f"{'done' if c in done else 'todo'}  {c.model}  {c.hook}  {c.position_label}  {c.target}"
             for c in cells]
    return "\n".join(lines)
