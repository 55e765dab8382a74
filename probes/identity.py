"""What a sweep's outputs are made of: content hashes of resolved specs, and what changed.

A cell's file and a model's activation store are named by a hash of everything that determines
their content, so a changed config can never reuse an output computed from another one (fitting
new labels against old activations): it gets new names and is recomputed, and an unchanged
config finds its outputs again (resume).

- model: its spec and a cheap weight fingerprint: for a saved directory or organism the sha256
  recorded in its manifest (checked against the weights on load) and a hash of its config.json;
  without a recorded sha256 the weights file's size and mtime. A ``random:SPEC`` model is its
  base's architecture plus the sweep seed. A pretrained name is taken as fixed content.
- store: model, `data`, hooks, layers, kept positions, `store_dtype`.
- cell: model, `data`, hook, layers, `store_dtype`, its position entry, its target (without the
  target's list of positions, which decides which cells exist, not what one holds), `probe` and
  `seed`.

- grid cell (`probes.grid`): model, prompt set (a JSONL file's sha256, or the organism builder's
  name, n, seed and keyword arguments), method and its parameters, `seed`, and for patching cells `n_boot` and `alpha`.

Not part of any identity (they do not change a number beyond float rounding): `name`, `out`,
`batch_size`, `device`, the backend and worker count. Not detected: a change in an organism's dataset
code or in a pretrained checkpoint published under the same name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from interp.models import (
    CONFIG,
    MANIFEST,
    ORGANISM_PREFIX,
    WEIGHTS,
    ModelLoadError,
    _resolve_dir,
    organisms_dir,
    sha256_file,
)
from probes.config import SweepConfig

RANDOM_PREFIX = "random:"


def digest(obj: Any, n: int = 16) -> str:
    """First `n` hex digits of the sha256 of `obj` as canonical JSON."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _model_dir(spec: str) -> Path | None:
    if spec.startswith(ORGANISM_PREFIX):
        d = organisms_dir() / spec.removeprefix(ORGANISM_PREFIX)
        if not (d / WEIGHTS).is_file():
            _resolve_dir(spec)  # raises the loader's own error (known organisms, close names)
        return d
    d = Path(spec)
    if d.is_dir():
        return d
    if d.exists() or spec.startswith((".", "/")) or spec.endswith("/"):
        raise ModelLoadError(f"model {spec!r}: expected a model directory written by interp.save_model, "
                             f"got {'a file' if d.exists() else 'no such path'}")
    return None  # a pretrained name


def _architecture(d: Path) -> dict[str, Any]:
    f = d / CONFIG
    if not f.is_file():
        raise ModelLoadError(f"model directory {d}: expected {CONFIG} (written by interp.save_model), got no such file")
    return {"config": hashlib.sha256(f.read_bytes()).hexdigest()}


def model_spec_identity(spec: str, seed: int) -> dict[str, Any]:
    """The identity of model `spec` as the sweep builds it (see the module docstring)."""
    if spec.startswith(RANDOM_PREFIX):
        base = spec.removeprefix(RANDOM_PREFIX)
        d = _model_dir(base)
        return {"random_init_of": base, "seed": seed} | ({} if d is None else _architecture(d))
    d = _model_dir(spec)
    if d is None:
        return {"pretrained": spec}
    fp: dict[str, Any] = {"spec": spec} | _architecture(d)
    sha = None
    if (d / MANIFEST).is_file():
        try:
            sha = json.loads((d / MANIFEST).read_text()).get("sha256")
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"model manifest {d / MANIFEST}: expected JSON, got a parse error: {e}") from e
    if sha is None:
        st = (d / WEIGHTS).stat()
        return fp | {"weights_size": st.st_size, "weights_mtime_ns": st.st_mtime_ns}
    return fp | {"sha256": sha}


def _data(config: SweepConfig) -> dict[str, Any]:
    return config.to_dict()["data"]


def store_spec(config: SweepConfig, model: Mapping[str, Any], positions: Any) -> dict[str, Any]:
    """Everything that determines one model's activation store."""
    return {"model": dict(model), "data": _data(config), "hooks": list(config.hooks),
            "layers": None if config.layers is None else list(config.layers), "positions": positions,
            "dtype": config.store_dtype}


def cell_spec(config: SweepConfig, model: Mapping[str, Any], hook: str, position: Any,
              target: str) -> dict[str, Any]:
    """Everything that determines one cell's rows."""
    t = next(t for t in config.targets if t.name == target)
    return {"model": dict(model), "data": _data(config), "hook": hook,
            "layers": None if config.layers is None else list(config.layers), "dtype": config.store_dtype,
            "position": list(position) if isinstance(position, tuple) else position,
            "target": {k: v for k, v in dataclasses.asdict(t).items() if k != "positions"},
            "probe": config.to_dict()["probe"], "seed": config.seed}


IGNORED = ("name", "out", "batch_size")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    items = d.items() if isinstance(d, Mapping) else enumerate(d) if isinstance(d, list) else None
    if items is None:
        return {prefix.removesuffix("."): d}
    out: dict[str, Any] = {}
    for k, v in items:
        out |= _flat(v, f"{prefix}{k}.")
    return out


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Content-relevant differences between two resolved records, as ``'data.seed: 0 -> 1'``."""
    a, b = _flat(old), _flat(new)
    keys = [k for k in sorted(set(a) | set(b))
            if not (k.startswith("config.") and k.removeprefix("config.") in IGNORED)]
    return [f"{k.removeprefix('config.')}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
            for k in keys if a.get(k) != b.get(k)]


def n_layers(spec: str) -> int | None:
    """The layer count in a saved model's config.json, read without loading it (None for a pretrained name)."""
    d = _model_dir(spec.removeprefix(RANDOM_PREFIX))
    if d is None:
        return None
    try:
        cfg = json.loads((d / CONFIG).read_text())
        # an interp checkpoint's n_layers, or a Hugging Face config's (num_hidden_layers; GPT-2: n_layer)
        key = next((k for k in ("n_layers", "num_hidden_layers", "n_layer") if k in cfg), "n_layers")
        return int(cfg[key])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"model config {d / CONFIG}: expected JSON with an integer n_layers (or a Hugging Face "
                             f"num_hidden_layers), got {e!r}") from e


def prompts_identity(source: Mapping[str, Any]) -> dict[str, Any]:
    """The identity of a grid prompt source: a JSONL file's content hash, or the organism builder's call."""
    if source.get("path") is not None:
        path = Path(source["path"])
        if not path.is_file():
            raise FileNotFoundError(f"prompts {path}: expected a JSONL prompt set, got no such file")
        return {"file_sha256": sha256_file(path)}
    return {"organism": source["organism"], "n": source["n"], "seed": source["seed"],
            "kwargs": dict(source.get("kwargs") or {})}


def grid_cell_spec(model: Mapping[str, Any], prompts: Mapping[str, Any], method: Mapping[str, Any], *,
                   seed: int, n_boot: int | None, alpha: float | None) -> dict[str, Any]:
    """Everything that determines one grid cell's rows (the method's label `name` included: it is a column)."""
    return {"model": dict(model), "prompts": dict(prompts), "method": dict(method), "seed": seed,
            "n_boot": n_boot, "alpha": alpha}
