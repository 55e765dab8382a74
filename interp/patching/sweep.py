"""Activation patching sweeps over layer x position (x head) at one site, and single patches.

Activation patching (Meng et al. 2022; Zhang & Nanda 2024; Heimersheim & Nanda 2024): run the
model on a clean and a corrupted prompt of the same length, replace one activation of one run
with its value from the other, and read a metric off the logits. `sweep` does this for every
(layer, position[, head]) of a site and returns the same numbers as TransformerLens's
`get_act_patch_*` functions (`get_act_patch_resid_pre`, `get_act_patch_attn_head_out_by_pos`,
...), computed in batched forwards that start at the patched layer (see `engine`).

Sites: resid_pre, resid_mid, resid_post, attn_out, mlp_out (axes layer x pos); head (each head's
output, hook_z), q (per head), k and v (per KV group under grouped-query attention) (axes
layer x pos x head).
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.arch import Arch
from interp.graph import Node, Site, parse_site
from interp.patching.engine import (
    DEFAULT_ROWS,
    Direction,
    check_direction,
    check_pair,
    chunk_hooks,
    forward_from,
    heads_at,
    merge_edits,
    node_edit,
    prepare,
    resid_pre_name,
    run_copies,
    validate_node,
)
from interp.patching.metrics import Metric
from interp.patching.results import PatchResult, detach
from interp.tokens import Batch

SWEEP_SITES = (Site.RESID_PRE, Site.RESID_MID, Site.RESID_POST, Site.ATTN_OUT, Site.MLP_OUT,
               Site.HEAD, Site.Q, Site.K, Site.V)


def _axis(values: Sequence[int] | None, size: int, what: str) -> tuple[int, ...]:
    if values is None:
        return tuple(range(size))
    out = []
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not -size <= v < size:
            raise ValueError(f"{what}: expected ints in [0, {size}), got {v!r}")
        out.append(v % size)
    if not out:
        raise ValueError(f"{what}: expected at least one index, got none")
    return tuple(out)


def sweep(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"] | Batch,
    corrupt_tokens: Int[Tensor, "_batch _pos"] | Batch,  # checked against clean_tokens with a clear error
    metric: Metric,
    site: Site | str = "resid_pre",
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    direction: Direction = "denoising",
    rows: int = DEFAULT_ROWS,
    progress: bool = False,
) -> PatchResult:
    """Patch every (layer, position[, head]) of `site` separately; the metric after each patch.

    Denoising patches the clean value into the corrupted run; noising the reverse. `heads`
    index heads (KV groups for k and v on grouped-query models). `rows` bounds the rows
    (examples x patched copies) of one forward pass, and so the memory. Tokens are unpadded
    prompts of one length: a raw tensor is taken as such (pad cannot be told from a token), a
    padded `interp.tokens.Batch` is refused. NaN/Inf in the runs or in a patched cell raises.
    """
    site = parse_site(site)
    if site not in SWEEP_SITES:
        raise ValueError(f"sweep site: expected one of {[s.value for s in SWEEP_SITES]}, got {site.value!r}")
    direction = check_direction(direction)
    arch = Arch.of(model)
    clean_tokens, corrupt_tokens = check_pair(model, clean_tokens, corrupt_tokens)
    seq_len = clean_tokens.shape[1]
    layer_ix = _axis(layers, arch.n_layers, "layers")
    pos_ix = _axis(positions, seq_len, "positions")
    if site.per_head:
        n_h = heads_at(model, site)
        kind = "KV group" if site.per_kv_group and n_h < arch.n_heads else "head"
        if heads is not None:
            for h in heads:
                if not isinstance(h, int) or not 0 <= h < n_h:
                    raise ValueError(f"heads: expected {kind} indices in [0, {n_h}), got {h!r}")
        head_ix = _axis(heads, n_h, "heads")
    elif heads is not None:
        raise ValueError(f"heads: site {site.value!r} has no heads, got heads={list(heads)}")
    nodes: list[Node] = []
    for layer in layer_ix:
        for p in pos_ix:
            if site.per_head:
                nodes += [Node(layer, site, pos=p, head=h) for h in head_ix]
            else:
                nodes.append(Node(layer, site, pos=p))
    for n in nodes[:1] + nodes[-1:]:
        validate_node(model, n, seq_len)
    hook_names = {n.hook_name for n in nodes}
    runs = prepare(model, clean_tokens, corrupt_tokens, metric, hook_names, direction)
    copies = [[node_edit(model, n, runs.source, seq_len)] for n in nodes]
    values = run_copies(model, runs, copies, metric, rows=rows, progress=progress,
                        desc=f"patching {site.value}", labels=nodes)
    if site.per_head:
        axes = ("layer", "pos", "kv_head" if site.per_kv_group and arch.grouped else "head")
        coords: tuple[tuple, ...] = (layer_ix, pos_ix, head_ix)
    else:
        axes, coords = ("layer", "pos"), (layer_ix, pos_ix)
    shape = tuple(len(c) for c in coords)
    return PatchResult(detach(values).reshape(shape), axes, coords, site.value, direction,
                       runs.clean_metric, runs.corrupt_metric)


def _as_nodes(nodes: Node | Sequence[Node]) -> list[Node]:
    out = [nodes] if isinstance(nodes, Node) else list(nodes)
    if not out or not all(isinstance(n, Node) for n in out):
        raise ValueError(f"nodes: expected a Node or a non-empty sequence of Nodes, got {nodes!r}")
    return out


def patch(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"] | Batch,
    corrupt_tokens: Int[Tensor, "_batch _pos"] | Batch,  # checked against clean_tokens with a clear error
    metric: Metric,
    nodes: Node | Sequence[Node],
    *,
    direction: Direction = "denoising",
) -> PatchResult:
    """Patch all `nodes` at once (one forward pass); a one-cell result."""
    node_list = _as_nodes(nodes)
    clean_tokens, corrupt_tokens = check_pair(model, clean_tokens, corrupt_tokens)
    seq_len = clean_tokens.shape[1]
    node_list = [validate_node(model, n, seq_len) for n in node_list]
    runs = prepare(model, clean_tokens, corrupt_tokens, metric, {n.hook_name for n in node_list}, direction)
    edits = [node_edit(model, n, runs.source, seq_len) for n in node_list]
    values = run_copies(model, runs, [edits], metric)
    label = " + ".join(str(n) for n in node_list)
    sites = ",".join(sorted({n.site.value for n in node_list}))  # type: ignore[union-attr]
    return PatchResult(detach(values), ("patch",), ((label,),), sites, direction,
                       runs.clean_metric, runs.corrupt_metric)


def patched_logits(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"] | Batch,
    corrupt_tokens: Int[Tensor, "_batch _pos"] | Batch,  # checked against clean_tokens with a clear error
    nodes: Node | Sequence[Node],
    *,
    direction: Direction = "denoising",
) -> Float[Tensor, "batch pos d_vocab"]:
    """The full logits of the base run with all `nodes` patched from the source run."""
    node_list = _as_nodes(nodes)
    clean_tokens, corrupt_tokens = check_pair(model, clean_tokens, corrupt_tokens)
    seq_len = clean_tokens.shape[1]
    node_list = [validate_node(model, n, seq_len) for n in node_list]
    runs = prepare(model, clean_tokens, corrupt_tokens, None, {n.hook_name for n in node_list}, direction,
                   kv=False)
    edits = [node_edit(model, n, runs.source, seq_len) for n in node_list]
    hooks = chunk_hooks([merge_edits(edits)], clean_tokens.shape[0])
    start = min(e.layer for e in edits)
    return forward_from(model, runs.base[resid_pre_name(start)].clone(), start, None, hooks)
