"""Load and save HookedTransformers: pretrained names, local directories, shipped organisms.

A local model directory (written by `save_model`) holds
- ``config.json``: the HookedTransformerConfig fields,
- ``model.safetensors``: the weights (safetensors, never pickle),
- ``manifest.json``: free-form facts (training seed, steps, metrics) plus the sha256 of the
  weights, checked on load: a checkpoint whose hash does not match is refused.
- ``tokenizer.json`` (optional): the vocabulary of a `VocabTokenizer`.

``load_model("organism:NAME")`` reads ``data/organisms/NAME`` (override the data folder with the
``INTERP_DATA`` environment variable). Pretrained names go through TransformerLens; when the
weights are neither cached nor reachable the error says how to make them available, rather than
hanging or dumping a stack trace.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import socket
import warnings
import weakref
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors.torch import save_model as _st_save_model

from interp import tl
from interp.atomic import Artefact, atomic_dir, write_json_atomic
from interp.tl import HookedTransformer, HookedTransformerConfig

log = logging.getLogger(__name__)

ORGANISM_PREFIX = "organism:"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and how to fix it."""


def data_dir() -> Path:
    """The toolkit's data folder (organisms, prompt sets): $INTERP_DATA or the repo's data/."""
    env = os.environ.get("INTERP_DATA")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "data"


def organisms_dir() -> Path:
    return data_dir() / "organisms"


def list_organisms() -> list[str]:
    """Names of the organisms shipped under data/organisms/ (those with weights)."""
    root = organisms_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / WEIGHTS).is_file())


def new_model(cfg: HookedTransformerConfig | dict[str, Any]) -> HookedTransformer:
    """A fresh (random-initialised) HookedTransformer in eval mode, without the deprecation noise.

    The model gets its own copy of `cfg`: TransformerLens keeps the config object and `.to(dtype)`
    rewrites it, which would otherwise change every other model built from the same config.
    """
    cfg = config_from_dict(cfg) if isinstance(cfg, dict) else copy.deepcopy(cfg)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        model = tl.build_model(cfg)
    return model.eval()


def random_like(model: HookedTransformer, seed: int = 0) -> HookedTransformer:
    """A random-initialised model of the same shape (the baseline no effect should survive): the
    toolkit's one random baseline. Its seed is 10_000 + `seed`, never the seed a model was trained with."""
    if not tl.HAS_HOOKED_TRANSFORMER:  # TL 4: a bridge config is rebuilt from its fields
        return new_model(config_to_dict(model.cfg) | {"seed": 10_000 + seed})
    return new_model(dataclasses.replace(model.cfg, seed=10_000 + seed))


# ------------------------------------------------------------------------------- config <-> json

def config_to_dict(cfg: HookedTransformerConfig) -> dict[str, Any]:
    """The init fields of a config as JSON-safe values (dtype as a string, no device)."""
    out: dict[str, Any] = {}
    for name, value in tl.config_fields(cfg).items():
        if name == "device":
            continue
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        try:
            json.dumps(value)
        except TypeError:
            continue
        out[name] = value
    return out


def config_from_dict(d: dict[str, Any]) -> HookedTransformerConfig:
    unknown = tl.unknown_config_keys(d)
    if unknown:
        raise ModelLoadError(
            f"model config: expected HookedTransformerConfig fields, got unknown keys {unknown}"
        )
    d = dict(d)
    if isinstance(d.get("dtype"), str):
        d["dtype"] = getattr(torch, d["dtype"])
    return HookedTransformerConfig(**d)


# ---------------------------------------------------------------------------------- fingerprints

# Config fields that name or initialise a model but do not change what it computes from tokens.
_NOT_CONTENT = frozenset({"model_name", "tokenizer_name", "original_architecture", "seed", "init_mode",
                          "init_weights", "initializer_range", "checkpoint_index", "checkpoint_label_type",
                          "checkpoint_value", "from_checkpoint", "n_devices", "default_prepend_bos",
                          "tokenizer_prepends_bos", "dtype"})


def _state_signature(model: torch.nn.Module) -> tuple:
    return tuple((k, id(t), t.data_ptr(), t._version, t.dtype, tuple(t.shape), str(t.device))
                 for k, t in model.state_dict(keep_vars=True).items())


# model -> (state signature, digest). Weak keys: a memo never keeps a model alive. This is the one
# piece of module-level state in the toolkit; it only caches a pure function of the weights.
_FINGERPRINTS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def weights_fingerprint(model: torch.nn.Module, *, cache: bool = True) -> str:
    """A sha256 over every state-dict tensor's name, dtype, shape and raw bytes (buffers included).

    The toolkit's one weight identity: stores are keyed on it and SAEs record it (``model_weights``).
    Exact and device-independent: the same weights on CPU and GPU give the same value, a dtype
    cast or any edited value another. Tensors are copied to the host one at a time (memory: the
    largest tensor); the cost is one sha256 pass over the weights: 2.0 s for a 163M-parameter
    GPT-2-shaped model (0.65 GB, float32) on a loaded CPU core, 15 ms for an organism. The digest
    is memoised per model object and recomputed when any tensor is replaced or edited in place
    (its version counter moves); writes through ``param.data`` bypass that counter, so after such
    an edit pass ``cache=False``.
    """
    sig = _state_signature(model) if cache else None
    if cache:
        hit = _FINGERPRINTS.get(model)
        if hit is not None and hit[0] == sig:
            return hit[1]
    h = hashlib.sha256()
    with torch.inference_mode():
        for name, t in sorted(model.state_dict().items()):
            flat = t.detach().contiguous().reshape(-1)
            h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)};".encode())
            if flat.numel():
                h.update(memoryview(flat.view(torch.uint8).cpu().numpy()))
    digest = h.hexdigest()
    if cache:
        _FINGERPRINTS[model] = (sig, digest)
    return digest


def config_fingerprint(cfg: HookedTransformerConfig) -> str:
    """A sha256 of the config fields that change what the model computes (not its name or seed)."""
    d = {k: v for k, v in config_to_dict(cfg).items() if k not in _NOT_CONTENT}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------------- save / load

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


MODEL_DIR = Artefact(kind="model", files=frozenset({CONFIG, WEIGHTS, MANIFEST, TOKENIZER}),
                     manifest_key="sha256", marker=WEIGHTS)


def save_model(
    model: HookedTransformer,
    path: str | Path,
    *,
    manifest: dict[str, Any] | None = None,
    vocab: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` to directory `path` (config + safetensors weights + manifest), atomically.

    `path` must be new, an empty directory, or (with `overwrite=True`) a model directory written
    here before; only the model's own files are replaced and any other file in the folder is
    kept. A new directory is assembled in a temporary sibling and renamed into place, so an
    interrupted save never leaves a half-written model where a complete one is expected.
    """
    path = Path(path)
    with atomic_dir(path, MODEL_DIR, overwrite=overwrite) as tmp:
        cfg = config_to_dict(model.cfg)
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        _st_save_model(model, str(tmp / WEIGHTS))
        facts = dict(manifest or {})
        facts["sha256"] = sha256_file(tmp / WEIGHTS)
        facts.setdefault("architecture", {k: cfg[k] for k in (
            "n_layers", "d_model", "n_heads", "d_head", "d_vocab", "n_ctx") if k in cfg})
        write_json_atomic(tmp / MANIFEST, facts)
        if vocab is not None:
            write_json_atomic(tmp / TOKENIZER, {"vocab": list(vocab)})
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a saved model directory (or organism spec)."""
    d = _resolve_dir(str(path)) if str(path).startswith(ORGANISM_PREFIX) else Path(path)
    f = d / MANIFEST
    if not f.is_file():
        raise ModelLoadError(f"manifest: expected {f}, got no such file")
    return json.loads(f.read_text())


def _resolve_dir(spec: str) -> Path:
    name = spec.removeprefix(ORGANISM_PREFIX)
    d = organisms_dir() / name
    if not (d / WEIGHTS).is_file():
        have = list_organisms()
        close = difflib.get_close_matches(name, have, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ModelLoadError(
            f"organism {name!r}: expected one of the shipped organisms {have} in {organisms_dir()}, "
            f"got no checkpoint{hint} (train it with `interp organisms train {name}`)"
        )
    return d


def _refuse_hf_folder(d: Path, cfg: Any) -> None:
    """A clear error for a Hugging Face model folder (its config.json names `model_type`)."""
    if not isinstance(cfg, dict) or "n_layers" in cfg or not ({"model_type", "architectures"} & set(cfg)):
        return
    kind = cfg.get("model_type") or (cfg.get("architectures") or ["?"])[0]
    raise ModelLoadError(
        f"model directory {d}: expected a directory written by interp.save_model (a HookedTransformerConfig "
        f"in {CONFIG}), got a Hugging Face model folder (model_type {kind!r}, architectures "
        f"{cfg.get('architectures')}); loading Hugging Face folders is not supported yet: load it with "
        f"transformer_lens.HookedTransformer.from_pretrained(NAME, hf_model=AutoModelForCausalLM."
        f"from_pretrained({str(d)!r})) and save it once with interp.save_model"
    )


def load_local(path: str | Path, *, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, verify: bool = True) -> HookedTransformer:
    """Load a directory written by `save_model`; refuse weights whose sha256 mismatches."""
    d = Path(path)
    missing = [n for n in (CONFIG, WEIGHTS) if not (d / n).is_file()]
    if missing and (d / CONFIG).is_file():
        try:
            _refuse_hf_folder(d, json.loads((d / CONFIG).read_text()))
        except json.JSONDecodeError:
            pass
    if missing:
        raise ModelLoadError(
            f"model directory {d}: expected {CONFIG} and {WEIGHTS} (written by interp.save_model), "
            f"missing {missing}"
        )
    try:
        cfg_dict = json.loads((d / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"model config {d / CONFIG}: expected JSON, got a parse error: {e}") from e
    _refuse_hf_folder(d, cfg_dict)
    if verify and (d / MANIFEST).is_file():
        want = json.loads((d / MANIFEST).read_text()).get("sha256")
        if want is not None:
            got = sha256_file(d / WEIGHTS)
            if got != want:
                raise ModelLoadError(
                    f"checkpoint {d / WEIGHTS}: expected sha256 {want} (from {MANIFEST}), got {got}; "
                    f"the weights are corrupted or were replaced — restore or retrain them"
                )
    if dtype is not None:
        cfg_dict["dtype"] = str(dtype).removeprefix("torch.")
    cfg = config_from_dict(cfg_dict)
    if device is not None:
        cfg.device = str(device)
    model = new_model(cfg)
    try:
        missing_keys, unexpected = tl.load_weights(model, d / WEIGHTS, device=cfg.device)
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise ModelLoadError(
            f"checkpoint {d / WEIGHTS}: expected a readable safetensors file, got {type(e).__name__}: {e}"
        ) from e
    bad_missing = [k for k in missing_keys if not k.endswith(("IGNORE", ".mask"))]
    if bad_missing or unexpected:
        raise ModelLoadError(
            f"checkpoint {d / WEIGHTS}: expected weights matching {CONFIG}, got missing "
            f"{bad_missing[:5]} and unexpected {unexpected[:5]}"
        )
    return model.eval()


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_pretrained(name: str, *, device: str | torch.device | None, dtype: torch.dtype | None,
                     **kwargs: Any) -> HookedTransformer:
    from huggingface_hub import try_to_load_from_cache

    from interp.tl import official_model_name as get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError:
        from interp.tl import OFFICIAL_MODEL_NAMES

        short = [n.split("/")[-1] for n in OFFICIAL_MODEL_NAMES]
        close = difflib.get_close_matches(name, short + [ORGANISM_PREFIX + o for o in list_organisms()],
                                          n=4)
        raise ModelLoadError(
            f"model {name!r}: expected a TransformerLens pretrained name, a local directory written "
            f"by interp.save_model, or 'organism:NAME'; got none of these"
            + (f"; did you mean {close}?" if close else "")
        ) from None
    cached = try_to_load_from_cache(official, "config.json")
    if not isinstance(cached, str) and not hub_reachable():
        raise ModelLoadError(
            f"model {name!r} ({official}): expected its weights in the local Hugging Face cache "
            f"or a reachable hub, got neither (offline). Pre-download it on a connected machine "
            f"(`huggingface-cli download {official}`) and copy the cache here, or save it once with "
            f"interp.save_model and load that directory."
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            model = HookedTransformer.from_pretrained(name, device=device, dtype=dtype or torch.float32,
                                                      **kwargs)
        except OSError as e:
            raise ModelLoadError(f"model {name!r}: loading pretrained weights failed: {e}") from e
    return model.eval()


def load_model(spec: str | Path, *, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, **kwargs: Any) -> HookedTransformer:
    """A HookedTransformer in eval mode from a pretrained name, a local directory or an organism.

    `spec` is ``"organism:NAME"``, a directory written by `save_model`, or a TransformerLens name
    such as ``"gpt2"``. `device` and `dtype` default to the checkpoint's own.
    """
    s = str(spec)
    if s.startswith(ORGANISM_PREFIX):
        return load_local(_resolve_dir(s), device=device, dtype=dtype)
    if Path(s).is_dir():
        return load_local(s, device=device, dtype=dtype)
    if "/" in s and not Path(s).exists() and (s.startswith((".", "/")) or s.endswith("/")):
        raise ModelLoadError(f"model directory {s}: expected a directory, got no such path")
    return _load_pretrained(s, device=device, dtype=dtype, **kwargs)
