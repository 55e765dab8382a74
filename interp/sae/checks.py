"""Is this SAE being used with the model and at the hook it was trained on?

An SAE read at another hook of the same width, or spliced into another model of the same width,
runs without any error and returns plausible numbers (e.g. variance explained 0.977 and CE score
1.43 for the multihop layer-0 SAE read at layer 1): a silent wrong result. Every call that uses an
SAE with a model goes through `check_sae`, which compares

- the hook: the one the SAE records (``sae.cfg.metadata.hook_name``) with the one asked for;
- the model: the weight fingerprint the SAE records (``metadata.model_sha256``, written by
  `interp.sae.train`, or the ``model_sha256`` of a saved SAE's manifest) with `model_fingerprint`
  of the model passed in;
- the width: the SAE's ``d_in`` with the activation width at the hook (from the architecture;
  a one-token forward pass for unusual hooks).

A hook or model mismatch raises `SAEMismatchError` unless ``allow_mismatch=True`` (the call then
runs exactly as an unchecked one would); a width mismatch always raises, since nothing can run.
SAEs that record no fingerprint (sae-lens pretrained releases) are checked for hook and width only.

`model_fingerprint` is the sha256 of the weights serialised exactly as `interp.save_model` writes
them (safetensors ``save_model``: shared tensors dropped, contiguous), so it equals the ``sha256``
in a saved model's manifest. It depends on the weights and their dtype, not on the device.
Serialising costs about one pass over the weights (about 50 ms for the organisms), so the digest
is memoised per model object (weakly) and recomputed when any weight tensor is replaced or
modified in place (its version counter moves). Caveat: writes through ``param.data`` bypass the
version counter; after such an edit pass a fresh model object (or call `model_fingerprint` with
``cache=False``).
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any

import torch
from sae_lens import SAE
from safetensors.torch import _remove_duplicate_names, save
from transformer_lens import HookedTransformer

from interp.arch import Arch
from interp.graph import Node
from interp.hooks import hook_layer, resolve_hook

# model -> (state signature, sha256); weak keys, so a memo never keeps a model alive
_FINGERPRINTS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


class SAEMismatchError(ValueError):
    """An SAE used with another model, at another hook, or with activations of another width."""


def _state_signature(model: torch.nn.Module) -> tuple:
    return tuple((k, id(t), t.data_ptr(), t._version, t.dtype, tuple(t.shape), str(t.device))
                 for k, t in model.state_dict(keep_vars=True).items())


def model_fingerprint(model: torch.nn.Module, *, cache: bool = True) -> str:
    """sha256 of `model`'s weights as `interp.save_model` writes them (equals its manifest's sha256)."""
    sig = _state_signature(model) if cache else None
    if cache:
        hit = _FINGERPRINTS.get(model)
        if hit is not None and hit[0] == sig:
            return hit[1]
    # mirrors safetensors.torch.save_model, so the bytes are those of the saved checkpoint
    state = model.state_dict()
    metadata: dict[str, str] | None = None
    for kept, removed in _remove_duplicate_names(state).items():
        for name in removed:
            metadata = metadata or {}
            metadata.setdefault(name, kept)
            del state[name]
    with torch.inference_mode():
        digest = hashlib.sha256(save({k: v.detach().contiguous() for k, v in state.items()},
                                     metadata=metadata)).hexdigest()
    if cache:
        _FINGERPRINTS[model] = (sig, digest)
    return digest


_D_MODEL_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                  "hook_embed", "hook_pos_embed", "ln_final.hook_normalized")
_D_MLP_HOOKS = ("mlp.hook_pre", "mlp.hook_post", "mlp.hook_pre_linear")
_PER_HEAD_HOOKS = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z")


def _activation_width(model: HookedTransformer, sae: SAE, name: str) -> int:
    """The width the SAE would read at hook `name`: from the architecture for the usual hooks, else
    from a one-token forward pass (a probe that would also run any hooks the caller has attached)."""
    arch = Arch.of(model)
    if name.endswith(_D_MODEL_HOOKS):
        return arch.d_model
    if name.endswith(_D_MLP_HOOKS):
        return int(model.cfg.d_mlp)  # Arch has no d_mlp
    if name.endswith(_PER_HEAD_HOOKS):
        # sae-lens flattens the heads of a hook_z SAE; other per-head SAEs read one head's vector
        flat = name.endswith("hook_z") and getattr(sae.cfg, "reshape_activations", "none") == "hook_z"
        return arch.n_heads * arch.d_head if flat else arch.d_head
    shape: dict[str, tuple[int, ...]] = {}

    def grab(act: torch.Tensor, hook: Any) -> None:
        shape["x"] = tuple(act.shape)

    layer = hook_layer(name)
    stop = layer + 1 if layer is not None and layer + 1 < arch.n_layers else None
    tok = torch.zeros(1, 1, dtype=torch.long, device=model.cfg.device)
    with torch.inference_mode(), model.hooks(fwd_hooks=[(name, grab)]):
        model(tok, stop_at_layer=stop)
    if "x" not in shape:
        raise SAEMismatchError(f"SAE hook {name}: expected it to fire on a forward pass, got no activation; "
                               f"use a hook on the model's forward path")
    return shape["x"][-1]


def check_sae(model: HookedTransformer, sae: SAE, hook: str | Node | None = None, *,
              allow_mismatch: bool = False) -> str:
    """The hook name at which `sae` reads `model`, after checking hook, model and width.

    `hook` defaults to the SAE's recorded hook. Raises `SAEMismatchError` when `hook` differs from
    the recorded one, or the model's weight fingerprint differs from the recorded ``model_sha256``
    (both skipped with ``allow_mismatch=True``), and always when the activation width at the hook
    is not the SAE's ``d_in``.
    """
    recorded = sae.cfg.metadata.hook_name
    name = hook if hook is not None else recorded
    if name is None:
        raise SAEMismatchError("SAE hook: expected a hook name (argument or the SAE's metadata.hook_name), got "
                               "None; pass hook=... or record it with sae.cfg.metadata.hook_name = ...")
    name = resolve_hook(model, name)
    if not allow_mismatch and recorded is not None and name != recorded:
        raise SAEMismatchError(
            f"SAE hook: expected {recorded} (the hook the SAE was trained on), got {name}; an SAE read at another "
            f"hook returns plausible but meaningless numbers: drop the hook argument, use an SAE trained at "
            f"{name}, or pass allow_mismatch=True to read it there anyway")
    want = sae.cfg.metadata.get("model_sha256")
    if not allow_mismatch and want is not None:
        got = model_fingerprint(model)
        if got != want:
            trained_on = sae.cfg.metadata.model_name
            raise SAEMismatchError(
                f"SAE model: expected weights with sha256 {want[:12]}... (the model the SAE was trained on"
                + (f", {trained_on}" if trained_on else "") + f"), got {got[:12]}... ({model.cfg.model_name}, "
                f"{model.cfg.dtype}); another model, retrained weights or another dtype make the SAE's numbers "
                f"meaningless: load the model it was trained on, retrain the SAE, or pass allow_mismatch=True")
    width = _activation_width(model, sae, name)
    if width != sae.cfg.d_in:
        raise SAEMismatchError(
            f"SAE input width at {name}: expected {sae.cfg.d_in} (the SAE's d_in), got activations of width "
            f"{width}; this SAE was trained on another model or hook: use one trained at {name} of this model")
    return name


__all__ = ["SAEMismatchError", "check_sae", "model_fingerprint"]
