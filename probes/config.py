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


def _check_keys(cls: type, d: Mapping[str, Any], where: str) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(d).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(known))
    if unknown:
        hints = {u: difflib.get_close_matches(u, known, n=1) for u in unknown}
        hint = "; ".join(f"{u!r} -> did you mean {h[0]!r}?" for u, h in hints.items() if h)
        raise ValueError(f"{where}: expected keys among {known}, got unknown keys {unknown}"
                         + (f" ({hint})" if hint else ""))


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
    def from_dict(cls, d: Mapping[str, Any]) -> DataSpec:
        _check_keys(cls, d, "data")
        d = dict(d)
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
    def from_dict(cls, d: Mapping[str, Any]) -> ProbeSpec:
        _check_keys(cls, d, "probe")
        d = dict(d)
        if "alphas" in d:
            d["alphas"] = tuple(float(a) for a in d["alphas"])
        return cls(**d)


def _position(entry: Any) -> PositionEntry:
    if isinstance(entry, bool):
        raise ValueError(f"positions: expected an int, 'last', 'all' or a list of ints, got {entry!r}")
    if isinstance(entry, int) or entry in ("last", "all"):
        return entry
    if isinstance(entry, (list, tuple)) and entry and all(isinstance(p, int) and not isinstance(p, bool)
                                                          for p in entry):
        return tuple(entry)
    raise ValueError(f"positions: expected an int, 'last', 'all' or a non-empty list of ints, got {entry!r}")


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
    def from_dict(cls, d: Mapping[str, Any]) -> SweepConfig:
        """Build from plain data (parsed YAML); unknown keys at any level are an error."""
        _check_keys(cls, d, "sweep config")
        d = dict(d)
        for key in ("name", "data", "models", "targets"):
            if key not in d:
                raise ValueError(f"sweep config: expected key {key!r}, got keys {sorted(d)}")
        d["data"] = DataSpec.from_dict(d["data"])
        targets = d["targets"]
        if not isinstance(targets, list):
            raise ValueError(f"targets: expected a list of mappings, got {type(targets).__name__}")
        parsed = []
        for i, t in enumerate(targets):
            _check_keys(TargetSpec, t, f"targets[{i}]")
            t = dict(t)
            if t.get("positions") is not None:
                value = t["positions"] if isinstance(t["positions"], list) else [t["positions"]]
                t["positions"] = tuple(_position(p) for p in value)
            parsed.append(TargetSpec(**t))
        d["targets"] = tuple(parsed)
        if "probe" in d:
            d["probe"] = ProbeSpec.from_dict(d["probe"] or {})
        for key in ("models", "hooks"):
            if key in d:
                value = d[key]
                d[key] = (value,) if isinstance(value, str) else tuple(value)
        if "positions" in d:
            value = d["positions"]
            value = value if isinstance(value, list) else [value]
            d["positions"] = tuple(_position(p) for p in value)
        if d.get("layers") is not None:
            d["layers"] = tuple(int(v) for v in d["layers"])
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
    """Read a sweep config from YAML."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep config: expected a YAML file, got no file at {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"sweep config {path}: expected valid YAML, got a parse error: {e}") from e
    if not isinstance(raw, Mapping):
        raise ValueError(f"sweep config {path}: expected a mapping at top level, got {type(raw).__name__}")
    return SweepConfig.from_dict(raw)
