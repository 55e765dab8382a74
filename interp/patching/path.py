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
Receivers at several positions each keep their own readers. It is done at the receiver layer's
attention (`interp.patching.engine.EdgeEdit`): a per-(q, k) choice between the patched and the
base score before the softmax, and between the patched and the base value in pattern . V, per
head (a KV group's receiver is read through every head of the group).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.utilities.attention import simple_attn_linear

from interp.arch import Arch
from interp.graph import Node, Site
from interp.patching.engine import (
    DEFAULT_ROWS,
    Direction,
    EdgeEdit,
    Edit,
    check_direction,
    check_pair,
    check_rows,
    final_logits,
    heads_at,
    node_mask,
    prepare,
    resid_pre_name,
    run_copies,
    validate_node,
)
from interp.patching.metrics import Metric, evaluate, metric_positions
from interp.patching.results import PatchResult, detach

Stream = Literal["any", "residual", "kv"]

SENDER_SITES = (Site.HEAD, Site.ATTN_OUT, Site.MLP_OUT, Site.RESID_PRE, Site.RESID_MID, Site.RESID_POST)
RECEIVER_SITES = (Site.Q, Site.K, Site.V)


def _written_at(node: Node) -> int:
    """The first layer whose resid_pre contains this sender's output."""
    return node.layer if node.site == Site.RESID_PRE else node.layer + 1


def _sender_groups(senders: Node | Sequence[Node | Sequence[Node]]) -> list[tuple[Node, ...]]:
    items = [senders] if isinstance(senders, Node) else list(senders)
    groups = []
    for item in items:
        group = (item,) if isinstance(item, Node) else tuple(item)
        if not group or not all(isinstance(n, Node) for n in group):
            raise ValueError(f"senders: expected Nodes or groups (sequences) of Nodes, got {item!r}")
        groups.append(group)
    if not groups:
        raise ValueError("senders: expected at least one sender, got none")
    return groups


def _delta(model: HookedTransformer, node: Node, base: dict[str, Tensor], source: dict[str, Tensor],
           seq_len: int) -> Tensor:
    """The sender's change of the residual stream: [batch pos d_model]."""
    site: Site = node.site  # type: ignore[assignment]
    name = node.hook_name
    diff = source[name] - base[name]
    mask = node_mask(node, seq_len, model.cfg.n_heads, diff.device).to(diff.dtype)
    if site == Site.HEAD:
        w_o = model.blocks[node.layer].attn.W_O  # [head d_head d_model]
        return torch.einsum("bphd,ph,hdm->bpm", diff, mask, w_o.to(diff.dtype))
    return diff * mask[None, :, None]


def _projection(model: HookedTransformer, layer: int, site: Site) -> tuple[Tensor, Tensor]:
    attn = model.blocks[layer].attn
    if site == Site.Q:
        return attn.W_Q, attn.b_Q
    grouped = hasattr(attn, "_W_K") and not getattr(model.cfg, "ungroup_grouped_query_attention", False)
    if site == Site.K:
        return (attn._W_K, attn._b_K) if grouped else (attn.W_K, attn.b_K)
    return (attn._W_V, attn._b_V) if grouped else (attn.W_V, attn.b_V)


def path_patch(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupt_tokens: Int[Tensor, "_batch _pos"],  # checked against clean_tokens with a clear error
    metric: Metric,
    senders: Node | Sequence[Node | Sequence[Node]],
    receivers: Node | Sequence[Node] | Literal["logits"],
    *,
    stream: Stream = "any",
    reader: Sequence[int] | None = None,
    direction: Direction = "denoising",
    rows: int = DEFAULT_ROWS,
) -> PatchResult:
    """Path-patch each sender (or group of senders) into the receivers; one value per sender.

    senders: nodes with sites head (hook_z, per head), attn_out, mlp_out, resid_pre/mid/post;
    a nested sequence patches its nodes together. receivers: Q nodes (per head), K/V nodes
    (per KV group under grouped-query attention), all at positions, or "logits". `stream` and
    `reader` restrict which queries read patched K/V receivers (module docstring).
    """
    direction = check_direction(direction)
    check_rows(rows)
    if stream not in ("any", "residual", "kv"):
        raise ValueError(f"stream: expected 'any', 'residual' or 'kv', got {stream!r}")
    arch = Arch.of(model)
    clean_tokens, corrupt_tokens = check_pair(model, clean_tokens, corrupt_tokens)
    seq_len = clean_tokens.shape[1]
    groups = _sender_groups(senders)
    for group in groups:
        for n in group:
            validate_node(model, n, seq_len)
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
        recv: list[Node] = []
        recv_layer = arch.n_layers
    else:
        recv = [receivers] if isinstance(receivers, Node) else list(receivers)
        if not recv:
            raise ValueError("receivers: expected at least one receiver Node, got none")
        for r in recv:
            if not isinstance(r, Node):
                raise ValueError(f"receivers: expected Nodes, got {r!r}")
            validate_node(model, r, seq_len)
            if r.site not in RECEIVER_SITES:
                raise ValueError(f"receiver {r}: expected a site in {[s.value for s in RECEIVER_SITES]} "
                                 f"(a head's q input or a KV group's k/v input) or 'logits', got "
                                 f"{r.site.value!r}")  # type: ignore[union-attr]
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
    final_name = Node(arch.n_layers - 1, Site.RESID_POST).hook_name
    restrict = (stream != "any" or reader is not None) and not to_logits
    if to_logits:
        names.add(final_name)
    if restrict:  # the base scores and values that non-reading edges see
        names |= {Node(recv_layer, Site.ATTN_SCORES).hook_name, Node(recv_layer, Site.V).hook_name}
    runs = prepare(model, clean_tokens, corrupt_tokens, metric, names, direction)
    labels = tuple(" + ".join(str(n) for n in g) for g in groups)
    route = "logits" if to_logits else ", ".join(str(r) for r in recv)
    site_label = f"path -> {route} ({stream})"

    deltas = []
    with torch.inference_mode():
        for g in groups:
            d = _delta(model, g[0], runs.base, runs.source, seq_len)
            by_layer = {_written_at(g[0]): d}
            for n in g[1:]:
                w = _written_at(n)
                by_layer[w] = by_layer.get(w, 0) + _delta(model, n, runs.base, runs.source, seq_len)
            deltas.append(by_layer)

    def total(by_layer: dict[int, Tensor], layer: int) -> Tensor | int:
        return sum((d for w, d in by_layer.items() if w <= layer), 0)

    if to_logits:
        positions = metric_positions(metric, seq_len)
        base_final = runs.base[final_name]
        values = torch.empty(len(groups), dtype=torch.float64)
        per_chunk = max(1, rows // base_final.shape[0])
        with torch.inference_mode():
            for lo in range(0, len(groups), per_chunk):
                chunk = range(lo, min(lo + per_chunk, len(groups)))
                resid = torch.cat([base_final + total(deltas[i], arch.n_layers) for i in chunk])
                logits = final_logits(model, resid, positions)
                logits = logits.reshape(len(chunk), base_final.shape[0], *logits.shape[1:])
                for j, i in enumerate(chunk):
                    values[i] = float(evaluate(metric, logits[j], positions))
        return PatchResult(detach(values), ("sender",), (labels,), site_label, direction,
                           runs.clean_metric, runs.corrupt_metric, method="path patching")

    # receiver inputs for each sender group: q/k/v computed from the patched residual
    copies = []
    with torch.inference_mode():
        for by_layer in deltas:
            edits = []
            cache: dict[tuple[int, Site], Tensor] = {}
            for r in recv:
                site: Site = r.site  # type: ignore[assignment]
                key = (r.layer, site)
                if key not in cache:
                    resid = runs.base[resid_pre_name(r.layer)] + total(by_layer, r.layer)
                    x = model.blocks[r.layer].ln1(resid)
                    w, b = _projection(model, r.layer, site)
                    cache[key] = simple_attn_linear(x, w, b)
                mask = node_mask(r, seq_len, heads_at(model, site), model.cfg.device)
                edits.append(Edit(r.layer, r.hook_name, mask, cache[key]))
            copies.append(edits)

    if restrict:
        k_edges, v_edges = _edges(model, recv, stream, reader, seq_len)
        choice = EdgeEdit(
            recv_layer, k_edges, v_edges,
            runs.base[Node(recv_layer, Site.ATTN_SCORES).hook_name] if k_edges is not None else None,
            runs.base[Node(recv_layer, Site.V).hook_name] if v_edges is not None else None)
        copies = [c + [choice] for c in copies]
    values = run_copies(model, runs, copies, metric, rows=rows, desc="path patching")
    return PatchResult(detach(values), ("sender",), (labels,), site_label, direction,
                       runs.clean_metric, runs.corrupt_metric, method="path patching")


def _edges(model: HookedTransformer, recv: list[Node], stream: Stream, reader: Sequence[int] | None,
           seq_len: int) -> tuple[Tensor | None, Tensor | None]:
    """[head q_pos k_pos] masks of the (query, key) edges that read the patched keys and the
    patched values (None: no K, resp. V, receiver). Each receiver adds the edges from its own
    readers to its position, on every head of its KV group."""
    arch = Arch.of(model)
    device = model.cfg.device
    group_size = arch.n_heads // heads_at(model, Site.K)
    rd: list[int] = []
    if reader is not None:
        for p in reader:
            if not isinstance(p, int) or not -seq_len <= p < seq_len:
                raise ValueError(f"reader: expected query positions in [0, {seq_len}), got {p!r}")
            rd.append(p % seq_len)
    masks: dict[Site, Tensor] = {}
    for r in recv:
        site: Site = r.site  # type: ignore[assignment]
        if site == Site.Q:  # a query input is read at its own position only
            continue
        heads = (slice(None) if r.head is None
                 else slice(r.head * group_size, (r.head + 1) * group_size))
        pos = r.pos % seq_len  # type: ignore[operator]
        if stream == "residual":
            readers = [pos]
        elif reader is not None:
            if any(q < pos for q in rd):
                raise ValueError(f"reader: expected query positions >= the key position {pos} "
                                 f"(causal attention), got {sorted(set(rd))}")
            readers = sorted(set(rd))
        else:  # stream == "kv": every later query
            readers = list(range(pos + 1, seq_len))
        mask = masks.setdefault(site, torch.zeros((arch.n_heads, seq_len, seq_len), dtype=torch.bool,
                                                  device=device))
        mask[heads, readers, pos] = True
    return masks.get(Site.K), masks.get(Site.V)
