"""Attention knockout: block attention edges from source positions into a read-out position.

Geva et al. 2023 ("Dissecting recall of factual associations"): set the attention scores of
the edges (query at `at` -> source keys) to -inf over a range of layers, so that position cannot
read those positions' keys and values there; the remaining edges are renormalised by the
softmax. Sweeping the first blocked layer l (blocked at [l, end)) answers "from which layer on
does the last position no longer need the context's K/V stream?" (METHODS.md, N(l)).

`at` and the sources are per example: a span name (``"last"``, ``"subject"``), an int in prompt
coordinates (negative: from each prompt's end) or a per-example tensor, so one call covers
prompts of any lengths. Reported for each start layer and example: the metric, and the KL
divergence KL(base || knocked out) of the output distribution at the example's `at` (nats). With
nothing blocked (l = end) the run is the base run and the KL is exactly 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from interp.arch import Arch, BlockInputs, Model, device_of
from interp.graph import Node, Site
from interp.metrics import as_metric, check_per_example
from interp.patching.engine import (
    DEFAULT_ROWS,
    PosSpec,
    cached_run,
    check_finite_logits,
    check_rows,
    check_single,
    forward_from,
    metric_values,
    positions_mask,
    read_index,
    resid_pre_name,
)
from interp.patching.results import KnockoutResult, detach
from interp.prompts import Prompts
from interp.tokens import Batch


def _kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Per row, KL(p || q) between the softmaxes of two [batch d_vocab] logit sets (float64)."""
    lp, lq = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _queries(at: PosSpec, prompts: Prompts) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The blocked query positions [batch, pos] (a span name: every token of each prompt's span),
    each prompt's first and last of them, and the prompts that have them."""
    width = prompts.tokens.shape[1]
    if isinstance(at, str):
        if at not in prompts.spans:
            raise ValueError(f"at: expected an int, a [batch] tensor or a span name among {sorted(prompts.spans)}, "
                             f"got {at!r}")
        s = prompts.span(at)
        return prompts.span_mask(at, width), s[:, 0], s[:, 1] - 1, torch.ones(len(prompts), dtype=torch.bool)
    ix, valid = _at_index(at, prompts)
    return torch.arange(width)[None] == ix[:, None], ix, ix, valid


def _at_index(at: PosSpec, prompts: Prompts) -> tuple[Tensor, Tensor]:
    """Each prompt's read-out position (an int or [batch] tensor) and the prompts that have it."""
    if at is None:
        raise ValueError("at: expected a span name, an int or a [batch] tensor, got None")
    width = prompts.tokens.shape[1]
    if isinstance(at, int) and not isinstance(at, bool) and not -width <= at < width:
        raise ValueError(f"at: expected a position in [0, {width}), got {at!r}")
    if isinstance(at, Tensor) and at.dtype == torch.bool:
        raise ValueError("at: expected one position per prompt (a [batch] integer tensor), got a mask")
    mask, valid = positions_mask(at, prompts, width, "at")
    return torch.where(valid, mask.long().argmax(1), torch.zeros_like(valid, dtype=torch.long)), valid


def _sources(sources: PosSpec | Sequence[int | str], prompts: Prompts, first: Tensor, at: Tensor,
             valid: Tensor) -> Tensor:
    """[batch, k_pos] the key positions to cut off from each prompt's queries (`first`..`at`)."""
    width = prompts.tokens.shape[1]
    ar = torch.arange(width)
    if sources is None:
        mask = ar[None] < first[:, None]
    else:
        items = [sources] if isinstance(sources, (int, str, Tensor)) else list(sources)
        mask = torch.zeros(len(prompts), width, dtype=torch.bool)
        for s in items:
            if isinstance(s, int) and not isinstance(s, bool) and not -width <= s < width:
                raise ValueError(f"sources: expected positions in [0, {width}), got {s!r}")
            m, _ = positions_mask(s, prompts, width, "sources")
            mask |= m
        late = mask & (ar[None] > at[:, None]) & valid[:, None]
        if bool(late.any()):
            i = int(torch.nonzero(late.any(1))[0, 0])
            raise ValueError(f"sources: expected positions in [0, target={int(at[i])}] (a position can only "
                             f"attend to itself and earlier ones), got {torch.nonzero(mask[i])[:, 0].tolist()} "
                             f"in prompt {i}")
    empty = ~mask.any(1) & valid
    if bool(empty.any()):
        i = int(torch.nonzero(empty)[0, 0])
        raise ValueError(f"sources: expected at least one position to block in every prompt, got none for "
                         f"prompt {i} (target={int(at[i])})")
    return mask & valid[:, None]


def _label(x: object) -> str:
    if x is None:
        return "earlier"
    if isinstance(x, Tensor):
        return "per-example"
    if isinstance(x, (str, int)):
        return str(x)
    return ",".join(_label(v) for v in x)  # type: ignore[union-attr]


def knockout(
    model: Model,
    prompts: Prompts | Batch | Int[Tensor, "batch pos"],
    metric: Callable,
    *,
    at: PosSpec = "last",
    sources: PosSpec | Sequence[int | str] = None,
    start_layers: Sequence[int] | None = None,
    end_layer: int | None = None,
    heads: Sequence[int] | None = None,
    rows: int = DEFAULT_ROWS,
    alpha: float = 0.05,
    n_boot: int = 1000,
) -> KnockoutResult:
    """Block attention from `sources` into `at` at layers [l, end_layer) for each l in
    `start_layers`; one value per (start layer, example).

    `at`: the blocked query positions — a span name (every token of each prompt's span, e.g.
    ``"answer"``, the teacher-forced read-out span of a multi-token answer; the KL is read at the
    span's first token), an int in prompt coordinates (negative from each prompt's end) or a
    [batch] tensor; an example without it is NaN. `sources`: key positions (names, ints, a
    per-example tensor or [batch, pos] mask, or a sequence of them: their union); default every
    position before `at` (before the span's first token). Start layers default to
    0..n_layers (the last blocks nothing), end_layer to n_layers, heads to every query head.
    """
    check_rows(rows)
    metric = as_metric(metric)
    arch = Arch.of(model)
    p = check_single(model, prompts)
    batch, width = p.tokens.shape
    q_on, at_ix, last_q, valid = _queries(at, p)
    src = _sources(sources, p, at_ix, last_q, valid)
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

    device = device_of(model)
    head_on = torch.zeros(arch.n_heads, dtype=torch.bool)
    head_on[list(range(arch.n_heads)) if heads is None else list(heads)] = True
    edge = (head_on[None, :, None, None] & q_on[:, None, :, None] & src[:, None, None, :]).to(device)

    names = {resid_pre_name(layer) for layer in range(arch.n_layers)}
    inputs = BlockInputs()
    base_logits, base = cached_run(model, p.tokens, names, inputs)
    check_finite_logits(base_logits, p, "base run logits")
    base_values = metric_values(metric, base_logits, p, "base run")
    index = read_index(metric, p)
    read = None if index is None else torch.cat([index, at_ix[:, None]], dim=1)
    rows_ix = torch.arange(batch, device=base_logits.device)
    base_at = base_logits[rows_ix, at_ix.to(base_logits.device)]

    values = torch.empty(len(starts), batch, dtype=torch.float64)
    kls = torch.empty(len(starts), batch, dtype=torch.float64)
    per_chunk = max(1, rows // batch)
    todo = []
    for i, s in enumerate(starts):
        if s >= end:  # nothing blocked: this is the base run
            values[i] = base_values
            kls[i] = 0.0
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
            mask = on[:, None, None, None, None] & edge[None]  # [k, batch, head, q, k_pos]

            def hook(scores: Tensor, hook, mask=mask, k=k) -> Tensor:
                v = scores.reshape(k, batch, *scores.shape[1:])
                return v.masked_fill(mask, float("-inf")).reshape(scores.shape)

            hooks.append((Node(layer, Site.ATTN_SCORES).hook_name, hook))
        resid = base[resid_pre_name(first)].repeat(k, 1, 1)
        logits = forward_from(model, resid, first, None if read is None else read.repeat(k, 1), hooks,
                              inputs=inputs)
        logits = logits.reshape(k, batch, *logits.shape[1:])
        for j, i in enumerate(chunk):
            out = logits[j]
            if read is None:
                v = metric(out, p)
                knocked_at = out[rows_ix, at_ix.to(out.device)]
            else:
                v = metric.read(out[:, :-1], p)  # type: ignore[union-attr]
                knocked_at = out[:, -1]
            values[i] = check_per_example(v, batch, "metric").detach().to("cpu", torch.float64)
            kls[i] = _kl(base_at, knocked_at).cpu()
    values = values.masked_fill(~valid[None], float("nan"))
    kls = kls.masked_fill(~valid[None], float("nan"))
    return KnockoutResult(detach(values), detach(kls), starts, end, _label(at), _label(sources),
                          None if heads is None else tuple(heads), base_values, alpha=alpha, n_boot=n_boot,
                          path=inputs.path)
