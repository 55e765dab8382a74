"""Config-driven, resumable patching and investigation sweeps over models x prompt sets x methods.

The probe sweep (`probes.sweep`) generalised: one config (YAML or JSON) names models (any
`interp.load_model` spec, or ``random:SPEC`` for a random-initialised baseline), prompt sets (JSONL
files tokenized with each model's own tokenizer, or an organism's builder) and methods (an
activation-patching sweep at a site, or an investigation of `interp.hypotheses.run`); `plan`
expands them into cells, one per (model, prompt set, method). Each cell runs on a backend (this
process, local worker processes, or Ray tasks on a cluster: `probes.backends`), loads its model
and prompts itself, calls the library function, and writes its tidy frame to
``OUT/cells/<slug>-<hash>.parquet`` atomically. The hash is of the cell's resolved content (model
fingerprint, prompt set content, method and parameters, seed: `probes.identity.grid_cell_spec`),
so an interrupted run resumes where it stopped, a rerun computes nothing, and a changed input
gets a new cell (the run logs what changed). The combined table: ``OUT/grid.parquet`` and
``grid.csv``.

Config::

    name: multihop-patching
    models: ["organism:multihop", "random:organism:multihop"]
    prompts: ["data/prompts/my_set.jsonl", {organism: multihop, n: 64, seed: 0}]
    methods:
      - {name: resid, method: patch, params: {site: resid_pre, metric: logit_diff, positions: [query, last]}}
      - {name: kv, method: patch, params: {site: v, metric: logit_diff, positions: [fact1]}}
      - {name: sufficiency, method: last-token}
    seed: 0           # baselines and bootstrap
    n_boot: 1000      # CIs of patching cells
    device: null      # where cells run their model (cuda on a GPU worker); not part of a cell's identity

Cells load their own model (no model crosses a process boundary); a model shared by many cells
is loaded once per cell, which costs little beside a patching sweep for the organisms and small
models, and is what lets any worker of a cluster take any cell.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from interp.atomic import atomic_file, write_json_atomic
from interp.configs import unknown_keys
from probes.backends import get_backend
from probes.identity import (
    RANDOM_PREFIX,
    changes,
    digest,
    grid_cell_spec,
    model_spec_identity,
    prompts_identity,
)

log = logging.getLogger(__name__)

PATCH = "patch"
# investigations of interp.hypotheses.run that take one model (decay compares several: not a cell)
INVESTIGATIONS = ("multihop", "last-token", "routes", "plan-ahead", "course-correction")
METHODS = (PATCH, *INVESTIGATIONS)
METRICS = ("logit_diff", "answer_logprob", "rank", "top1")
PATCH_PARAMS = ("site", "metric", "positions", "layers", "heads", "direction")
RECORD = "resolved.json"


def _check_keys(cls: type, d: Any, where: str) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(d).__name__} ({d!r})")
    unknown = unknown_keys(cls, d)
    if unknown:
        known = sorted(f.name for f in dataclasses.fields(cls) if f.init)
        raise ValueError(f"{where}: expected keys among {known}, got unknown keys {unknown}")


def _freeze(value: Any) -> Any:
    """Lists as tuples and mappings as sorted pairs, so equal configs compare and hash equal."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(pairs: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in pairs}


@dataclass(frozen=True, kw_only=True)
class PromptSource:
    """A prompt set: a JSONL file (`path`; schema data/prompts/README.md) or an organism's builder
    ``interp.organisms.get(organism).prompts(n, seed, **kwargs)``."""

    path: str | None = None
    organism: str | None = None
    n: int = 64
    seed: int = 0
    kwargs: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if (self.path is None) == (self.organism is None):
            raise ValueError(f"prompts: expected a JSONL path or an organism, got path={self.path!r} "
                             f"organism={self.organism!r}; e.g. `prompts: [data/prompts/twohop.jsonl]` or "
                             f"`prompts: [{{organism: multihop, n: 64}}]`")
        if self.n < 1:
            raise ValueError(f"prompts n: expected >= 1, got {self.n}")

    @classmethod
    def from_value(cls, v: Any, where: str) -> PromptSource:
        if isinstance(v, str):
            return cls(path=v)
        _check_keys(cls, v, where)
        d = dict(v)
        d["kwargs"] = _freeze(d.get("kwargs") or {})
        return cls(**d)

    @property
    def label(self) -> str:
        if self.path is not None:
            return Path(self.path).name
        extra = "".join(f",{k}={v}" for k, v in self.kwargs)
        return f"{self.organism}[n={self.n},seed={self.seed}{extra}]"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "organism": self.organism, "n": self.n, "seed": self.seed,
                "kwargs": _thaw(self.kwargs)}


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """One method per cell: ``patch`` (`interp.patching.sweep` with `params`: site, metric,
    positions, layers, heads, direction) or an investigation of `interp.hypotheses.run`
    (`params`: its keyword arguments, e.g. ``n``)."""

    name: str
    method: str
    params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not self.name or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"methods name: expected letters, digits, '_', '.' or '-', got {self.name!r}")
        if self.method not in METHODS:
            raise ValueError(f"method {self.name!r}: expected one of {list(METHODS)}, got {self.method!r}")
        keys = [k for k, _ in self.params]
        if self.method == PATCH:
            bad = sorted(set(keys) - set(PATCH_PARAMS))
            if bad:
                raise ValueError(f"method {self.name!r} params: expected keys among {list(PATCH_PARAMS)}, got "
                                 f"unknown keys {bad}")
            metric = dict(self.params).get("metric", "logit_diff")
            if metric not in METRICS:
                raise ValueError(f"method {self.name!r} metric: expected one of {list(METRICS)}, got {metric!r}")
        elif {"model", "spec", "prompts"} & set(keys):
            raise ValueError(f"method {self.name!r} params: expected the investigation's own options, got "
                             f"{sorted({'model', 'spec', 'prompts'} & set(keys))}, which each cell sets")

    @classmethod
    def from_value(cls, v: Any, where: str) -> MethodSpec:
        _check_keys(cls, v, where)
        d = dict(v)
        d.setdefault("name", d.get("method", ""))
        d["params"] = _freeze(d.get("params") or {})
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "params": _thaw(self.params)}


@dataclass(frozen=True, kw_only=True)
class GridConfig:
    """Models x prompt sets x methods; every combination is one cell."""

    name: str
    models: tuple[str, ...]
    prompts: tuple[PromptSource, ...]
    methods: tuple[MethodSpec, ...]
    seed: int = 0
    n_boot: int = 1000
    alpha: float = 0.05
    out: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name: expected a non-empty name without '/', got {self.name!r}")
        for what, items in (("models", self.models), ("prompts", self.prompts), ("methods", self.methods)):
            if not items:
                raise ValueError(f"{what}: expected at least one entry, got none")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"methods: expected distinct names, got {names}")
        if self.n_boot < 10:
            raise ValueError(f"n_boot: expected >= 10 resamples, got {self.n_boot}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha: expected a level in (0, 1), got {self.alpha}")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / "grid" / self.name

    @classmethod
    def from_dict(cls, d: Any) -> GridConfig:
        """From parsed YAML/JSON; unknown keys at any level are an error."""
        _check_keys(cls, d, "grid config")
        d = dict(d)
        for key in ("name", "models", "prompts", "methods"):
            if key not in d:
                raise ValueError(f"grid config: expected key {key!r}, got keys {sorted(d)}")
        for key in ("models", "prompts", "methods"):
            if not isinstance(d[key], (list, tuple)):
                d[key] = [d[key]]
        if not all(isinstance(m, str) for m in d["models"]):
            raise ValueError(f"models: expected a list of model specs (strings), got {d['models']!r}")
        d["models"] = tuple(d["models"])
        d["prompts"] = tuple(PromptSource.from_value(p, f"prompts[{i}]") for i, p in enumerate(d["prompts"]))
        d["methods"] = tuple(MethodSpec.from_value(m, f"methods[{i}]") for i, m in enumerate(d["methods"]))
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "models": list(self.models), "prompts": [p.to_dict() for p in self.prompts],
                "methods": [m.to_dict() for m in self.methods], "seed": self.seed, "n_boot": self.n_boot,
                "alpha": self.alpha, "out": self.out, "device": self.device}


def load_grid_config(path: str | Path) -> GridConfig:
    """Read a grid config from YAML or JSON; every error names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid config: expected a YAML or JSON file, got no file at {path}")
    try:
        raw = yaml.safe_load(path.read_text())  # JSON is YAML
    except yaml.YAMLError as e:
        raise ValueError(f"grid config {path}: expected valid YAML or JSON, got a syntax error: {e}") from e
    try:
        return GridConfig.from_dict(raw)
    except ValueError as e:
        raise ValueError(f"grid config {path}: {str(e).removeprefix('grid config: ')}") from e


# ------------------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class GridCell:
    """One (model, prompt set, method) combination."""

    model: str
    prompts: PromptSource
    method: MethodSpec

    @property
    def slug(self) -> str:
        """A file-safe, readable name (not unique: `cell_path` adds the content hash)."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{self.model}__{self.prompts.label}__{self.method.name}")[:80]


def plan(config: GridConfig) -> list[GridCell]:
    """Every cell, in a stable order (model, then prompt set, then method)."""
    return [GridCell(m, p, t) for m in config.models for p in config.prompts for t in config.methods]


def _identities(config: GridConfig) -> tuple[dict[str, Any], dict[PromptSource, Any]]:
    models = {m: model_spec_identity(m, config.seed) for m in config.models}
    prompts = {p: prompts_identity(p.to_dict()) for p in config.prompts}
    return models, prompts


def cell_key(config: GridConfig, cell: GridCell, model_fp: Mapping[str, Any], prompts_fp: Mapping[str, Any]) -> str:
    patch = cell.method.method == PATCH  # the investigations fix their own bootstrap
    return digest(grid_cell_spec(model_fp, prompts_fp, cell.method.to_dict(), seed=config.seed,
                                 n_boot=config.n_boot if patch else None, alpha=config.alpha if patch else None))


def cell_path(config: GridConfig, cell: GridCell, model_fp: Mapping[str, Any] | None = None,
              prompts_fp: Mapping[str, Any] | None = None) -> Path:
    """Where `cell` is written: its readable slug and the hash of its resolved content."""
    mfp = model_spec_identity(cell.model, config.seed) if model_fp is None else model_fp
    pfp = prompts_identity(cell.prompts.to_dict()) if prompts_fp is None else prompts_fp
    return config.out_dir / "cells" / f"{cell.slug}-{cell_key(config, cell, mfp, pfp)}.parquet"


def _check_cell(cell: GridCell) -> None:
    """Refuse combinations an investigation cannot run, before any work is done."""
    m, p = cell.method.method, cell.prompts
    if m in ("plan-ahead", "course-correction") and p.path is not None:
        raise ValueError(f"cell {cell.slug}: the {m} investigation builds its own planning prompts; expected an "
                         f"organism prompt source ({{organism: planning, n: ...}}), got the file {p.path}")
    if m != PATCH and p.organism is not None:
        base = cell.model.removeprefix(RANDOM_PREFIX).removeprefix("organism:")
        if base != p.organism:
            raise ValueError(f"cell {cell.slug}: the {m} investigation builds the prompts of the model's own "
                             f"organism; expected prompt source organism {base!r} for model {cell.model!r}, got "
                             f"{p.organism!r}; give a JSONL prompt set instead")


# --------------------------------------------------------------------- running one cell (workers)


def build_model(spec: str, seed: int, device: str | None = None) -> Any:
    """`interp.load_model(spec)`, or for ``random:SPEC`` a random-initialised model of its shape
    (the probe sweep's `build_model`), on `device`."""
    from probes.sweep import build_model as build

    model = build(spec, seed=seed)
    return model if device is None else model.to(device)


def build_prompts(source: Mapping[str, Any], model: Any) -> Any:
    """The `interp.Prompts` of a prompt source for `model` (a JSONL set: the model's tokenizer)."""
    if source["path"] is not None:
        from interp.hypotheses.inputs import prompt_set

        return prompt_set(source["path"], model)
    from interp.organisms import get

    make = getattr(get(source["organism"]), "prompts", None)
    if make is None:
        raise ValueError(f"prompts organism {source['organism']!r}: expected an organism with a Prompts builder "
                         f"(`prompts(n, seed)`), got none")
    return make(source["n"], source["seed"], **source["kwargs"])


def _metric(name: str) -> Any:
    from interp import metrics

    return getattr(metrics, name)()


def run_patch(model: Any, prompts: Any, params: Mapping[str, Any], *, n_boot: int, alpha: float) -> Any:
    """`interp.patching.sweep` as a cell runs it (what the grid's numbers are tested against)."""
    from interp.patching import sweep

    p = dict(params)
    metric = _metric(p.pop("metric", "logit_diff"))
    return sweep(model, prompts, metric, n_boot=n_boot, alpha=alpha, **p)


def run_investigation(method: str, spec: str, model: Any, source: Mapping[str, Any],
                      params: Mapping[str, Any], seed: int) -> Any:
    """The investigation `method` of `interp.hypotheses.run` on `model` (`spec` names its inputs)."""
    from interp.hypotheses import run

    base = spec.removeprefix(RANDOM_PREFIX)  # a random baseline is given its base's inputs
    kw: dict[str, Any] = {"seed": seed, **params}
    if source["path"] is not None:
        kw["prompts"] = source["path"]
    else:
        kw.setdefault("n", source["n"])
        kw["seed"] = source["seed"]
    fn = {"multihop": run.run_multihop, "last-token": run.run_last_token, "routes": run.run_routes,
          "course-correction": run.run_course_correction, "plan-ahead": run.run_plan_ahead}[method]
    if method == "plan-ahead":
        if spec.startswith(RANDOM_PREFIX):
            raise ValueError("plan-ahead: expected a model spec it loads itself, got a random baseline")
        return fn(base, **kw)
    return fn(base, model=model, **kw)


def _frame(result: Any) -> pd.DataFrame:
    frame = result.to_frame()
    verdict = getattr(result, "verdict", None)
    if verdict is not None:
        frame["verdict"], frame["verdict_sentence"] = bool(verdict.supported), verdict.sentence
    return frame


def run_grid_cell(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one cell and write its frame atomically; top-level so that processes and Ray can run it."""
    t0 = time.perf_counter()
    model = build_model(payload["model"], payload["seed"], payload["device"])
    source, method = payload["prompts"], payload["method"]
    if method["method"] == PATCH:
        result = run_patch(model, build_prompts(source, model), method["params"], n_boot=payload["n_boot"],
                           alpha=payload["alpha"])
    else:
        result = run_investigation(method["method"], payload["model"], model, source, method["params"],
                                   payload["seed"])
    frame = _frame(result)
    frame = frame.rename(columns={k: f"result_{k}" for k in payload["meta"] if k in frame.columns})
    for k, v in reversed(list(payload["meta"].items())):
        frame.insert(0, k, v)
    path = Path(payload["path"])
    with atomic_file(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return {"path": str(path), "rows": len(frame), "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class GridResult:
    """The combined table and what this run did (cells computed vs already finished)."""

    config: GridConfig
    frame: pd.DataFrame
    n_computed: int
    n_skipped: int
    paths: dict[str, Path]
    changed: tuple[str, ...] = ()

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()


def _previous_record(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def grid(
    config: GridConfig | str | Path,
    *,
    workers: int = 1,
    backend: str = "auto",
    address: str | None = None,
    gpus: float = 0.0,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
) -> GridResult:
    """Run every unfinished cell of `config` (a `GridConfig` or a YAML/JSON path); combine all cells.

    A cell is finished when the file of its exact resolved content exists; a changed model,
    prompt set, method or seed makes new cells, never reuses old ones. `workers`: local processes
    (backend ``auto``/``process``) or Ray CPUs when Ray is started here (backend ``ray``;
    `address` joins a cluster, `gpus` per Ray task). `on_cell` is called with each finished
    cell's record (path, rows, seconds) as it arrives.
    """
    cfg = config if isinstance(config, GridConfig) else load_grid_config(config)
    runner = get_backend(backend, workers, address, gpus=gpus)
    cells = plan(cfg)
    for c in cells:
        _check_cell(c)
    model_fps, prompt_fps = _identities(cfg)
    paths = {c: cell_path(cfg, c, model_fps[c.model], prompt_fps[c.prompts]) for c in cells}
    todo = [c for c in cells if not paths[c].is_file()]
    out = cfg.out_dir
    record = {"config": cfg.to_dict(), "models": model_fps, "prompts": [prompt_fps[p] for p in cfg.prompts]}
    previous = _previous_record(out)
    changed = tuple(x for x in changes(previous, record) if not x.startswith("device:")) if previous else ()
    if changed:
        log.warning("grid %s: config changed since the last run in %s (%s); the cells it affects are new",
                    cfg.name, out, "; ".join(changed))
    log.info("grid %s: %d cells, %d already done", cfg.name, len(cells), len(cells) - len(todo))
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", cfg.to_dict())
    write_json_atomic(out / RECORD, record)
    payloads = [{"model": c.model, "prompts": c.prompts.to_dict(), "method": c.method.to_dict(), "seed": cfg.seed,
                 "n_boot": cfg.n_boot, "alpha": cfg.alpha, "device": cfg.device, "path": str(paths[c]),
                 "meta": {"model": c.model, "prompt_set": c.prompts.label, "method_name": c.method.name}} for c in todo]
    computed = 0
    for done in runner.map(run_grid_cell, payloads):
        computed += 1
        log.info("grid %s: cell %s (%d rows, %.1f s)", cfg.name, Path(done["path"]).name, done["rows"],
                 done["seconds"])
        if on_cell is not None:
            on_cell(done)
    frame = pd.concat([pd.read_parquet(paths[c]) for c in cells], ignore_index=True)
    saved = {"parquet": out / "grid.parquet", "csv": out / "grid.csv"}
    with atomic_file(saved["parquet"]) as tmp:
        frame.to_parquet(tmp, index=False)
    with atomic_file(saved["csv"]) as tmp:
        frame.to_csv(tmp, index=False)
    write_json_atomic(out / "summary.json", {"cells": len(cells), "computed": computed,
                                             "skipped": len(cells) - len(todo), "changed": list(changed)})
    return GridResult(cfg, frame, computed, len(cells) - len(todo), saved, changed)


def finished(config: GridConfig) -> list[GridCell]:
    """Cells of `config` whose output (for this exact resolved content) exists."""
    model_fps, prompt_fps = _identities(config)
    return [c for c in plan(config) if cell_path(config, c, model_fps[c.model], prompt_fps[c.prompts]).is_file()]


def summary(config: GridConfig) -> str:
    done = set(finished(config))
    return "\n".join(f"{'done' if c in done else 'todo'}  {c.model}  {c.prompts.label}  {c.method.name}"
                     for c in plan(config))

