"""Activation patching sweeps over layer x position (x head) at one site, and single patches.

Activation patching (Meng et al. 2022; Zhang & Nanda 2024; Heimersheim & Nanda 2024): run the
model on a clean and a corrupted prompt of the same length, replace one activation of one run
with its value from the other, and read a metric off the logits. `sweep` does this for every
(layer, position[, head]) of a site, for every example of a padded `Prompts` batch at once, and
keeps one value per example; for prompts of one length and a mean metric its `.values` are the
numbers of TransformerLens's `get_act_patch_*` functions (`get_act_patch_resid_pre`,
`get_act_patch_attn_head_out_by_pos`, ...), computed in batched forwards that start at the
patched layer (see `engine`).

Positions are in prompt coordinates: ints (an example shorter than the cell gets NaN there) or
span names (``"subject"``, ``"last"``: each prompt's own span, patched whole; the axis is
labelled by the name).

Sites: resid_pre, resid_mid, resid_post, attn_out, mlp_out (axes layer x pos); head (each head's
output, hook_z), q (per head), k and v (per KV group under grouped-query attention) (axes
layer x pos x head).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from jaxtyping import Float, Int
from torch import Tensor

from interp.arch import Arch
from interp.graph import Node, Site, parse_site
from interp.patching.engine import (
    DEFAULT_ROWS,
    At,
    Direction,
    Place,
    check_direction,
    check_prompts,
    chunk_hooks,
    cross_edit,
    forward_from,
    heads_at,
    merge_edits,
    named_only,
    node_edit,
    positional,
    prepare,
    resid_pre_name,
    run_copies,
    validate_node,
)
from interp.patching.results import PatchResult, detach
from interp.prompts import Prompts
from interp.tl import HookedTransformer
from interp.tokens import Batch

SWEEP_SITES = (Site.RESID_PRE, Site.RESID_MID, Site.RESID_POST, Site.ATTN_OUT, Site.MLP_OUT,
               Site.HEAD, Site.Q, Site.K, Site.V)

PromptsLike = Prompts | Batch | Int[Tensor, "batch pos"]
CorruptLike = Prompts | Batch | Int[Tensor, "_batch _pos"]  # checked against the prompts with a clear error
MetricArg = Callable | Tensor | Batch  # a metric; a token tensor here is the old (clean, corrupt, metric) order


def corrupt_arg(what: str, given: object, legacy: object) -> object:
    """The corrupted run, given either as `corrupt=` or positionally (the old argument order)."""
    if legacy is not None and given is not None:
        raise TypeError(f"{what}: corrupted tokens given twice (positionally and as corrupt=)")
    return given if legacy is None else legacy


def index_axis(values: Sequence[int] | None, size: int, what: str) -> tuple[int, ...]:
    """Validated indices into an axis of `size` (all of it when None; negative ones wrap)."""
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


def position_axis(positions: Sequence[int | str] | str | None, prompts: Prompts, what: str = "positions"
                  ) -> tuple[int | str, ...]:
    """Sweep positions: ints in prompt coordinates (negative: from each prompt's end, kept as
    given) in [-width, width), or span names of `prompts`; None: 0..width-1 (the longest prompt)."""
    width = prompts.tokens.shape[1]
    if positions is None:
        return tuple(range(width))
    items = [positions] if isinstance(positions, str) else list(positions)
    if not items:
        raise ValueError(f"{what}: expected at least one position, got none")
    out: list[int | str] = []
    for v in items:
        if isinstance(v, str):
            if v not in prompts.spans:
                raise ValueError(f"{what}: expected ints or span names among {sorted(prompts.spans)}, got {v!r}")
            out.append(v)
        elif isinstance(v, int) and not isinstance(v, bool) and -width <= v < width:
            out.append(v)
        else:
            raise ValueError(f"{what}: expected ints in [0, {width}) (prompt coordinates) or span names, got {v!r}")
    return tuple(out)


def sweep(
    model: HookedTransformer,
    prompts: PromptsLike,
    metric: MetricArg,
    *args: object,
    site: Site | str | None = None,
    corrupt: CorruptLike | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int | str] | str | None = None,
    heads: Sequence[int] | None = None,
    direction: Direction = "denoising",
    rows: int = DEFAULT_ROWS,
    progress: bool = False,
    alpha: float = 0.05,
    n_boot: int = 1000,
) -> PatchResult:
    """Patch every (layer, position[, head]) of `site` separately; the metric after each patch,
    per example (`.per_example` [..., n]; `.values` the mean over examples).

    `prompts`: the clean prompts (`Prompts`, a padded `Batch` or a token tensor); the corrupted
    run is `prompts.partner` or `corrupt=` (each example of the same length as its clean prompt).
    The old order ``sweep(model, clean, corrupt, metric[, site])`` still works. `metric`: anything
    `interp.metrics.as_metric` takes. `site` (positionally after the metric, or ``site=``;
    default resid_pre). Denoising patches the clean value into the corrupted run;
    noising the reverse. `positions`: ints in prompt coordinates (an example shorter than a
    cell's position is NaN there) or span names (each patched whole). When every position is a
    name, each example's clean and corrupted prompts may differ in length: the source value is
    read at the source prompt's own span of the name and written at the base prompt's (spans of
    equal token counts), and each run's metric is read at its own positions (the corrupted
    run's with the clean prompts' answers; `engine.read_as`). `heads` index heads (KV
    groups for k and v on grouped-query models). `rows` bounds the rows (examples x patched
    copies) of one forward pass, and so the memory. NaN/Inf in the runs or in a patched cell
    raises.
    """
    legacy, metric, got = positional("sweep", metric, args, {"site": site})
    corrupt = corrupt_arg("sweep", corrupt, legacy)  # type: ignore[assignment]
    site = got["site"] or "resid_pre"  # type: ignore[assignment]
    site = parse_site(site)  # type: ignore[arg-type]
    if site not in SWEEP_SITES:
        raise ValueError(f"sweep site: expected one of {[s.value for s in SWEEP_SITES]}, got {site.value!r}")
    direction = check_direction(direction)
    arch = Arch.of(model)
    cross = named_only(positions)
    clean, bad = check_prompts(model, prompts, corrupt, cross=cross)  # type: ignore[arg-type]
    width = clean.tokens.shape[1]
    layer_ix = index_axis(layers, arch.n_layers, "layers")
    pos_ix = position_axis(positions, clean)
    if site.per_head:
        n_h = heads_at(model, site)
        kind = "KV group" if site.per_kv_group and n_h < arch.n_heads else "head"
        if heads is not None:
            for h in heads:
                if not isinstance(h, int) or not 0 <= h < n_h:
                    raise ValueError(f"heads: expected {kind} indices in [0, {n_h}), got {h!r}")
        head_ix = index_axis(heads, n_h, "heads")
    elif heads is not None:
        raise ValueError(f"heads: site {site.value!r} has no heads, got heads={list(heads)}")
    nodes: list[At] = []
    for layer in layer_ix:
        for p in pos_ix:
            if site.per_head:
                nodes += [At(layer, site, p, h) for h in head_ix]
            else:
                nodes.append(At(layer, site, p))
    for n in nodes[:1] + nodes[-1:]:
        validate_node(model, n, width)
    runs = prepare(model, clean, bad, metric, {n.hook_name for n in nodes}, direction,  # type: ignore[arg-type]
                   cross=cross)
    copies = [[cross_edit(model, n, runs) if cross else node_edit(model, n, runs.source, clean)] for n in nodes]
    values = run_copies(model, runs, copies, metric, rows=rows, progress=progress,  # type: ignore[arg-type]
                        desc=f"patching {site.value}", labels=nodes)
    if site.per_head:
        axes = ("layer", "pos", "kv_head" if site.per_kv_group and arch.grouped else "head")
        coords: tuple[tuple, ...] = (layer_ix, pos_ix, head_ix)
    else:
        axes, coords = ("layer", "pos"), (layer_ix, pos_ix)
    shape = (*(len(c) for c in coords), len(clean))
    return PatchResult(detach(values).reshape(shape), axes, coords, site.value, direction,
                       runs.clean_values, runs.corrupt_values, alpha=alpha, n_boot=n_boot)


def as_places(nodes: Place | Sequence[Place], what: str = "nodes") -> list[Place]:
    out = [nodes] if isinstance(nodes, (Node, At)) else list(nodes)
    if not out or not all(isinstance(n, (Node, At)) for n in out):
        raise ValueError(f"{what}: expected a Node/At or a non-empty sequence of them, got {nodes!r}")
    return out


def patch(
    model: HookedTransformer,
    prompts: PromptsLike,
    metric: MetricArg,
    *args: object,
    nodes: Place | Sequence[Place] | None = None,
    corrupt: CorruptLike | None = None,
    direction: Direction = "denoising",
    alpha: float = 0.05,
    n_boot: int = 1000,
) -> PatchResult:
    """Patch all `nodes` (Nodes, or `At` nodes at named / per-example positions) at once, one
    forward pass; a one-cell result with one value per example. When every node is an `At` at a
    span name, the two prompts of an example may differ in length (cross-position patching, as
    in `sweep`). The old order
    ``patch(model, clean, corrupt, metric, nodes)`` still works."""
    legacy, metric, got = positional("patch", metric, args, {"nodes": nodes})
    corrupt = corrupt_arg("patch", corrupt, legacy)  # type: ignore[assignment]
    nodes = got["nodes"]  # type: ignore[assignment]
    if nodes is None:
        raise TypeError("patch: expected nodes (positionally after the metric, or nodes=), got none")
    node_list = as_places(nodes)  # type: ignore[arg-type]
    cross = all(isinstance(n, At) and isinstance(n.pos, str) for n in node_list)
    clean, bad = check_prompts(model, prompts, corrupt, cross=cross)  # type: ignore[arg-type]
    width = clean.tokens.shape[1]
    for n in node_list:
        validate_node(model, n, width)
    runs = prepare(model, clean, bad, metric, {n.hook_name for n in node_list}, direction,  # type: ignore[arg-type]
                   cross=cross)
    edits = [cross_edit(model, n, runs) if cross else node_edit(model, n, runs.source, clean) for n in node_list]
    values = run_copies(model, runs, [edits], metric)  # type: ignore[arg-type]
    label = " + ".join(str(n) for n in node_list)
    sites = ",".join(sorted({n.site.value for n in node_list}))  # type: ignore[union-attr]
    return PatchResult(detach(values), ("patch",), ((label,),), sites, direction,
                       runs.clean_values, runs.corrupt_values, alpha=alpha, n_boot=n_boot)


def patched_logits(
    model: HookedTransformer,
    prompts: PromptsLike,
    nodes: Place | Sequence[Place] | Tensor | Batch,
    *old: Place | Sequence[Place],
    corrupt: CorruptLike | None = None,
    direction: Direction = "denoising",
) -> Float[Tensor, "batch pos d_vocab"]:
    """The full logits of the base run with all `nodes` patched from the source run, in the
    layout of `prompts` (pad positions' logits are those of the pad tokens: never read them).
    The old order ``patched_logits(model, clean, corrupt, nodes)`` still works."""
    if isinstance(nodes, (Tensor, Batch)):
        if corrupt is not None or not old:
            raise TypeError("patched_logits: expected (model, prompts, nodes, corrupt=...) or the old "
                            "(model, clean, corrupt, nodes)")
        corrupt, nodes = nodes, old[0]
    node_list = as_places(nodes)  # type: ignore[arg-type]
    direction = check_direction(direction)
    clean, bad = check_prompts(model, prompts, corrupt)  # type: ignore[arg-type]
    width = clean.tokens.shape[1]
    for n in node_list:
        validate_node(model, n, width)
    runs = prepare(model, clean, bad, None, {n.hook_name for n in node_list}, direction, kv=False)
    edits = [node_edit(model, n, runs.source, clean) for n in node_list]
    hooks = chunk_hooks([merge_edits(edits)], len(clean))
    start = min(e.layer for e in edits)
    logits = forward_from(model, runs.base[resid_pre_name(start)].clone(), start, None, hooks)
    if isinstance(prompts, Batch) and (prompts.side == "left" or prompts.tokens.shape[1] != width):
        out = logits.new_zeros((len(clean), prompts.tokens.shape[1], logits.shape[-1]))
        out[:, :width] = logits
        return prompts.to_layout(out)
    return logits
