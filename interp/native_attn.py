"""Pre-softmax attention scores on TransformerLens's native model (``TransformerBridge.boot_native``).

What the organisms and HookedTransformer checkpoints load as on TransformerLens 4 (`interp.tl`).
Its attention computes the scores inside one module call and hands the bridge only the pattern,
so the bridge's ``hook_attn_scores`` fires with the *pattern* (a TransformerLens limitation, in
3.9 and 4.x) and an edit there is discarded. The toolkit reads and edits scores at
``blocks.L.attn.hook_attn_scores`` (attention knockout, path patching's key edges, captures), so
on a native bridge `attach_hooks` serves that hook here instead:

- the scores are rebuilt by the module's own operations from what it computed them from:
  ``hook_q`` / ``hook_k`` (after any edit there) and the attention's call arguments (position
  ids, attention mask): rotary, KV-group repeat, scale, soft cap, and the causal/padding mask
  written as -inf (what a HookedTransformer's ``hook_attn_scores`` holds);
- the scores hooks run on them (in the order given), as on a HookedTransformer;
- when a hook changed them, the pattern becomes their softmax (masked entries 0, as the module
  does) through the pattern seam TransformerLens 4 opens (``pattern_fn``: ``hook_pattern`` is
  applied before the value product), before any other ``hook_pattern`` hook; unchanged scores
  leave the pattern exactly as it was.

TransformerLens 3.9's native attention applies ``hook_pattern`` after the value product: reading
scores works there too, editing them raises NotImplementedError.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from interp.tl import apply_softcap, is_native


def serves_scores(model: Any) -> bool:
    """Whether `attach_hooks` serves ``hook_attn_scores`` for `model` (a native bridge)."""
    return is_native(model)


def can_edit_scores(model: Any) -> bool:
    """Whether an edit of ``hook_attn_scores`` reaches the output: always, except on a native
    bridge whose attention applies ``hook_pattern`` after the value product (TL 3.9)."""
    if not serves_scores(model):
        return True
    return all(bool(getattr(b.attn.original_component, "accepts_pattern_fn", False)) for b in model.blocks)


def native_scores(module: torch.nn.Module, q: Float[Tensor, "batch pos head d_head"],
                  k: Float[Tensor, "batch pos kv_head d_head"], position_ids: Tensor | None,
                  attention_mask: Tensor | None) -> tuple[Float[Tensor, "batch head q_pos k_pos"],
                                                          Bool[Tensor, "batch head q_pos k_pos"]]:
    """(scores with masked entries -inf, the mask) of a native attention `module` for queries `q`
    and keys `k` (pre-rotary, as ``hook_q``/``hook_k`` hold them): the module's own operations."""
    b, s = q.shape[0], q.shape[1]
    qh = q.reshape(b, s, module.n_heads, module.d_head).transpose(1, 2)
    kh = k.reshape(b, s, module.n_kv_heads, module.d_head).transpose(1, 2)
    if module.rotary is not None:
        qh, kh = module.rotary.apply_rope(qh, kh, position_ids=position_ids)
    if module.kv_repeats > 1:
        kh = kh.repeat_interleave(module.kv_repeats, dim=1)
    scores = torch.matmul(qh, kh.transpose(-2, -1)) / module.scale
    scores = apply_softcap(scores, module.attn_scores_soft_cap)
    if module.causal:
        block = module.causal_mask[:s, :s]
    else:
        block = torch.zeros(s, s, dtype=torch.bool, device=scores.device)
    if attention_mask is not None:
        block = module._combine_attention_mask(block, attention_mask, batch=b)
    block = block.expand(scores.shape)
    return scores.masked_fill(block, float("-inf")), block


def _serve(model: Any, layer: int, fns: list[Callable], state: dict[str, Any]
           ) -> tuple[list[tuple[str, Callable]], list[tuple[str, Callable]], Any]:
    """(hooks to put first, hooks to put last, a torch pre-hook handle) serving `fns` at `layer`."""
    attn = model.blocks[layer].attn
    module = attn.original_component
    editable = bool(getattr(module, "accepts_pattern_fn", False))
    hook_point = attn.hook_attn_scores
    where = hook_point.name

    def pre(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        state.clear()
        state["position_ids"] = kwargs.get("position_ids")
        state["attention_mask"] = kwargs.get("attention_mask")

    def grab(key: str) -> Callable:
        def fn(act: Tensor, hook: Any) -> None:
            state[key] = act
        return fn

    def pattern(act: Tensor, hook: Any) -> Tensor | None:
        if "q" not in state or "k" not in state:
            raise RuntimeError(f"{where} on a native TransformerBridge: expected hook_q and hook_k to fire "
                               f"before hook_pattern, got {sorted(state)}")
        scores, block = native_scores(module, state["q"], state["k"], state.get("position_ids"),
                                      state.get("attention_mask"))
        new = scores
        for fn in fns:
            out = fn(new, hook=hook_point)
            if out is not None:
                new = out
        state.clear()
        if new is scores:
            return None
        if not editable:
            raise NotImplementedError(
                f"{where} edit on a native TransformerBridge: expected an attention that applies hook_pattern before the value product (TransformerLens >= 4), got TransformerLens "
                f"3.9's, which applies it after (an edit would not reach the output); use a HookedTransformer")
        if new.shape != scores.shape:
            raise RuntimeError(f"{where}: expected a hook to return shape "
                               f"{tuple(scores.shape)}, got {tuple(new.shape)}")
        p = torch.softmax(new.masked_fill(block, float("-inf")), dim=-1).masked_fill(block, 0.0)
        return p.to(act.dtype)

    if any(getattr(h, "serves_scores", False) for h in module._forward_pre_hooks.values()):
        # a second server would rebuild the scores from q/k and drop the first one's edits
        raise NotImplementedError(f"{where} on a native TransformerBridge: expected one attach_hooks serving it at a time, got nested ones; pass the hooks together")
    pre.serves_scores = True  # type: ignore[attr-defined]
    handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    # the hook points themselves name where to attach (hook_q / hook_k are aliases of the q / k
    # projections' outputs)
    first = [(attn.hook_pattern.name, pattern)]
    last = [(attn.q.hook_out.name, grab("q")), (attn.k.hook_out.name, grab("k"))]
    return first, last, handle


@contextmanager
def attach_hooks(model: Any, fwd_hooks: Sequence[tuple[str, Callable]]) -> Iterator[None]:
    """``model.hooks(fwd_hooks=...)``, except that on a native bridge the ``hook_attn_scores``
    hooks run on the real pre-softmax scores (module doc). Hooks are removed on exit."""
    hooks = list(fwd_hooks)
    if not hooks:  # a Bridge rebuilds its hook dictionary (aliases included) on entering `hooks`
        yield
        return
    layers: list[int | None] = [None] * len(hooks)
    if serves_scores(model):
        points = {id(b.attn.hook_attn_scores): layer for layer, b in enumerate(model.blocks)}
        hook_dict = model.hook_dict  # one snapshot: each access rebuilds it on a Bridge (~2.5 ms)
        layers = [points.get(id(hook_dict.get(name))) if isinstance(name, str) else None for name, _ in hooks]
    if all(layer is None for layer in layers):
        with model.hooks(fwd_hooks=hooks):
            yield
        return
    per_layer: dict[int, list[Callable]] = {}
    rest: list[tuple[str, Callable]] = []
    for (name, fn), layer in zip(hooks, layers, strict=True):
        if layer is None:
            rest.append((name, fn))
        else:
            per_layer.setdefault(layer, []).append(fn)
    first: list[tuple[str, Callable]] = []
    last: list[tuple[str, Callable]] = []
    handles = []
    try:
        for layer, fns in sorted(per_layer.items()):
            f, lst, h = _serve(model, layer, fns, {})
            first += f
            last += lst
            handles.append(h)
        # scores edits before any other pattern hook; q/k read after every edit of them
        with model.hooks(fwd_hooks=first + rest + last):
            yield
    finally:
        for h in handles:
            h.remove()
