"""Attention knockout: block attention edges from source positions into a target position.

Geva et al. 2023 ("Dissecting recall of factual associations"): set the attention scores of
the edges (target query -> source keys) to -inf over a range of layers, so the target cannot
read those positions' keys and values there; the remaining edges are renormalised by the
softmax. Sweeping the first blocked layer l (blocked at [l, end)) answers "from which layer on
does the last position no longer need the context's K/V stream?" (METHODS.md, N(l)).

Reported for each start layer: the metric, and the KL divergence KL(base || knocked out) of the
output distribution at the target position (nats, mean over the batch). With nothing blocked
(l = end) the run is the base run and the KL is exactly 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.arch import Arch
from interp.graph import Node, Site
from interp.patching.engine import (
    DEFAULT_ROWS,
    cached_run,
    check_rows,
    forward_from,
    resid_pre_name,
)
from interp.patching.metrics import Metric, check_scalar, evaluate, metric_positions
from interp.patching.results import KnockoutResult, detach
from interp.tokens import check_model_tokens


def _kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Mean over the batch of KL(p || q) between the softmaxes of two [batch d_vocab] logit sets."""
    lp, lq = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean()


def knockout(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    *,
    target: int = -1,
    sources: Sequence[int] | None = None,
    start_layers: Sequence[int] | None = None,
    end_layer: int | None = None,
    heads: Sequence[int] | None = None,
    rows: int = DEFAULT_ROWS,
) -> KnockoutResult:
    """Block attention from `sources` into `target` at layers [l, end_layer) for each l in `start_layers`.

    Defaults: sources are all positions before the target, start layers 0..n_layers (the last
    blocks nothing), end_layer n_layers, every head (`heads` restricts the knockout to query
    heads).
    """
    check_rows(rows)
    arch = Arch.of(model)
    tokens = check_model_tokens(model, tokens).to(model.cfg.device)
    batch, seq_len = tokens.shape
    if not isinstance(target, int) or not -seq_len <= target < seq_len:
        raise ValueError(f"target: expected a position in [0, {seq_len}), got {target!r}")
    target %= seq_len
    if sources is None:
        src = tuple(range(target))
    else:
        if not all(isinstance(s, int) and -seq_len <= s < seq_len and s % seq_len <= target for s in sources):
            raise ValueError(f"sources: expected positions in [0, target={target}] (a position can only "
                             f"attend to itself and earlier ones), got {list(sources)}")
        src = tuple(sorted({s % seq_len for s in sources}))
    if not src:
        raise ValueError(f"sources: expected at least one position to block, got none (target={target})")
    end = arch.n_layers if end_layer is None else end_layer
    if not isinstance(end, int) or not 0 <= end <= arch.n_layers:
        raise ValueError(f"end_layer: expected an int in [0, {arch.n_layers}], got {end_layer!r}")
    starts = tuple(range(end + 1)) if start_layers is None else tuple(start_layers)
    for s in starts:
        if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= end:
            raise ValueError(f"start_layers: expected ints in [0, end_layer={end}], got {s!r}")
    if not starts:
        raise ValueError("start_layers: expected at least one layer, got none")
    if heads is not None:
        for h in heads:
            if not isinstance(h, int) or not 0 <= h < arch.n_heads:
                raise ValueError(f"heads: expected head indices in [0, {arch.n_heads}), got {h!r}")

    device = model.cfg.device
    edge = torch.zeros((arch.n_heads, seq_len, seq_len), dtype=torch.bool, device=device)
    head_ix = list(range(arch.n_heads)) if heads is None else list(heads)
    for h in head_ix:
        edge[h, target, list(src)] = True

    names = {resid_pre_name(layer) for layer in range(arch.n_layers)}
    base_logits, base = cached_run(model, tokens, names)
    base_metric = float(check_scalar(metric(base_logits)))
    mpos = metric_positions(metric, seq_len)
    read = None if mpos is None else mpos + [target]

    values = torch.empty(len(starts), dtype=torch.float64)
    kls = torch.empty(len(starts), dtype=torch.float64)
    base_at = base_logits if read is None else base_logits[:, read]
    per_chunk = max(1, rows // batch)
    todo = []
    for i, s in enumerate(starts):
        if s >= end:  # nothing blocked: this is the base run
            values[i] = base_metric
            kls[i] = _kl(base_logits[:, target], base_logits[:, target])
        else:
            todo.append(i)
    todo.sort(key=lambda i: starts[i])
    for lo in range(0, len(todo), per_chunk):
        chunk = todo[lo:lo + per_chunk]
        k = len(chunk)
        first = starts[chunk[0]]
        hooks = []
        for layer in range(first, end):
            on = torch.tensor([starts[i] <= layer for i in chunk], device=device)
            mask = (on[:, None, None, None, None] & edge[None, None])  # [k, 1, head, q, k]

            def hook(scores: Tensor, hook, mask=mask, k=k) -> Tensor:
                v = scores.reshape(k, batch, *scores.shape[1:])
                return v.masked_fill(mask, float("-inf")).reshape(scores.shape)

            hooks.append((Node(layer, Site.ATTN_SCORES).hook_name, hook))
        resid = base[resid_pre_name(first)].repeat(k, 1, 1)
        logits = forward_from(model, resid, first, read, hooks)
        logits = logits.reshape(k, batch, *logits.shape[1:])
        for j, i in enumerate(chunk):
            at = logits[j]
            if read is None:
                values[i] = float(evaluate(metric, at, None))
                kls[i] = _kl(base_logits[:, target], at[:, target])
            else:
                values[i] = float(evaluate(metric, at[:, :-1], mpos))
                kls[i] = _kl(base_at[:, -1], at[:, -1])
    return KnockoutResult(detach(values), detach(kls), starts, end, target, src,
                          None if heads is None else tuple(heads), base_metric)
