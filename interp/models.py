"""Load and save models of both kinds: TransformerLens names, Hugging Face folders and cached
HF ids, shipped organisms, and folders written by `save_model`.

`load_model(spec)` gives a `HookedTransformer` for a TransformerLens name (as before), an
organism or a folder saved from a HookedTransformer, and a `TransformerBridge` (the native
Hugging Face model with TransformerLens hooks, `TransformerBridge.boot_transformers`) for a local
Hugging Face folder (config.json with a ``model_type`` + safetensors + tokenizer files) or an HF id
in the local cache. ``kind="hooked"`` converts a Hugging Face folder to a HookedTransformer where
TransformerLens supports the architecture; ``kind="bridge"`` boots a TransformerLens name as a
Bridge. ``tokenizer=`` (a path, HF id or tokenizer object) sets the tokenizer of a model whose
own lives elsewhere.

A local model directory written by `save_model` from a HookedTransformer holds
- ``config.json``: the HookedTransformerConfig fields,
- ``model.safetensors``: the weights (safetensors, never pickle),
- ``manifest.json``: free-form facts (training seed, steps, metrics) plus the sha256 of the
  weights, checked on load: a checkpoint whose hash does not match is refused; ``model_name``
  and ``tokenizer`` (``"vocab"``, ``"hf"`` or absent) are recorded there too.
- ``tokenizer.json`` (optional): the vocabulary of a `VocabTokenizer` (``vocab=``), or the
  model's own Hugging Face tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ...,
  written by its ``save_pretrained``).

Saved from a TransformerBridge, the directory is a Hugging Face folder (``save_pretrained`` of
the HF model and of its tokenizer, weights in one safetensors file) plus the manifest, so
`load_model` boots it as a Bridge again and any HF tool reads it.

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
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from safetensors.torch import save_model as _st_save_model

from interp import tl
from interp.arch import Arch, Model, is_bridge, kind_of, model_name, tokenizer_of
from interp.atomic import Artefact, atomic_dir, write_json_atomic
from interp.tl import HookedTransformer, HookedTransformerConfig

log = logging.getLogger(__name__)

ORGANISM_PREFIX = "organism:"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
# Files a Hugging Face save_pretrained writes beside config.json and the weights (the model's own)
_HF_FILES = (r"(tokenizer_config\.json|special_tokens_map\.json|generation_config\.json|added_tokens\.json|"
             r"vocab\.json|vocab\.txt|merges\.txt|chat_template\.(jinja|json)|tokenizer\.model|spiece\.model|"
             r"model-\d+-of-\d+\.safetensors|model\.safetensors\.index\.json)")
ModelKind = Literal["hooked", "bridge"]


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

def config_to_dict(cfg: Any) -> dict[str, Any]:  # a HookedTransformerConfig or TransformerBridgeConfig
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


def config_fingerprint(cfg: Any) -> str:  # either model kind's config
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
                     manifest_key="sha256", marker=WEIGHTS, pattern=_HF_FILES)


def save_model(
    model: Model,
    path: str | Path,
    *,
    manifest: dict[str, Any] | None = None,
    vocab: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` to directory `path` (config + safetensors weights + manifest + tokenizer), atomically.

    A HookedTransformer keeps its TransformerLens config; a TransformerBridge is written as a
    Hugging Face folder (its HF model's and tokenizer's ``save_pretrained``). The model's own
    tokenizer (``model.tokenizer``) is saved with its Hugging Face files; `vocab` instead writes a
    `VocabTokenizer` word list (HookedTransformer only). The model's name goes into the manifest.

    `path` must be new, an empty directory, or (with `overwrite=True`) a model directory written
    here before; only the model's own files are replaced and any other file in the folder is
    kept. A new directory is assembled in a temporary sibling and renamed into place, so an
    interrupted save never leaves a half-written model where a complete one is expected.
    """
    path = Path(path)
    bridge = is_bridge(model) and not tl.is_native(model)  # a native bridge (TL 4) saves as a TL checkpoint
    tok = tokenizer_of(model)
    if vocab is not None and bridge:
        raise ValueError("save_model vocab: expected None for a TransformerBridge (its Hugging Face tokenizer "
                         "is saved with it), got a word list; attach the tokenizer with load_model(..., tokenizer=)")
    with atomic_dir(path, MODEL_DIR, overwrite=overwrite) as tmp:
        facts = dict(manifest or {})
        if bridge:
            _save_hf(model, tmp)
            arch = Arch.of(model)
            facts.setdefault("architecture", {"n_layers": arch.n_layers, "d_model": arch.d_model,
                                              "n_heads": arch.n_heads, "d_head": arch.d_head,
                                              "d_vocab": arch.d_vocab, "n_ctx": arch.n_ctx})
        else:
            cfg = config_to_dict(model.cfg)
            (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            _st_save_model(model, str(tmp / WEIGHTS))
            facts.setdefault("architecture", {k: cfg[k] for k in (
                "n_layers", "d_model", "n_heads", "d_head", "d_vocab", "n_ctx") if k in cfg})
        facts["sha256"] = sha256_file(tmp / WEIGHTS)
        facts["kind"] = kind_of(model)
        facts.setdefault("model_name", model_name(model))
        if vocab is not None:
            write_json_atomic(tmp / TOKENIZER, {"vocab": list(vocab)})
            facts["tokenizer"] = "vocab"
        elif tok is not None and hasattr(tok, "save_pretrained"):
            tok.save_pretrained(str(tmp))
            facts["tokenizer"] = "hf"
        write_json_atomic(tmp / MANIFEST, facts)
    return path


def _hf_state_dict(bridge: Model) -> dict[str, torch.Tensor]:
    """The Bridge's HF model weights under the HF model's own parameter names.

    The Bridge swaps the HF modules for wrappers (``._original_component`` in every name, several
    aliases per tensor), so `save_pretrained` on it refuses the shared tensors; the names of a
    freshly built (meta-device, no memory) model of the same class pick one alias per tensor."""
    hf = bridge.original_model
    with torch.device("meta"):
        fresh = type(hf)(hf.config)
    want = list(fresh.state_dict().keys())
    have: dict[str, torch.Tensor] = {}
    for k, v in hf.state_dict().items():
        have.setdefault(k.replace("._original_component", ""), v)
    missing = [k for k in want if k not in have]
    if missing:
        raise ModelLoadError(f"save_model: expected the Bridge's weights to cover its HF model's parameters, got "
                             f"{len(missing)} missing (first {missing[:3]})")
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for k in want:  # tied weights (lm_head = embed_tokens) are stored once, as save_pretrained does
        t = have[k]
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[k] = t.detach().contiguous()
    return out


def _save_hf(bridge: Model, d: Path) -> None:
    """Write a Bridge's HF model as a Hugging Face folder: config.json, generation_config.json and
    one model.safetensors under the HF parameter names."""
    from safetensors.torch import save_file

    hf = bridge.original_model
    hf.config.save_pretrained(str(d))
    gen = getattr(hf, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(d))
    save_file({k: v.cpu() for k, v in _hf_state_dict(bridge).items()}, str(d / WEIGHTS), metadata={"format": "pt"})


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


def is_hf_config(cfg: Any) -> bool:
    """Whether a parsed config.json is a Hugging Face config (it names `model_type`), not an interp one."""
    return isinstance(cfg, dict) and "n_layers" not in cfg and bool({"model_type", "architectures"} & set(cfg))


def is_hf_folder(path: str | Path) -> bool:
    """Whether `path` is a Hugging Face model folder (a config.json naming its `model_type`)."""
    f = Path(path) / CONFIG
    try:
        return f.is_file() and is_hf_config(json.loads(f.read_text()))
    except (OSError, json.JSONDecodeError):
        return False


def load_tokenizer(spec: Any) -> Any:
    """A Hugging Face tokenizer from a folder, a cached HF id, or a tokenizer object (returned as is).

    Offline: only local files are read. A folder whose ``tokenizer.json`` is a `VocabTokenizer`
    word list gives that `VocabTokenizer`."""
    if spec is None or not isinstance(spec, (str, Path)):
        return spec
    s = str(spec)
    if s.startswith(ORGANISM_PREFIX):
        s = str(_resolve_dir(s))
    d = Path(s)
    if (d / TOKENIZER).is_file():
        try:
            data = json.loads((d / TOKENIZER).read_text())
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict) and list(data) == ["vocab"]:
            from interp.tokens import VocabTokenizer

            return VocabTokenizer(tuple(data["vocab"]))
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(s, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"tokenizer {s!r}: expected a folder with Hugging Face tokenizer files or an HF id in "
                             f"the local cache, got none ({type(e).__name__}: {str(e)[:200]})") from e


def _hf_dtype(d: Path, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    cfg = json.loads((d / CONFIG).read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    got = getattr(torch, name, None) if isinstance(name, str) else None
    return got if isinstance(got, torch.dtype) else torch.float32


def _verify_weights(d: Path) -> None:
    if not (d / MANIFEST).is_file() or not (d / WEIGHTS).is_file():
        return
    want = json.loads((d / MANIFEST).read_text()).get("sha256")
    if want is not None:
        got = sha256_file(d / WEIGHTS)
        if got != want:
            raise ModelLoadError(
                f"checkpoint {d / WEIGHTS}: expected sha256 {want} (from {MANIFEST}), got {got}; "
                f"the weights are corrupted or were replaced — restore or retrain them"
            )


def load_hf(path: str | Path, *, kind: ModelKind = "bridge", device: str | torch.device | None = None,
            dtype: torch.dtype | None = None, tokenizer: Any = None, verify: bool = True) -> Model:
    """A local Hugging Face folder as a TransformerBridge (``kind="bridge"``) or, where TransformerLens
    supports the architecture, a HookedTransformer converted from it (``kind="hooked"``; no weight
    processing: the logits equal the HF model's). `dtype` defaults to the folder's own."""
    d = Path(path)
    if not (d / CONFIG).is_file():
        raise ModelLoadError(f"model directory {d}: expected a Hugging Face {CONFIG}, got no such file")
    if not any(d.glob("*.safetensors")) and not any(d.glob("*.bin")):
        raise ModelLoadError(f"model directory {d}: expected weights (*.safetensors) beside {CONFIG}, got none "
                             f"(a config-only folder: download or copy the weights there)")
    if verify:
        _verify_weights(d)
    dt = _hf_dtype(d, dtype)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    if tok is None and ((d / TOKENIZER).is_file() or (d / "tokenizer_config.json").is_file()):
        tok = load_tokenizer(d)
    if kind == "bridge":
        from interp.tl import TransformerBridge

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            try:
                model = TransformerBridge.boot_transformers(str(d), device=device, dtype=dt, tokenizer=tok)
            except Exception as e:  # noqa: BLE001 - HF/TL raise many types; wrap with the folder
                hint = ("; the folder has no tokenizer files: pass tokenizer=PATH_OR_HF_ID (or a tokenizer object)"
                        if tok is None else "")
                raise ModelLoadError(f"model directory {d}: booting it as a TransformerBridge failed: "
                                     f"{type(e).__name__}: {str(e)[:300]}{hint}") from e
        return model.eval()
    if kind != "hooked":
        raise ValueError(f"kind: expected 'bridge' or 'hooked', got {kind!r}")
    return _hf_as_hooked(d, device=device, dtype=dt, tokenizer=tok)


def _hf_as_hooked(d: Path, *, device: str | torch.device | None, dtype: torch.dtype, tokenizer: Any) -> Model:
    import tempfile

    if not tl.HAS_HOOKED_TRANSFORMER:
        raise ModelLoadError(f"model directory {d} with kind='hooked': expected TransformerLens 3.x (HookedTransformer), "
                             f"got {tl.TL_VERSION}, which removed it; load it as a TransformerBridge (kind='bridge')")

    from transformers import AutoModelForCausalLM

    from interp.tl import loading_from_pretrained as tl_loading

    cfg = json.loads((d / CONFIG).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        # TransformerLens reads a local folder's config by path, but guesses the architecture from
        # the path's name ("llama" anywhere in it) and expects GPT-2's old `n_ctx` key: show it a
        # neutrally named view of the folder (links to its files) with that key filled in.
        view = Path(tmp) / "model"
        view.mkdir()
        for f in d.iterdir():
            if f.name != CONFIG:
                (view / f.name).symlink_to(f.resolve())
        if "n_ctx" not in cfg and "n_positions" in cfg:
            cfg = {**cfg, "n_ctx": cfg["n_positions"]}
        (view / CONFIG).write_text(json.dumps(cfg))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            try:
                tl_cfg = _fill_missed_fields(tl_loading.get_pretrained_model_config(str(view), device=device,
                                                                                    dtype=dtype), cfg)
                hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype)
                state = tl_loading.get_pretrained_state_dict(str(view), tl_cfg, hf_model=hf)
            except Exception as e:  # noqa: BLE001
                raise ModelLoadError(f"model directory {d}: expected an architecture TransformerLens's "
                                     f"HookedTransformer supports (model_type {cfg.get('model_type')!r}), got "
                                     f"{type(e).__name__}: {e}; load it as a TransformerBridge (kind='bridge')") from e
    tl_cfg.model_name = d.name
    tl_cfg.tokenizer_name = None  # the tokenizer comes from the folder (or tokenizer=), not by name
    model = HookedTransformer(tl_cfg, tokenizer=tokenizer)
    try:
        model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                          fold_value_biases=False, refactor_factored_attn_matrices=False)
    except RuntimeError as e:  # shapes TransformerLens's config conversion got wrong
        raise ModelLoadError(f"model directory {d}: expected TransformerLens's HookedTransformer conversion to fit "
                             f"the HF weights, got {str(e)[:300]}; load it as a TransformerBridge (kind='bridge')") from e
    model.eval()
    _check_conversion(d, model, hf)
    return model


def _fill_missed_fields(tl_cfg: HookedTransformerConfig, hf_cfg: dict[str, Any]) -> HookedTransformerConfig:
    """The HF config fields TransformerLens's config converter ignores, filled in: GPT-2's
    `n_inner` (the MLP width; TransformerLens assumes 4 * n_embd, HF uses n_inner when it is set)."""
    n_inner = hf_cfg.get("n_inner")
    if hf_cfg.get("model_type") == "gpt2" and n_inner is not None and int(n_inner) != tl_cfg.d_mlp:
        return dataclasses.replace(tl_cfg, d_mlp=int(n_inner))
    return tl_cfg


def _check_conversion(d: Path, model: HookedTransformer, hf: Any) -> None:
    """Refuse a conversion whose logits are not the HF model's (TransformerLens's config converter
    misses some fields, e.g. Llama's attention biases): one short forward of both on the same tokens."""
    tokens = torch.arange(min(8, model.cfg.d_vocab, model.cfg.n_ctx))[None] % model.cfg.d_vocab
    with torch.inference_mode():
        ours = model(tokens.to(next(model.parameters()).device)).float().cpu()
        theirs = hf.to(next(model.parameters()).device)(tokens.to(next(model.parameters()).device)).logits.float().cpu()
    err = float((ours - theirs).abs().max())
    tol = (1e-3 if model.cfg.dtype == torch.float32 else 5e-2) * (1 + float(theirs.abs().max()))
    if ours.shape != theirs.shape or not err <= tol:
        raise ModelLoadError(f"model directory {d}: expected TransformerLens's HookedTransformer conversion to "
                             f"reproduce the HF logits, got a max difference of {err:.3g} (> {tol:.2g}): "
                             f"TransformerLens does not convert this configuration faithfully; load it as a "
                             f"TransformerBridge (kind='bridge')")


def load_local(path: str | Path, *, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, verify: bool = True, tokenizer: Any = None) -> HookedTransformer:
    """Load a directory written by `save_model` from a HookedTransformer; refuse weights whose
    sha256 mismatches. Its saved Hugging Face tokenizer (or `tokenizer`) is attached."""
    d = Path(path)
    missing = [n for n in (CONFIG, WEIGHTS) if not (d / n).is_file()]
    if missing:
        raise ModelLoadError(
            f"model directory {d}: expected {CONFIG} and {WEIGHTS} (written by interp.save_model), "
            f"missing {missing}"
        )
    try:
        cfg_dict = json.loads((d / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"model config {d / CONFIG}: expected JSON, got a parse error: {e}") from e
    if is_hf_config(cfg_dict):
        raise ModelLoadError(f"model directory {d}: expected a directory written by interp.save_model from a "
                             f"HookedTransformer, got a Hugging Face folder; load it with interp.load_model")
    if verify:
        _verify_weights(d)
    if dtype is not None:
        cfg_dict["dtype"] = str(dtype).removeprefix("torch.")
    saved_hf_tok = (d / MANIFEST).is_file() and json.loads((d / MANIFEST).read_text()).get("tokenizer") == "hf"
    if saved_hf_tok or tokenizer is not None:
        cfg_dict = {**cfg_dict, "tokenizer_name": None}  # attached below, never fetched by name
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
    if tokenizer is None and saved_hf_tok:
        tokenizer = d
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        if hasattr(tok, "save_pretrained"):  # a Hugging Face tokenizer (a VocabTokenizer stays outside)
            model.set_tokenizer(tok)
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
            f"model {name!r}: expected a TransformerLens pretrained name, a local directory (written "
            f"by interp.save_model, or a Hugging Face model folder), a Hugging Face id in the local cache, "
            f"or 'organism:NAME'; got none of these"
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


def hf_cache_dir(name: str) -> Path | None:
    """The local snapshot folder of HF id `name` in the Hugging Face cache, or None (never downloads)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(name, CONFIG)
    except Exception:  # noqa: BLE001 - an invalid repo id
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def load_model(spec: str | Path, *, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, kind: ModelKind | None = None, tokenizer: Any = None,
               **kwargs: Any) -> Model:
    """A model in eval mode from a name, a local directory or an organism.

    `spec` is ``"organism:NAME"``, a directory written by `save_model`, a local Hugging Face folder,
    an HF id in the local cache, or a TransformerLens name such as ``"gpt2"``. HF folders and ids
    give a `TransformerBridge` unless ``kind="hooked"``; TransformerLens names and organisms give a
    `HookedTransformer` unless ``kind="bridge"`` (TL names only). `tokenizer` (path, HF id or
    object) replaces the model's own. `device` and `dtype` default to the checkpoint's own.
    """
    if kind not in (None, "hooked", "bridge"):
        raise ValueError(f"kind: expected None, 'hooked' or 'bridge', got {kind!r}")
    s = str(spec)
    if s.startswith(ORGANISM_PREFIX):
        if kind == "bridge":
            raise ModelLoadError(f"model {s!r}: expected kind None or 'hooked' for an organism (a "
                                 f"HookedTransformer), got 'bridge'")
        return load_local(_resolve_dir(s), device=device, dtype=dtype, tokenizer=tokenizer)
    if Path(s).is_dir():
        if is_hf_folder(s):
            return load_hf(s, kind=kind or "bridge", device=device, dtype=dtype, tokenizer=tokenizer)
        if kind == "bridge":
            raise ModelLoadError(f"model directory {s}: expected a Hugging Face folder for kind='bridge', got "
                                 f"an interp HookedTransformer directory")
        return load_local(s, device=device, dtype=dtype, tokenizer=tokenizer)
    if "/" in s and not Path(s).exists() and (s.startswith((".", "/")) or s.endswith("/")):
        raise ModelLoadError(f"model directory {s}: expected a directory, got no such path")
    if not _is_tl_name(s):
        cached = hf_cache_dir(s)
        if cached is not None:
            return load_hf(cached, kind=kind or "bridge", device=device, dtype=dtype, tokenizer=tokenizer,
                           verify=False)
        if s.count("/") == 1 and not s.startswith((".", "/")):  # an HF id ("org/name") not in the cache
            if kind == "hooked":
                raise ModelLoadError(f"model {s!r}: expected it in the local Hugging Face cache for kind='hooked', "
                                     f"got no cached copy; download it, or load it as a Bridge")
            return _boot_pretrained(s, device=device, dtype=dtype, tokenizer=tokenizer)
    if kind == "bridge":
        return _boot_pretrained(s, device=device, dtype=dtype, tokenizer=tokenizer)
    model = _load_pretrained(s, device=device, dtype=dtype, **kwargs)
    if tokenizer is not None:
        model.set_tokenizer(load_tokenizer(tokenizer))
    return model


def _is_tl_name(name: str) -> bool:
    from interp.tl import official_model_name as get_official_model_name

    try:
        get_official_model_name(name)
    except ValueError:
        return False
    return True


def _boot_pretrained(name: str, *, device: str | torch.device | None, dtype: torch.dtype | None,
                     tokenizer: Any) -> Model:
    """A TransformerLens name booted as a TransformerBridge from the local HF cache (or the hub)."""
    from interp.tl import official_model_name as get_official_model_name

    official = get_official_model_name(name) if _is_tl_name(name) else name
    cached = hf_cache_dir(official)
    if cached is not None:
        return load_hf(cached, kind="bridge", device=device, dtype=dtype, tokenizer=tokenizer, verify=False)
    if not hub_reachable():
        raise ModelLoadError(
            f"model {name!r} ({official}): expected its weights in the local Hugging Face cache "
            f"or a reachable hub, got neither (offline). Pre-download it on a connected machine "
            f"(`huggingface-cli download {official}`) and copy the cache here, or save it once with "
            f"interp.save_model and load that directory.")
    from interp.tl import TransformerBridge

    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    return TransformerBridge.boot_transformers(official, device=device, dtype=dtype or torch.float32,
                                               tokenizer=tok).eval()
