"""Config-driven, resumable probe sweeps over models x hooks x positions x targets.

Plan, then apply: `plan` enumerates the cells of a `SweepConfig`; `sweep` builds (or reopens)
one activation store per model with `interp.cache.collect(..., out=DIR)`, then runs the cells
that have no output yet on a backend (this process, local worker processes, or Ray). Each cell
fits one probe over all layers of its hook (`interp.probing.fit`) and writes its rows to
``OUT/cells/<cell>.parquet`` atomically, so an interrupted sweep resumes where it stopped and a
rerun fits nothing. The combined table is written as ``OUT/probes.parquet``, ``probes.csv`` and
an offline ``probes.html``.

Output folder layout::

    OUT/config.json          the resolved config of the last run
    OUT/stores/<model>/      activation stores (sharded safetensors + manifest)
    OUT/cells/<cell>.parquet one finished cell (model, hook, position, target; all layers)
    OUT/probes.{parquet,csv,html}
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from rich.progress import Progress
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.atomic import atomic_file, write_json_atomic
from interp.graph import Node, Site
from interp.models import load_model, new_model
from interp.probing import fit, plot_frame, save_frame
from probes.backends import get_backend
from probes.config import PositionEntry, SweepConfig, load_config

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"


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
    def key(self) -> str:
        """A file-safe, collision-free name."""
        text = f"{self.model}|{self.hook}|{self.position_label}|{self.target}"
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{self.model}__{self.hook}__{self.position_label}__{self.target}")
        return f"{slug[:80]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def plan(config: SweepConfig) -> list[Cell]:
    """Every cell of the sweep, in a stable order."""
    return [Cell(m, h, p, t.name) for m in config.models for h in config.hooks
            for t in config.targets for p in config.positions_of(t)]


def cell_path(config: SweepConfig, cell: Cell) -> Path:
    return config.out_dir / "cells" / f"{cell.key}.parquet"


def store_path(config: SweepConfig, model: str) -> Path:
    return config.out_dir / "stores" / re.sub(r"[^A-Za-z0-9_.-]+", "-", model)


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
    from interp.organisms import get

    spec = config.data
    return get(spec.organism).dataset(spec.n, spec.seed, **dict(spec.kwargs))


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

    @property
    def values(self) -> pd.DataFrame:
        return self.frame

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()

    def plot(self) -> go.Figure:
        return plot_frame(self.frame, title=f"Probe sweep {self.config.name}")


def _layers_of(config: SweepConfig, model: HookedTransformer) -> list[int]:
    n_layers = model.cfg.n_layers
    if config.layers is None:
        return list(range(n_layers))
    bad = [v for v in config.layers if v >= n_layers]
    if bad:
        raise ValueError(f"layers: expected indices below the model's {n_layers} layers, got {bad}")
    return list(config.layers)


def _store_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def sweep(
    config: SweepConfig | str | Path,
    *,
    workers: int = 1,
    backend: str = "auto",
    address: str | None = None,
    progress: bool = True,
) -> SweepResult:
    """Run every unfinished cell of `config` (a `SweepConfig` or a YAML path) and combine all cells.

    `workers`: local processes (backend ``auto``/``process``) or Ray CPUs when Ray is started
    here (backend ``ray``; `address` joins an existing cluster).
    """
    from interp.cache import collect

    cfg = config if isinstance(config, SweepConfig) else load_config(config)
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", cfg.to_dict())
    cells = plan(cfg)
    todo = [c for c in cells if not cell_path(cfg, c).is_file()]
    log.info("sweep %s: %d cells, %d already done", cfg.name, len(cells), len(cells) - len(todo))
    payloads: list[dict[str, Any]] = []
    p = cfg.probe
    probe_args = {"test_fraction": p.test_fraction, "seed": cfg.seed, "C": p.C, "max_iter": p.max_iter,
                  "tol": p.tol, "alphas": p.alphas, "cv": p.cv, "shuffled": p.shuffled, "n_boot": p.n_boot,
                  "ci": p.ci}
    if todo:
        data = load_dataset(cfg)
        positions = store_positions(cfg)
        for spec in dict.fromkeys(c.model for c in todo):
            model = build_model(spec, seed=cfg.seed)
            layers = _layers_of(cfg, model)
            hooks = [Node(layer, Site(h)) for h in cfg.hooks for layer in layers]
            spath = store_path(cfg, spec)
            store = collect(model, data.tokens, hooks=hooks, positions=positions, dtype=_store_dtype(cfg.store_dtype),
                    batch_size=cfg.batch_size, out=spath, progress=progress)
            del model
            lengths = store.lengths.long()
            for c in (c for c in todo if c.model == spec):
                payloads.append(cell_inputs(cfg, c, data, lengths) | {
                    "store": str(spath), "path": str(cell_path(cfg, c)), "layers": layers,
                    "hook_names": [Node(layer, Site(c.hook)).hook_name for layer in layers],
                    "probe": probe_args, "meta": {"model": c.model, "hook": c.hook,
                                                  "position": c.position_label, "target": c.target}})
    runner = get_backend(backend, workers, address)
    fitted = 0
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"probe cells ({cfg.name})", total=len(payloads))
        for _ in runner.map(run_cell, payloads):
            fitted += 1
            bar.update(task, advance=1)
    frame = pd.concat([pd.read_parquet(cell_path(cfg, c)) for c in cells], ignore_index=True)
    paths = save_frame(frame, out, title=f"Probe sweep {cfg.name}")
    json_summary = {"cells": len(cells), "fitted": fitted, "skipped": len(cells) - len(todo)}
    write_json_atomic(out / "summary.json", json_summary)
    return SweepResult(cfg, frame, fitted, len(cells) - len(todo), paths)


def finished(config: SweepConfig) -> list[Cell]:
    """Cells of `config` whose output exists."""
    return [c for c in plan(config) if cell_path(config, c).is_file()]


def summary(cells: Sequence[Cell], config: SweepConfig) -> str:
    done = {c.key for c in finished(config)}
    lines = [f"{'done' if c.key in done else 'todo'}  {c.model}  {c.hook}  {c.position_label}  {c.target}"
             for c in cells]
    return "\n".join(lines)
