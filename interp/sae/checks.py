"""Is this SAE being used with the model and at the hook it was trained on?

An SAE read at another hook of the same width, or spliced into another model of the same width,
runs without any error and returns plausible numbers (e.g. variance explained 0.977 and CE score
1.43 for the multihop layer-0 SAE read at layer 1): a silent wrong result. Every call that uses an
SAE with a model goes through `check_sae`, which compares

- the hook: the one the SAE records (``sae.cfg.metadata.hook_name``) with the one asked for;
- the model: the weight fingerprint the SAE records (``metadata.model_weights``, written by
  `interp.sae.train`, or the ``model_weights`` of a saved SAE's manifest) with
  `interp.models.weights_fingerprint` of the model passed in (exact; memoised per model object);
- the width: the SAE's ``d_in`` with the activation width at the hook (from the architecture;
  a one-token forward pass for unusual hooks).

A hook or model mismatch raises `SAEMismatchError` unless ``allow_mismatch=True`` (the call then
runs exactly as an unchecked one would); a width mismatch always raises, since nothing can run.
SAEs that record no fingerprint (sae-lens pretrained releases) are checked for hook and width only.

SAEs saved before fingerprints were recorded under ``model_weights`` are checked for hook and
width only.
"""

from __future__ import annotations

import torch
from sae_lens import SAE

from interp.arch import Arch
from interp.graph import FINAL_NORM_OUT, HOOK_EMBED, HOOK_POS_EMBED, RESIDUAL_WRITERS, Node, Site, site_of
from interp.hooks import HookError, resolve_hook, run
from interp.models import weights_fingerprint
from interp.tl import HookedTransformer

# the metadata / manifest key holding the fingerprint of the model an SAE was trained on
MODEL_KEY = "model_weights"


class SAEMismatchError(ValueError):
    """An SAE used with another model, at another hook, or with activations of another width."""


_D_MODEL_HOOKS = (HOOK_EMBED, HOOK_POS_EMBED, FINAL_NORM_OUT)  # outside the blocks (no Site)
_D_MLP_HOOKS = ("mlp.hook_pre", "mlp.hook_post", "mlp.hook_pre_linear")
_PER_HEAD_SITES = (Site.Q, Site.K, Site.V, Site.HEAD)


def _activation_width(model: HookedTransformer, sae: SAE, name: str) -> int:
    """The width the SAE would read at hook `name`: from the architecture for the usual hooks, else
    from a one-token forward pass (a probe that would also run any hooks the caller has attached)."""
    arch = Arch.of(model)
    site = site_of(name)
    if site in RESIDUAL_WRITERS or name in _D_MODEL_HOOKS:
        return arch.d_model
    if name.endswith(_D_MLP_HOOKS):
        return int(model.cfg.d_mlp)  # Arch has no d_mlp
    if site in _PER_HEAD_SITES:
        # sae-lens flattens the heads of a hook_z SAE; other per-head SAEs read one head's vector
        flat = site == Site.HEAD and getattr(sae.cfg, "reshape_activations", "none") == "hook_z"
        return arch.n_heads * arch.d_head if flat else arch.d_head
    tok = torch.zeros(1, 1, dtype=torch.long)
    try:
        act = run(model, tok, captures=[name], logits=False).acts[name]
    except HookError as e:
        raise SAEMismatchError(f"SAE hook {name}: expected it to fire on a forward pass, got no activation; "
                               f"use a hook on the model's forward path") from e
    return act.shape[-1]


def check_sae(model: HookedTransformer, sae: SAE, hook: str | Node | None = None, *,
              allow_mismatch: bool = False) -> str:
    """The hook name at which `sae` reads `model`, after checking hook, model and width.

    `hook` defaults to the SAE's recorded hook. Raises `SAEMismatchError` when `hook` differs from
    the recorded one, or the model's weight fingerprint differs from the recorded ``model_weights``
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
    want = sae.cfg.metadata.get(MODEL_KEY)
    if not allow_mismatch and want is not None:
        got = weights_fingerprint(model)
        if got != want:
            trained_on = sae.cfg.metadata.model_name
            raise SAEMismatchError(
                f"SAE model: expected weights with fingerprint {want[:12]}... (the model the SAE was trained on"
                + (f", {trained_on}" if trained_on else "") + f"), got {got[:12]}... ({model.cfg.model_name}, "
                f"{model.cfg.dtype}); another model, retrained weights or another dtype make the SAE's numbers "
                f"meaningless: load the model it was trained on, retrain the SAE, or pass allow_mismatch=True")
    width = _activation_width(model, sae, name)
    if width != sae.cfg.d_in:
        raise SAEMismatchError(
            f"SAE input width at {name}: expected {sae.cfg.d_in} (the SAE's d_in), got activations of width "
            f"{width}; this SAE was trained on another model or hook: use one trained at {name} of this model")
    return name


__all__ = ["MODEL_KEY", "SAEMismatchError", "check_sae"]
