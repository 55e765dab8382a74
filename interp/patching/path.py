"""Path patching: the effect of senders on receivers along the direct residual path only.

Path patching (Wang et al. 2022, IOI; Goldowsky-Dill et al. 2023): the sender's output takes its
value from the other run, and the change reaches the receivers along the direct residual path
only, with every other path frozen at its base value — no attention head or MLP in between
recomputes. (Wang et al. let MLPs recompute; here everything is frozen, which is the
Goldowsky-Dill direct path and what makes the route class well defined.) Receivers are a head's
query input (Site.Q, per head), a KV group's key or value input (Site.K / Site.V), or the logits.

Because everything between sender and receiver is frozen, the receiver's residual input equals
the base run's `resid_pre[receiver layer]` plus the sender's change (for a head: its change of
z times W_O) at the sender's positions. That input is normalised with the receiver layer's ln1
and projected with the head's W_Q/W_K/W_V; the forward pass then starts at the receiver layer
with those q/k/v written in (run 3 of Wang et al.).

Route classes (the two highways of DESIGN.md). A sender at position i changes the residual at
position i; a receiver K/V at position i is read sideways by later queries:
- ``stream="residual"``: the change stays at position i — only the query at i itself reads the
  patched key/value (and Q receivers or the logits at i read it directly);
- ``stream="kv"``: "up at i, then right" — only later queries (``reader``, default every position
  after i) read the patched key/value; the query at i sees the base values;
- ``stream="any"``: every query reads it.
The restriction is exact per (query, key) edge: query q of a head reads a K/V receiver's patched
key (value) at position k only when q is one of that receiver's readers; every other edge — the
same query reading another key, or another query reading this key — sees the base key (value).
Receivers at several positions each keep their own readers.
Positions (of senders, receivers and readers) are ints in prompt coordinates, span names or
per-example tensors (`interp.patching.At`), so one call covers a padded batch of prompts whose
named positions differ: each example gets its own value (`.per_example`). It is done at the receiver layer's
attention (`interp.patching.engine.EdgeEdit`): a per-(q, k) choice between the patched and the
base score before the softmax, and between the patched and the base value in pattern . V, per
head (a KV group's receiver is read through every head of the group).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from interp.arch import Arch
from interp.graph import Node, Site
from interp.metrics import Metric, ReadMetric, as_metric, check_per_example
from interp.patching.engine import (
    DEFAULT_ROWS,
    At,
    Direction,
    EdgeEdit,
    Edit,
    Place,
    PosSpec,
    Runs,
    as_at,
    check_direction,
    check_prompts,
    check_rows,
    final_logits,
    heads_at,
    place_mask,
    positional,
    positions_mask,
    prepare,
    read_index,
    resid_pre_name,
    run_copies,
    validate_node,
)
from interp.patching.results import PatchResult, detach
from interp.patching.sweep import CorruptLike, MetricArg, PromptsLike, corrupt_arg
from interp.prompts import Prompts
from interp.tl import HookedTransformer, simple_attn_linear

Stream = Literal["any", "residual", "kv"]

SENDER_SITES = (Site.HEAD, Site.ATTN_OUT, Site.MLP_OUT, Site.RESID_PRE, Site.RESID_MID, Site.RESID_POST)
RECEIVER_SITES = (Site.Q, Site.K, Site.V)

Senders = Place | Sequence[Place | Sequence[Place]]
Receivers = Place | Sequence[Place] | Literal["logits"]
Reader = PosSpec | Sequence[int | str]


def _written_at(node: At) -> int:
    """The first layer whose resid_pre contains this sender's output."""
    return node.layer if node.site == Site.RESID_PRE else node.layer + 1


def _sender_groups(senders: Senders) -> list[tuple[At, ...]]:
    items = [senders] if isinstance(senders, (Node, At)) else list(senders)  # type: ignore[arg-type]
    groups = []
    for item in items:
        group = (item,) if isinstance(item, (Node, At)) else tuple(item)
        if not group or not all(isinstance(n, (Node, At)) for n in group):
            raise ValueError(f"senders: expected Nodes or groups (sequences) of Nodes, got {item!r}")
        groups.append(tuple(as_at(n) for n in group))
    if not groups:
        raise ValueError("senders: expected at least one sender, got none")
    return groups


def _delta(model: HookedTransformer, node: At, base: dict[str, Tensor], source: dict[str, Tensor],
           prompts: Prompts) -> tuple[Tensor, Tensor]:
    """The sender's change of the residual stream [batch pos d_model], and the examples that have
    its position."""
    site: Site = node.site  # type: ignore[assignment]
    name = node.hook_name
    diff = source[name] - base[name]
    width = prompts.tokens.shape[1]
    mask, valid = place_mask(model, node, prompts, width)
    mask = mask.to(diff.dtype)
    if site == Site.HEAD:
        w_o = model.blocks[node.layer].attn.W_O  # [head d_head d_model]
        return torch.einsum("bphd,bph,hdm->bpm", diff, mask, w_o.to(diff.dtype)), valid
    return diff * mask[..., None], valid


def _projection(model: HookedTransformer, layer: int, site: Site) -> tuple[Tensor, Tensor]:
    attn = model.blocks[layer].attn
    if site == Site.Q:
        return attn.W_Q, attn.b_Q
    grouped = hasattr(attn, "_W_K") and not getattr(model.cfg, "ungroup_grouped_query_attention", False)
    if site == Site.K:
        return (attn._W_K, attn._b_K) if grouped else (attn.W_K, attn.b_K)
    return (attn._W_V, attn._b_V) if grouped else (attn.W_V, attn.b_V)


def _reader_mask(reader: Reader, prompts: Prompts, width: int) -> tuple[Tensor, Tensor] | None:
    """[batch, q_pos] the queries given as readers (union of ints / names / tensors), and the
    examples that have them all."""
    if reader is None:
        return None
    items = [reader] if isinstance(reader, (int, str, Tensor)) else list(reader)
    if not items:
        raise ValueError("reader: expected at least one query position, got none")
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    valid = torch.ones(len(prompts), dtype=torch.bool)
    for p in items:
        if isinstance(p, int) and not isinstance(p, bool) and not -width <= p < width:
            raise ValueError(f"reader: expected query positions in [0, {width}), got {p!r}")
        m, v = positions_mask(p, prompts, width, "reader")
        mask |= m
        valid &= v
    return mask, valid


@dataclass(frozen=True)
class Path:
    """One path-patching request for `path_patch_many`: senders (a node, or groups of nodes patched
    together: one result row per group), receivers (nodes or "logits"), the route class `stream`
    and the `reader` queries, as in `path_patch`; `label` names its rows (default: the receivers)."""

    senders: Senders
    receivers: Receivers
    stream: Stream = "any"
    reader: Reader = None
    label: str | None = None


@dataclass(frozen=True)
class _Plan:
    groups: list[tuple[At, ...]]
    recv: list[At]
    to_logits: bool
    recv_layer: int
    restrict: bool
    stream: Stream
    reader: Reader
    names: set[str]
    site_label: str


def _plan(model: HookedTransformer, width: int, spec: Path) -> _Plan:
    """Validate one request against the model and name the hooks its runs must cache."""
    arch = Arch.of(model)
    stream, reader, receivers = spec.stream, spec.reader, spec.receivers
    if stream not in ("any", "residual", "kv"):
        raise ValueError(f"stream: expected 'any', 'residual' or 'kv', got {stream!r}")
    groups = _sender_groups(spec.senders)
    for group in groups:
        for n in group:
            validate_node(model, n, width)
            if n.site not in SENDER_SITES:
                raise ValueError(f"sender {n}: expected a site in {[s.value for s in SENDER_SITES]}, "
                                 f"got {n.site.value!r}")  # type: ignore[union-attr]
    to_logits = isinstance(receivers, str)
    if to_logits:
        if receivers != "logits":
            raise ValueError(f"receivers: expected Nodes or 'logits', got {receivers!r}")
        if stream == "kv":
            raise ValueError("stream: expected 'any' or 'residual' for the logits receiver (the "
                             "logits read the residual directly), got 'kv'")
        if reader is not None:
            raise ValueError("reader: expected None for the logits receiver, got a reader")
        recv: list[At] = []
        recv_layer = arch.n_layers
    else:
        items = [receivers] if isinstance(receivers, (Node, At)) else list(receivers)  # type: ignore[arg-type]
        if not items:
            raise ValueError("receivers: expected at least one receiver Node, got none")
        for r in items:
            if not isinstance(r, (Node, At)):
                raise ValueError(f"receivers: expected Nodes, got {r!r}")
            validate_node(model, r, width)
            if r.site not in RECEIVER_SITES:
                raise ValueError(f"receiver {r}: expected a site in {[s.value for s in RECEIVER_SITES]} "
                                 f"(a head's q input or a KV group's k/v input) or 'logits', got "
                                 f"{r.site.value!r}")  # type: ignore[union-attr]
        recv = [as_at(r) for r in items]
        layers = {r.layer for r in recv}
        recv_layer = min(layers)
        kv_recv = [r for r in recv if r.site in (Site.K, Site.V)]
        if stream != "any" or reader is not None:
            if len(layers) > 1:
                raise ValueError(f"receivers: expected one layer when restricting the readers "
                                 f"(stream={stream!r}), got layers {sorted(layers)}")
            if stream == "kv" and not kv_recv:
                raise ValueError("stream='kv': expected K or V receivers (a query input is read "
                                 "at its own position), got only Q receivers")
            if stream == "residual" and reader is not None:
                raise ValueError("reader: expected None with stream='residual' (the key's own "
                                 "position reads it), got a reader")
            if kv_recv and len(kv_recv) < len(recv):
                raise ValueError("receivers: expected only K/V receivers when restricting their "
                                 "readers (restoring non-reading queries would undo a Q patch), "
                                 "got a mix of Q and K/V receivers; path-patch them separately")
            for r in kv_recv:
                if r.pos is None:
                    raise ValueError(f"receiver {r}: expected a position when restricting readers "
                                     f"(stream={stream!r}), got pos=None")
    for group in groups:
        for n in group:
            if _written_at(n) > recv_layer:
                raise ValueError(f"sender {n}: expected it below every receiver (its output enters "
                                 f"resid_pre[{_written_at(n)}]), got a receiver at layer {recv_layer}")
    names = {n.hook_name for g in groups for n in g}
    names |= {resid_pre_name(r.layer) for r in recv}
    restrict = (stream != "any" or reader is not None) and not to_logits
    if to_logits:
        names.add(Node(arch.n_layers - 1, Site.RESID_POST).hook_name)
    if restrict:  # the base scores and values that non-reading edges see
        names |= {Node(recv_layer, Site.ATTN_SCORES).hook_name, Node(recv_layer, Site.V).hook_name}
    route = "logits" if to_logits else ", ".join(str(r) for r in recv)
    return _Plan(groups, recv, to_logits, recv_layer, restrict, stream, reader, names,
                 spec.label or f"path -> {route} ({stream})")


def _deltas(model: HookedTransformer, runs: Runs, plan: _Plan) -> list[tuple[dict[int, Tensor], Tensor]]:
    """Per sender group: its change of the residual by the layer it enters, and its valid examples."""
    out = []
    with torch.inference_mode():
        for g in plan.groups:
            by_layer: dict[int, Tensor] = {}
            ok = torch.ones(len(runs.prompts), dtype=torch.bool)
            for n in g:
                d, v = _delta(model, n, runs.base, runs.source, runs.prompts)
                w = _written_at(n)
                by_layer[w] = by_layer[w] + d if w in by_layer else d
                ok &= v
            out.append((by_layer, ok))
    return out


def _total(by_layer: dict[int, Tensor], layer: int) -> Tensor | int:
    return sum((d for w, d in by_layer.items() if w <= layer), 0)


def _logits_values(model: HookedTransformer, runs: Runs, plan: _Plan, metric: Metric, rows: int) -> Tensor:
    """[groups, batch]: the metric with each group's change added to the final residual."""
    arch = Arch.of(model)
    clean = runs.prompts
    batch = len(clean)
    index = read_index(metric, clean)
    base_final = runs.base[Node(arch.n_layers - 1, Site.RESID_POST).hook_name]
    deltas = _deltas(model, runs, plan)
    values = torch.empty(len(deltas), batch, dtype=torch.float64)
    per_chunk = max(1, rows // batch)
    with torch.inference_mode():
        for lo in range(0, len(deltas), per_chunk):
            chunk = range(lo, min(lo + per_chunk, len(deltas)))
            resid = torch.cat([base_final + _total(deltas[i][0], arch.n_layers) for i in chunk])
            rep = None if index is None else index.repeat(len(chunk), 1)
            logits = final_logits(model, resid, rep)
            logits = logits.reshape(len(chunk), batch, *logits.shape[1:])
            for j, i in enumerate(chunk):
                v = (metric.read(logits[j], clean) if isinstance(metric, ReadMetric)
                     else metric(logits[j], clean))
                values[i] = check_per_example(v, batch, "metric").detach().to("cpu", torch.float64)
    valid = torch.stack([ok for _, ok in deltas])
    return values.masked_fill(~valid, float("nan"))


def _copies(model: HookedTransformer, runs: Runs, plan: _Plan) -> list[list[Edit | EdgeEdit]]:
    """One copy per sender group: the receivers' q/k/v computed from the patched residual (and,
    when the readers are restricted, the per-(query, key) choice at the receiver layer)."""
    clean = runs.prompts
    batch, width = clean.tokens.shape
    recv_masks = [place_mask(model, r, clean, width) for r in plan.recv]
    readers = _reader_mask(plan.reader, clean, width) if plan.restrict else None
    reader_ok = torch.ones(batch, dtype=torch.bool) if readers is None else readers[1]
    copies: list[list[Edit | EdgeEdit]] = []
    with torch.inference_mode():
        for by_layer, ok in _deltas(model, runs, plan):
            edits: list[Edit | EdgeEdit] = []
            cache: dict[tuple[int, Site], Tensor] = {}
            for r, (mask, r_ok) in zip(plan.recv, recv_masks, strict=True):
                site: Site = r.site  # type: ignore[assignment]
                key = (r.layer, site)
                if key not in cache:
                    resid = runs.base[resid_pre_name(r.layer)] + _total(by_layer, r.layer)
                    x = model.blocks[r.layer].ln1(resid)
                    w, b = _projection(model, r.layer, site)
                    cache[key] = simple_attn_linear(x, w, b)
                edits.append(Edit(r.layer, r.hook_name, mask, cache[key], ok & r_ok & reader_ok))
            copies.append(edits)
    if plan.restrict:
        layer = plan.recv_layer
        k_edges, v_edges = _edges(model, plan.recv, plan.stream, None if readers is None else readers[0],
                                  clean, width)
        choice = EdgeEdit(
            layer, k_edges, v_edges,
            runs.base[Node(layer, Site.ATTN_SCORES).hook_name] if k_edges is not None else None,
            runs.base[Node(layer, Site.V).hook_name] if v_edges is not None else None)
        copies = [c + [choice] for c in copies]
    return copies


def _run(model: HookedTransformer, prompts: PromptsLike, metric: Metric, specs: Sequence[Path],
         corrupt: CorruptLike | None, direction: Direction, rows: int
         ) -> tuple[Runs, list[_Plan], list[Tensor]]:
    """Plan every request, run clean and corrupted once, then every copy of every request in one
    batched driver; per request a [groups, batch] tensor."""
    direction = check_direction(direction)
    check_rows(rows)
    clean, bad = check_prompts(model, prompts, corrupt)  # type: ignore[arg-type]
    width = clean.tokens.shape[1]
    plans = [_plan(model, width, spec) for spec in specs]
    runs = prepare(model, clean, bad, metric, set().union(*(p.names for p in plans)), direction)
    out: list[Tensor | None] = [None] * len(plans)
    copies: list[list[Edit | EdgeEdit]] = []
    labels: list[str] = []
    owner: list[int] = []
    for i, plan in enumerate(plans):
        if plan.to_logits:
            out[i] = _logits_values(model, runs, plan, metric, rows)
            continue
        mine = _copies(model, runs, plan)
        copies += mine
        labels += [f"{plan.site_label}: " + " + ".join(str(n) for n in g) for g in plan.groups]
        owner += [i] * len(mine)
    if copies:
        values = run_copies(model, runs, copies, metric, rows=rows, desc="path patching", labels=labels)
        who = torch.tensor(owner)
        for i in range(len(plans)):
            if out[i] is None:
                out[i] = values[who == i]
    return runs, plans, out  # type: ignore[return-value]


def path_patch(
    model: HookedTransformer,
    prompts: PromptsLike,
    metric: MetricArg,
    *args: object,
    senders: Senders | None = None,
    receivers: Receivers | None = None,
    corrupt: CorruptLike | None = None,
    stream: Stream = "any",
    reader: Reader = None,
    direction: Direction = "denoising",
    rows: int = DEFAULT_ROWS,
    alpha: float = 0.05,
    n_boot: int = 1000,
) -> PatchResult:
    """Path-patch each sender (or group of senders) into the receivers; one value per sender and
    example (`.per_example` [sender, n]; `.values` the mean over examples).

    senders: nodes (`Node`, or `At` at named / per-example positions) with sites head (hook_z,
    per head), attn_out, mlp_out, resid_pre/mid/post; a nested sequence patches its nodes
    together. receivers: Q nodes (per head), K/V nodes (per KV group under grouped-query
    attention), all at positions, or "logits". `stream` and `reader` (query positions: ints,
    span names such as "last", or per-example tensors) restrict which queries read patched K/V
    receivers (module docstring). The corrupted run is `prompts.partner` or `corrupt=`; the old
    order ``path_patch(model, clean, corrupt, metric, senders, receivers)`` still works. Many
    requests on the same prompts: `path_patch_many` runs clean and corrupted once for all.
    """
    legacy, metric, got = positional("path_patch", metric, args, {"senders": senders, "receivers": receivers})
    corrupt = corrupt_arg("path_patch", corrupt, legacy)  # type: ignore[assignment]
    senders, receivers = got["senders"], got["receivers"]  # type: ignore[assignment]
    if senders is None or receivers is None:
        raise TypeError("path_patch: expected senders and receivers (positionally after the metric, or "
                        "senders=/receivers=), got none")
    metric = as_metric(metric)
    runs, (plan,), (values,) = _run(model, prompts, metric, [Path(senders, receivers, stream, reader)],
                                    corrupt, direction, rows)
    labels = tuple(" + ".join(str(n) for n in g) for g in plan.groups)
    return PatchResult(detach(values), ("sender",), (labels,), plan.site_label, direction,
                       runs.clean_values, runs.corrupt_values, method="path patching", alpha=alpha, n_boot=n_boot)


def path_patch_many(
    model: HookedTransformer,
    prompts: PromptsLike,
    metric: MetricArg,
    paths: Sequence[Path],
    *,
    corrupt: CorruptLike | None = None,
    direction: Direction = "denoising",
    rows: int = DEFAULT_ROWS,
    alpha: float = 0.05,
    n_boot: int = 1000,
) -> PatchResult:
    """`path_patch` for many requests at once: the clean and corrupted runs happen once, and the
    patched copies of every request share the batched forwards. One row per (request, sender
    group), axis "path" labelled ``"<label>: <senders>"``; each row equals the `path_patch` call
    of its request."""
    metric = as_metric(metric)
    specs = list(paths)
    if not specs or not all(isinstance(p, Path) for p in specs):
        raise ValueError(f"paths: expected a non-empty sequence of interp.patching.Path, got {paths!r}")
    runs, plans, values = _run(model, prompts, metric, specs, corrupt, direction, rows)
    labels = tuple(f"{plan.site_label}: " + " + ".join(str(n) for n in g) for plan in plans for g in plan.groups)
    return PatchResult(detach(torch.cat(values)), ("path",), (labels,), "path", direction,
                       runs.clean_values, runs.corrupt_values, method="path patching", alpha=alpha, n_boot=n_boot)


def _edges(model: HookedTransformer, recv: list[At], stream: Stream, reader: Tensor | None,
           prompts: Prompts, width: int) -> tuple[Tensor | None, Tensor | None]:
    """[batch head q_pos k_pos] masks of the (query, key) edges that read the patched keys and the
    patched values (None: no K, resp. V, receiver). Each receiver adds, in each example, the
    edges from its own readers to its positions, on every head of its KV group."""
    arch = Arch.of(model)
    group_size = arch.n_heads // heads_at(model, Site.K)
    b = len(prompts)
    ar = torch.arange(width)
    q_ix, k_ix = ar[None, :, None], ar[None, None, :]
    real_q = (ar[None] < prompts.lengths.cpu()[:, None])[:, :, None]  # [batch, q, 1]
    masks: dict[Site, Tensor] = {}
    for r in recv:
        site: Site = r.site  # type: ignore[assignment]
        if site == Site.Q:  # a query input is read at its own position only
            continue
        heads = (slice(None) if r.head is None
                 else slice(r.head * group_size, (r.head + 1) * group_size))
        key, _ = positions_mask(r.pos, prompts, width, f"receiver {r} position")
        key = key[:, None, :]  # [batch, 1, k]
        if stream == "residual":
            edges = key & (q_ix == k_ix)
        elif reader is not None:
            early = reader[:, :, None] & key & (q_ix < k_ix)
            if bool(early.any()):
                i, q, k = (int(x) for x in torch.nonzero(early)[0])
                raise ValueError(f"reader: expected query positions >= the key position {k} (causal "
                                 f"attention), got {q} in prompt {i}")
            edges = reader[:, :, None] & key
        else:  # stream == "kv": every later query of the prompt
            edges = key & (q_ix > k_ix) & real_q
        mask = masks.setdefault(site, torch.zeros((b, arch.n_heads, width, width), dtype=torch.bool))
        mask[:, heads] |= edges[:, None]
    device = model.cfg.device
    out = [masks.get(s) for s in (Site.K, Site.V)]
    return tuple(None if m is None else m.to(device) for m in out)  # type: ignore[return-value]
