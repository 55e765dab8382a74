"""The one module that knows which TransformerLens is installed (3.x or 4.x).

Every TransformerLens import of the toolkit outside `interp.sae` goes through here, so the rest
of interp runs unchanged on both. What TransformerLens 4 changed (read from its 4.3 source):

- removed: ``HookedTransformer``, ``HookedTransformerConfig`` (and the HookedEncoder family),
  ``transformer_lens.utils`` (now ``transformer_lens.utilities``, same names),
  ``loading_from_pretrained`` (names: ``transformer_lens.supported_models``), ``components``,
  ``past_key_value_caching``, ``train`` (now ``tools.training``);
- moved: ``HookedRootModule`` is imported from ``transformer_lens`` (no longer from
  ``hook_points``);
- kept: ``TransformerBridge`` (``boot_transformers`` for Hugging Face folders, ``boot_native``
  for a TL-style config), ``TransformerBridgeConfig``, ``HookPoint``, ``ActivationCache``,
  ``TransformerLensKeyValueCache`` (+ ``Entry``), ``transformer_lens.patching``,
  ``utilities.get_act_name``, ``apply_softcap``, ``simple_attn_linear``.

The organisms and `save_model` folders are HookedTransformer checkpoints (property-style keys
``blocks.0.attn.W_Q`` with per-head shapes, a HookedTransformerConfig). On TL 4 they load as a
``TransformerBridge.boot_native`` model (TL's own minimal transformer behind the Bridge): the
config maps field by field (`native_config`) and the weights are reshaped to ``nn.Linear``
layout (`native_state_dict`, the conversion of TL 4's ``convert_tl_checkpoint``, written here
so it also runs, and is tested, on TL 3.9, which has ``boot_native`` too). One difference is
handled exactly: the native rotary embedding rotates adjacent pairs (GPT-J layout) where
HookedTransformer rotates the two halves (GPT-NeoX layout) — the Q/K weights are permuted
within each head so the rotated dot products are unchanged (``hook_q``/``hook_k`` then hold
the same values in that permuted d_head order; ``cfg.rotary_adjacent_pairs`` says so).
Unsupported on the native model (refused by name): parallel attention/MLP, local attention,
QK norm, positional schemes other than learned and rotary (shortformer, alibi); the NoPE
organism is a learned table frozen at zero, so it loads. On TL 3.9 the native attention fires
``hook_pattern`` after the value product (an edit there does not change the output); TL 4
applies it before. On both, the native attention hands the bridge only its pattern, which TL fires
at ``hook_attn_scores`` too: `interp.native_attn` serves that hook with the real scores (and
edits of them on TL 4). The native model keeps no K/V cache (nor does any bridge take TL's), so
`interp.decoding.generate` recomputes every step on a bridge.
"""

from __future__ import annotations

import copy
import importlib.metadata
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import einops
import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import ActivationCache, TransformerBridgeConfig, patching  # noqa: F401
from transformer_lens.hook_points import HookPoint  # noqa: F401
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.supported_models import OFFICIAL_MODEL_NAMES  # noqa: F401
from transformer_lens.utilities import get_act_name  # noqa: F401
from transformer_lens.utilities.activation_functions import apply_softcap  # noqa: F401
from transformer_lens.utilities.attention import simple_attn_linear  # noqa: F401

log = logging.getLogger(__name__)

TL_VERSION: str = importlib.metadata.version("transformer-lens")
TL_MAJOR: int = int(TL_VERSION.split(".")[0])

try:  # TL 3.x; removed in 4.0
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    HAS_HOOKED_TRANSFORMER = True
except ImportError:
    HAS_HOOKED_TRANSFORMER = False

    class _EveryModel(type):
        def __instancecheck__(cls, obj: object) -> bool:
            return isinstance(obj, TransformerBridge)

        def __subclasscheck__(cls, sub: type) -> bool:
            return issubclass(sub, TransformerBridge)

    class HookedTransformer(metaclass=_EveryModel):  # type: ignore[no-redef]
        """Stand-in on TransformerLens 4, where HookedTransformer is gone and every model is a
        TransformerBridge: the name stays a type that every model satisfies (annotations such as
        ``model: HookedTransformer`` accept the bridges; test `is_bridge` first to tell the kinds
        apart), and building one says what to do instead."""

        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            raise ImportError(f"HookedTransformer: expected TransformerLens 3.x, got {TL_VERSION}; on "
                              f"TransformerLens 4 use interp.models.new_model / load_model, which return a "
                              f"TransformerBridge (boot_native for organisms and saved models)")

    class HookedTransformerConfig(TransformerBridgeConfig):  # type: ignore[no-redef]
        """Stand-in on TransformerLens 4: the `TransformerBridgeConfig` of HookedTransformerConfig
        fields (for TL's native model; `native_config`)."""

        def __init__(self, **fields: Any) -> None:
            kw, extras = _native_fields(fields)
            super().__init__(**kw)
            for k, v in extras.items():
                setattr(self, k, v)

try:
    from transformer_lens import HookedRootModule  # noqa: F401  (TL 4: the top level only)
except ImportError:  # pragma: no cover - older 3.x
    from transformer_lens.hook_points import HookedRootModule  # noqa: F401

try:
    from transformer_lens import TransformerLensKeyValueCache as KVCache
    from transformer_lens import TransformerLensKeyValueCacheEntry as KVCacheEntry
except ImportError:  # 3.x spells the module path only
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache as KVCache  # noqa: F401
    from transformer_lens.cache.key_value_cache_entry import (  # noqa: F401
        TransformerLensKeyValueCacheEntry as KVCacheEntry,
    )

try:  # TL 3.x: HookedTransformer's config derivation (converting a Hugging Face model to one)
    from transformer_lens import loading_from_pretrained
except ImportError:

    class _Removed:
        """Stand-in for a module TransformerLens 4 removed: any use says so."""

        def __init__(self, name: str) -> None:
            self._name = name

        def __getattr__(self, attr: str) -> Any:
            raise ImportError(f"transformer_lens.{self._name}.{attr}: expected TransformerLens 3.x, got "
                              f"{TL_VERSION} (removed in 4.0); a HookedTransformer conversion needs TL 3")

    loading_from_pretrained = _Removed("loading_from_pretrained")  # type: ignore[assignment]

# Either kind of model the toolkit accepts (for annotations and isinstance checks).
AnyModel = HookedTransformer | TransformerBridge


def is_native(model: object) -> bool:
    """Whether `model` is a TransformerBridge around TransformerLens's own native model (what the
    organisms and HookedTransformer checkpoints load as on TL 4): a bridge without a Hugging Face
    model, so no ``original_model.config``; rebuild it from `config_fields(model.cfg)` instead."""
    return isinstance(model, TransformerBridge) and getattr(model.cfg, "architecture", None) == "TransformerLensNative"


def official_model_name(name: str) -> str:
    """TransformerLens's official name for a pretrained alias; ValueError for an unknown one."""
    try:
        from transformer_lens.supported_models import get_official_model_name
    except ImportError:  # 3.x keeps it in loading_from_pretrained
        from transformer_lens.loading_from_pretrained import get_official_model_name
    return get_official_model_name(name)  # type: ignore[no-any-return]


# The init fields of TransformerLens 3.9's HookedTransformerConfig: what a saved model's config.json
# may hold, on either version (tests/test_tl.py checks the list against TL 3).
HOOKED_CONFIG_FIELDS: tuple[str, ...] = (
    'd_model', 'd_head', 'n_layers', 'n_ctx', 'n_heads', 'd_mlp', 'd_vocab', 'device', 'use_attn_result',
    'use_split_qkv_input', 'default_prepend_bos', 'positional_embedding_type', 'n_key_value_heads',
    'attn_only', 'gated_mlp', 'uses_rms_norm', 'eps', 'layer_norm_folding', 'act_fn', 'normalization_type',
    'num_experts', 'experts_per_token', 'final_rms', 'dtype', 'model_name', 'use_attn_scale', 'attn_scale',
    'use_hook_mlp_in', 'use_attn_in', 'use_qk_norm', 'clip_qkv', 'use_logn_attn', 'train_seq_length',
    'use_dynamic_ntk_rope', 'use_local_attn', 'ungroup_grouped_query_attention', 'original_architecture',
    'from_checkpoint', 'checkpoint_index', 'checkpoint_label_type', 'checkpoint_value', 'tokenizer_name',
    'window_size', 'attn_types', 'init_mode', 'n_devices', 'attention_dir', 'seed', 'initializer_range',
    'init_weights', 'scale_attn_by_inverse_layer_idx', 'd_vocab_out', 'parallel_attn_mlp', 'rotary_dim',
    'n_params', 'use_hook_tokens', 'tokenizer_prepends_bos', 'post_embedding_ln', 'rotary_base',
    'rotary_base_local', 'rotary_scaling_factor', 'trust_remote_code', 'rotary_adjacent_pairs',
    'load_in_4bit', 'quantization_method', 'relative_attention_max_distance',
    'relative_attention_num_buckets', 'decoder_start_token_id', 'tie_word_embeddings',
    'use_normalization_before_and_after', 'attn_scores_soft_cap', 'output_logits_soft_cap',
    'use_NTK_by_parts_rope', 'NTK_by_parts_low_freq_factor', 'NTK_by_parts_high_freq_factor',
    'NTK_by_parts_factor', 'NTK_original_ctx_len', 'use_yarn_rope', 'yarn_factor', 'yarn_attention_factor',
    'yarn_beta_fast', 'yarn_beta_slow', 'yarn_original_max_position_embeddings', 'yarn_truncate',
    'yarn_global_attn_only', 'use_attention_sinks', 'norm_topk_prob'
)


def unknown_config_keys(d: Mapping[str, Any]) -> list[str]:
    """Keys of a model config dict that are not HookedTransformerConfig fields, sorted."""
    return sorted(set(d) - set(HOOKED_CONFIG_FIELDS))


def config_fields(cfg: Any) -> dict[str, Any]:
    """The HookedTransformerConfig fields of a model's config (either kind) that it has, by name."""
    return {k: getattr(cfg, k) for k in HOOKED_CONFIG_FIELDS if hasattr(cfg, k)}


def build_model(cfg: Any) -> Any:
    """A random-initialised model of a HookedTransformerConfig: a HookedTransformer on TL 3, a
    TransformerBridge on TL's native model on TL 4 (where HookedTransformer is gone)."""
    if HAS_HOOKED_TRANSFORMER:
        return HookedTransformer(cfg)
    fields = cfg if isinstance(cfg, Mapping) else config_fields(cfg)
    bcfg = cfg if isinstance(cfg, TransformerBridgeConfig) else native_config(fields)
    return boot_native(bcfg, device=fields.get("device"))


def load_weights(model: torch.nn.Module, path: str | Path, *, device: str | torch.device | None = None
                 ) -> tuple[list[str], list[str]]:
    """Load a safetensors checkpoint into `model` (not strict); (missing, unexpected) keys.

    A HookedTransformer checkpoint loaded into a native TransformerBridge (TL 4) is converted
    first (`native_state_dict`); one saved from a bridge is loaded as it is.
    """
    from safetensors.torch import load_file
    from safetensors.torch import load_model as st_load_model

    if not isinstance(model, TransformerBridge):
        missing, unexpected = st_load_model(model, str(path), strict=False, device=str(device or "cpu"))
        return list(missing), list(unexpected)
    state = load_file(str(path), device=str(device or "cpu"))
    if any(k.endswith((".W_Q", ".W_E")) for k in state):
        state = native_state_dict(state, model.cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    return list(missing), list(unexpected)


# ------------------------------------------------------------ HookedTransformer checkpoint -> native

_UNSUPPORTED = {"parallel_attn_mlp": True, "use_local_attn": True, "post_embedding_ln": True,
                "use_normalization_before_and_after": True, "use_qk_norm": True}


def _native_fields(fields: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(TransformerBridgeConfig init arguments, attributes to set after) of HookedTransformerConfig
    fields; features the native model lacks are refused by name."""
    import dataclasses
    import inspect

    d = dict(fields)
    bad = sorted(k for k, v in _UNSUPPORTED.items() if d.get(k) == v)
    pos = d.get("positional_embedding_type", "standard")
    if pos not in ("standard", "rotary"):
        bad.append(f"positional_embedding_type={pos!r}")
    if bad:
        raise ValueError(f"native TransformerBridge config: expected features TransformerLens's native model "
                         f"implements, got {bad}; this model needs a HookedTransformer (TransformerLens 3.x)")
    if isinstance(d.get("dtype"), str):
        d["dtype"] = getattr(torch, d["dtype"])
    d.pop("device", None)
    d["architecture"] = "TransformerLensNative"
    if d.get("act_fn") is None:  # attn-only organisms carry none; the native MLP is never built then
        d["act_fn"] = "relu"
    valid = set(inspect.signature(TransformerBridgeConfig.__init__).parameters) - {"self", "kwargs"}
    valid |= {f.name for f in dataclasses.fields(TransformerBridgeConfig) if f.init} - {"device"}
    kw = {k: v for k, v in d.items() if k in valid and v is not None}
    extras: dict[str, Any] = {}
    if pos == "rotary":
        extras["rotary_dim"] = d.get("rotary_dim") or d["d_head"]
        extras["rotary_adjacent_pairs"] = True  # the native model's layout (see `native_state_dict`)
    return kw, extras


def _bridge_config(cls: type, fields: Mapping[str, Any]) -> Any:
    kw, extras = _native_fields(fields)
    cfg = cls(**kw)
    for k, v in extras.items():
        setattr(cfg, k, v)
    return cfg


def native_config(fields: Mapping[str, Any] | Any) -> TransformerBridgeConfig:
    """The `TransformerBridgeConfig` of a HookedTransformerConfig's fields (a dict or a config),
    for ``TransformerBridge.boot_native`` (on TL 4: the `HookedTransformerConfig` stand-in)."""
    d = dict(fields) if isinstance(fields, Mapping) else config_fields(fields)
    return _bridge_config(TransformerBridgeConfig if HAS_HOOKED_TRANSFORMER else HookedTransformerConfig, d)


def rotary_pairs_permutation(d_head: int, rotary_dim: int) -> Int[Tensor, "d_head"]:
    """Index map j -> source dim: adjacent pair (2i, 2i+1) takes the halves pair (i, i + rd/2)."""
    half = rotary_dim // 2
    rot = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)
    return torch.cat([rot, torch.arange(rotary_dim, d_head)])


_KEYS = [  # (HookedTransformer suffix, native suffix, kind)
    (".W_Q", ".q.weight", "wq"), ("._W_K", ".k.weight", "wk"), ("._W_V", ".v.weight", "wv"),
    (".W_K", ".k.weight", "wk"), (".W_V", ".v.weight", "wv"), (".W_O", ".o.weight", "wo"),
    (".b_Q", ".q.bias", "bq"), ("._b_K", ".k.bias", "bk"), ("._b_V", ".v.bias", "bv"),
    (".b_K", ".k.bias", "bk"), (".b_V", ".v.bias", "bv"), (".b_O", ".o.bias", "id"),
    (".W_in", ".in.weight", "t"), (".b_in", ".in.bias", "id"), (".W_out", ".out.weight", "t"),
    (".b_out", ".out.bias", "id"), (".W_gate", ".gate.weight", "t"), (".W_U", ".weight", "t"),
    (".b_U", ".bias", "id"), (".W_E", ".weight", "id"), (".W_pos", ".weight", "id"),
    (".w", ".weight", "id"), (".b", ".bias", "id"),
]
_DROPPED = (".mask", ".IGNORE", ".rotary_sin", ".rotary_cos")


def native_state_dict(state: Mapping[str, Tensor], cfg: TransformerBridgeConfig) -> dict[str, Tensor]:
    """HookedTransformer weights (property keys, per-head shapes) in the bridge's key/tensor layout.

    Rotary models: Q/K dims are permuted within each head from the halves layout to adjacent
    pairs (`rotary_pairs_permutation`), which leaves every rotated q.k product, and so the model, unchanged.
    """
    rotary = getattr(cfg, "positional_embedding_type", "standard") == "rotary"
    perm = rotary_pairs_permutation(cfg.d_head, cfg.rotary_dim or cfg.d_head) if rotary else None
    out: dict[str, Tensor] = {}
    for key, t in state.items():
        if key.endswith(_DROPPED):
            continue
        match = next(((old, new, kind) for old, new, kind in _KEYS if key.endswith(old)), None)
        if match is None:
            raise ValueError(f"HookedTransformer checkpoint key {key!r}: expected a parameter of "
                             f"{[k for k, _, _ in _KEYS]}, got an unknown suffix")
        old, new, kind = match
        if perm is not None and kind in ("wq", "wk", "bq", "bk"):
            t = t[..., perm]
        if kind in ("wq", "wk", "wv"):
            t = einops.rearrange(t, "h m d -> (h d) m")
        elif kind == "wo":
            t = einops.rearrange(t, "h d m -> m (h d)")
        elif kind in ("bq", "bk", "bv"):
            t = einops.rearrange(t, "h d -> (h d)")
        elif kind == "t":
            t = t.T
        out[key[: -len(old)] + new] = t.contiguous()
    if cfg.gated_mlp:  # the native gated MLP has no biases (Llama's has none either)
        biases = [k for k in out if ".mlp." in k and k.endswith(".bias")]
        nonzero = [k for k in biases if bool(out[k].ne(0).any())]
        if nonzero:
            raise ValueError(f"native TransformerBridge weights: expected zero gated-MLP biases (the native "
                             f"gated MLP has none), got nonzero {nonzero[:3]}; this model needs a "
                             f"HookedTransformer (TransformerLens 3.x)")
        for k in biases:
            del out[k]
    return out


def boot_native(cfg: Mapping[str, Any] | TransformerBridgeConfig, *, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None) -> TransformerBridge:
    """A random-initialised TransformerBridge on TL's native model, from HookedTransformerConfig fields."""
    bcfg = cfg if isinstance(cfg, TransformerBridgeConfig) else native_config(cfg)
    dtype = dtype if dtype is not None else getattr(bcfg, "dtype", None)
    return TransformerBridge.boot_native(copy.deepcopy(bcfg), device=device, dtype=dtype,
                                         model_name=getattr(bcfg, "model_name", None) or "custom").eval()


def native_from_hooked(cfg: Mapping[str, Any], state: Mapping[str, Tensor], *,
                       device: str | torch.device | None = None,
                       dtype: torch.dtype | None = None) -> TransformerBridge:
    """A HookedTransformer checkpoint (config fields + state dict) as a TransformerBridge.

    Equal logits to the HookedTransformer of the same weights (tested to float rounding).
    """
    model = boot_native(native_config(cfg), device=device, dtype=dtype)
    missing, unexpected = model.load_state_dict(native_state_dict(state, model.cfg), strict=False)
    if missing or unexpected:
        raise ValueError(f"native TransformerBridge weights: expected the checkpoint to fill every parameter, "
                         f"got missing {list(missing)[:5]} and unexpected {list(unexpected)[:5]}")
    return model.eval()
