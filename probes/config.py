"""Sweep configuration: frozen dataclasses loaded from YAML that reject unknown keys.

A sweep probes every cell of models x hooks x positions x targets, each cell fitting all layers at
once (`interp.probing.fit`). Example (see ``probes/configs/``)::

    name: multihop-bridge
    data: {organism: multihop, n: 2000, seed: 0, kwargs: {two_hop_share: 1.0}}
    models: ["organism:multihop", "random:organism:multihop"]
    hooks: [resid_post]
    positions: [last]
    targets:
      - {name: bridge, field: bridge, kind: logistic, control: a}

Model specs are those of `interp.load_model`; ``random:SPEC`` is a random-initialised model of
the same shape (seeded by the sweep's `seed`). Hooks are site names (`interp.graph.Site`) taken
at every layer (or at `layers`). A position is an index into the prompt (negative counts from
its last token), ``last``, or a list of indices / ``all``, which pools those positions into one
probe whose rows are (example, position) pairs, split by example.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from interp.graph import Site
from interp.probing import DEFAULT_ALPHAS, KINDS

PositionEntry = int | str | tuple[int, ...]
ROW_FIELDS = ("position", "token")  # targets computed per row rather than read from the dataset
CONTROL_SPECIAL = ("token", "example", "none")


def _check_keys(cls: type, d: Any, where: str) -> None:
    if not isinstance(d, Mapping):
        known = [f.name for f in dataclasses.fields(cls)]
        raise ValueError(f"{where}: expected a mapping of {cls.__name__} fields, got {d!r} ({type(d).__name__}); "
                         f"write `key: value` pairs with keys among {known}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(known))
    if unknown:
        hints = {u: difflib.get_close_matches(u, known, n=1) for u in unknown}
        hint = "; ".join(f"{u!r} -> did you mean {h[0]!r}?" for u, h in hints.items() if h)
        raise ValueError(f"{where}: expected keys among {known}, got unknown keys {unknown}"
                         + (f" ({hint})" if hint else ""))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# field kind -> (test, what is expected); the test sees the value after `from_dict`'s list -> tuple
KIND_CHECKS: dict[str, tuple[Any, str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "str?": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "int": (_is_int, "an integer"),
    "int?": (lambda v: v is None or _is_int(v), "an integer or null"),
    "num": (_is_num, "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "strs": (lambda v: isinstance(v, (tuple, list)) and all(isinstance(x, str) for x in v), "a list of strings"),
    "nums": (lambda v: isinstance(v, (tuple, list)) and all(_is_num(x) for x in v), "a list of numbers"),
    "ints?": (lambda v: v is None or (isinstance(v, (tuple, list)) and all(_is_int(x) for x in v)),
              "a list of integers or null"),
}


def check_types(d: Mapping[str, Any], where: str, schema: Mapping[str, tuple[str, Any]]) -> dict[str, Any]:
    """`d` with each key of `schema` (key -> (kind, example)) checked, numbers made floats and lists
    tuples (so equal configs hash equal however they were written); one clear error otherwise."""
    d = dict(d)
    for name, (kind, example) in schema.items():
        if name not in d:
            continue
        value = d[name]
        if kind == "strs" and isinstance(value, str):
            value = (value,)
        ok, expected = KIND_CHECKS[kind]
        if not ok(value):
            hint = f"e.g. `{name}: {example}`"
            if isinstance(value, str) and kind in ("num", "int"):
                try:
                    float(value)
                    hint += " (YAML reads 1e-3 without a dot as a string: write 1.0e-3, without quotes)"
                except ValueError:
                    pass
            raise ValueError(f"{where}{name}: expected {expected}, got {value!r} ({type(value).__name__}); {hint}")
        if kind == "num":
            value = float(value)
        elif kind == "nums":
            value = tuple(float(x) for x in value)
        elif kind in ("strs", "ints?") and value is not None:
            value = tuple(value)
        d[name] = value
    return d


DATA_TYPES = {"organism": ("str", "multihop"), "n": ("int", 2000), "seed": ("int", 0)}
TARGET_TYPES = {"name": ("str", "bridge"), "field": ("str", "bridge"), "kind": ("str", "logistic"),
                "control": ("str", "token")}
PROBE_TYPES = {"C": ("num", 1.0), "test_fraction": ("num", 0.25), "alphas": ("nums", "[0.1, 1.0]"),
               "cv": ("int?", "null"), "max_iter": ("int", 100), "tol": ("num", 1.0e-4), "shuffled": ("bool", "true"),
               "n_boot": ("int", 1000), "ci": ("num", 0.95)}
SWEEP_TYPES = {"name": ("str", "multihop-bridge"), "models": ("strs", '["organism:multihop"]'),
               "hooks": ("strs", "[resid_post]"), "layers": ("ints?", "[0, 1]"), "out": ("str?", "runs/probes/NAME"),
               "store_dtype": ("str?", "float32"), "batch_size": ("int", 64), "seed": ("int", 0)}


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """Prompts and ground truth: ``interp.organisms.get(organism).dataset(n, seed, **kwargs)``."""

    organism: str
    n: int = 2000
    seed: int = 0
    kwargs: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not self.organism:
            raise ValueError("data.organism: expected an organism name, got an empty string")
        if self.n < 8:
            raise ValueError(f"data.n: expected at least 8 examples, got {self.n}")

    @classmethod
    def from_dict(cls, d: Any) -> DataSpec:
        _check_keys(cls, d, "data")
        d = check_types(d, "data.", DATA_TYPES)
        kw = d.pop("kwargs", {}) or {}
        if not isinstance(kw, Mapping):
            raise ValueError(f"data.kwargs: expected a mapping, got {type(kw).__name__}")
        return cls(**d, kwargs=tuple(sorted(kw.items())))


@dataclass(frozen=True, kw_only=True)
class TargetSpec:
    """What to decode. `field`: a dataset attribute (one value per example), ``position`` (the
    row's absolute position) or ``token`` (the token at the row's position). `control`: the
    Hewitt-Liang type per row: ``token`` (the word at the position), ``token@FIELD`` (the word at
    the per-example position held in dataset attribute FIELD, e.g. the fact that carries the
    answer), ``example``, ``none`` or a dataset attribute (e.g. the queried entity). Pick a type
    with many values: a control over a few types is memorised by any linear probe (its accuracy
    is then ~1 and selectivity says nothing). `positions`: this target's own position entries
    (default: the sweep's)."""

    name: str
    field: str
    kind: Literal["logistic", "ridge"] = "logistic"
    control: str = "token"
    positions: tuple[PositionEntry, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"target {self.name!r} kind: expected one of {list(KINDS)}, got {self.kind!r}")
        if not self.name or not self.field:
            raise ValueError(f"target: expected a name and a field, got name={self.name!r} field={self.field!r}")
        if self.positions is not None:
            if not self.positions:
                raise ValueError(f"target {self.name!r} positions: expected at least one entry or null, got []")
            for p in self.positions:
                _position(p)


@dataclass(frozen=True, kw_only=True)
class ProbeSpec:
    """Arguments of `interp.probing.fit` shared by every cell."""

    C: float = 1.0
    test_fraction: float = 0.25
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    cv: int | None = None
    max_iter: int = 100
    tol: float = 1e-4
    shuffled: bool = True
    n_boot: int = 1000
    ci: float = 0.95

    def __post_init__(self) -> None:
        if self.C <= 0:
            raise ValueError(f"probe.C: expected > 0, got {self.C}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"probe.test_fraction: expected a value in (0, 1), got {self.test_fraction}")
        if not self.alphas or any(a <= 0 for a in self.alphas):
            raise ValueError(f"probe.alphas: expected positive values, got {list(self.alphas)}")
        if self.n_boot < 10:
            raise ValueError(f"probe.n_boot: expected >= 10 resamples, got {self.n_boot}")
        if not 0 < self.ci < 1:
            raise ValueError(f"probe.ci: expected a level in (0, 1), got {self.ci}")

    @classmethod
    def from_dict(cls, d: Any) -> ProbeSpec:
        _check_keys(cls, d, "probe")
        return cls(**check_types(d, "probe.", PROBE_TYPES))


def _position(entry: Any) -> PositionEntry:
    if isinstance(entry, (list, tuple)) and entry and all(_is_int(p) for p in entry):
        return tuple(entry)
    if _is_int(entry) or entry in ("last", "all"):
        return entry  # type: ignore[no-any-return]
    raise ValueError(f"positions: expected an int, 'last', 'all' or a non-empty list of ints, got {entry!r} "
                     f"({type(entry).__name__}); e.g. `positions: [last, 1]` or `positions: [[1, 2, 3]]`")


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """One sweep: models x hooks x positions x targets, all layers of a hook per probe fit."""

    name: str
    data: DataSpec
    models: tuple[str, ...]
    targets: tuple[TargetSpec, ...]
    hooks: tuple[str, ...] = ("resid_post",)
    layers: tuple[int, ...] | None = None
    positions: tuple[PositionEntry, ...] = ("last",)
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    out: str | None = None
    store_dtype: str | None = None
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.out, os.PathLike):
            object.__setattr__(self, "out", os.fspath(self.out))
        if not isinstance(self.data, DataSpec):
            raise ValueError(f"data: expected a DataSpec, got {type(self.data).__name__}; e.g. "
                             f"`data: {{organism: multihop, n: 2000, seed: 0}}`")
        if not isinstance(self.probe, ProbeSpec):
            raise ValueError(f"probe: expected a ProbeSpec, got {type(self.probe).__name__}; e.g. `probe: {{C: 1.0}}`")
        if not isinstance(self.targets, tuple) or not all(isinstance(t, TargetSpec) for t in self.targets):
            raise ValueError(f"targets: expected a tuple of TargetSpec, got {self.targets!r}")
        if not self.name or "/" in self.name:
            raise ValueError(f"name: expected a non-empty name without '/', got {self.name!r}")
        if not self.models:
            raise ValueError("models: expected at least one model spec, got none")
        if not self.targets:
            raise ValueError("targets: expected at least one target, got none")
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"targets: expected distinct names, got {names}")
        sites = [s.value for s in Site]
        bad = [h for h in self.hooks if h not in sites]
        if bad or not self.hooks:
            raise ValueError(f"hooks: expected site names among {sites}, got {bad or list(self.hooks)}")
        per_head = [h for h in self.hooks if Site(h).per_head]
        if per_head:
            raise ValueError(f"hooks: expected residual-width sites (resid_*, attn_out, mlp_out), got "
                             f"per-head sites {per_head}")
        if not self.positions:
            raise ValueError("positions: expected at least one position, got none")
        for p in self.positions:
            _position(p)
        for t in self.targets:
            single = [p for p in self.positions_of(t) if not (p == "all" or isinstance(p, tuple))]
            if t.field == "position" and single:
                raise ValueError(f"target {t.name!r}: expected pooled positions ('all' or a list) for the "
                                 f"absolute-position target, got single positions {single}; give the "
                                 f"target its own `positions`")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(f"layers: expected non-negative layer indices, got {list(self.layers)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {self.batch_size}")
        if self.store_dtype not in (None, "float32", "float16", "bfloat16", "float64"):
            raise ValueError(f"store_dtype: expected float32, float16, bfloat16, float64 or null, got "
                             f"{self.store_dtype!r}")

    def positions_of(self, target: TargetSpec) -> tuple[PositionEntry, ...]:
        return self.positions if target.positions is None else target.positions

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / "probes" / self.name

    @classmethod
    def from_dict(cls, d: Any) -> SweepConfig:
        """Build from plain data (parsed YAML); unknown keys at any level are an error."""
        _check_keys(cls, d, "sweep config")
        d = check_types(d, "", SWEEP_TYPES)
        for key in ("name", "data", "models", "targets"):
            if key not in d:
                raise ValueError(f"sweep config: expected key {key!r}, got keys {sorted(d)}")
        d["data"] = DataSpec.from_dict(d["data"])
        targets = d["targets"]
        if not isinstance(targets, list):
            raise ValueError(f"targets: expected a list of mappings, got {targets!r} ({type(targets).__name__}); "
                             f"e.g. `targets: [{{name: bridge, field: bridge}}]`")
        parsed = []
        for i, t in enumerate(targets):
            _check_keys(TargetSpec, t, f"targets[{i}]")
            t = check_types(t, f"targets[{i}].", TARGET_TYPES)
            if t.get("positions") is not None:
                value = t["positions"] if isinstance(t["positions"], list) else [t["positions"]]
                t["positions"] = tuple(_position(p) for p in value)
            parsed.append(TargetSpec(**t))
        d["targets"] = tuple(parsed)
        if "probe" in d:
            d["probe"] = ProbeSpec.from_dict(d["probe"] or {})
        if "positions" in d:
            value = d["positions"]
            value = value if isinstance(value, list) else [value]
            d["positions"] = tuple(_position(p) for p in value)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain data that `from_dict` reads back (for workers and the run record)."""
        d = dataclasses.asdict(self)
        d["data"]["kwargs"] = dict(self.data.kwargs)
        d["probe"]["alphas"] = list(self.probe.alphas)
        d["positions"] = [list(p) if isinstance(p, tuple) else p for p in self.positions]
        d["models"], d["hooks"] = list(self.models), list(self.hooks)
        d["targets"] = [dataclasses.asdict(t) | {"positions": None if t.positions is None else [
            list(p) if isinstance(p, tuple) else p for p in t.positions]} for t in self.targets]
        if self.layers is not None:
            d["layers"] = list(self.layers)
        return d


def load_config(path: str | Path) -> SweepConfig:
    """Read a sweep config from YAML; every error names the file (and the line for a syntax error)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep config: expected a YAML file, got no file at {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and start is not None and mark is not None and start.line != mark.line:
            context = f"{context} started at line {start.line + 1}"
        problem = ": ".join(str(x) for x in (context, getattr(e, "problem", None)) if x) or str(e)
        raise ValueError(f"sweep config {where}: expected valid YAML, got a syntax error ({problem}); "
                         f"fix the file at line {mark.line + 1 if mark is not None else '?'}") from e
    if not isinstance(raw, Mapping):
        raise ValueError(f"sweep config {path}: expected a mapping at top level, got {type(raw).__name__}; "
                         f"see probes/configs/multihop_bridge.yaml for an example")
    try:
        return SweepConfig.from_dict(raw)
    except ValueError as e:
        raise ValueError(f"sweep config {path}: {str(e).removeprefix('sweep config: ')}") from e
