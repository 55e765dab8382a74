"""K/V patching: replace the keys and/or values that position i contributes at layer l.

This is the horizontal highway of the two (see DESIGN.md): at layer l, an earlier position i
produces keys and values that the attention of every later position reads. Patching them moves
information sideways only, at that one layer — unlike patching the residual at i, which also
changes every later layer at i (and so every later layer's K/V at i). Under grouped-query
attention (Ainslie et al. 2023) keys and values belong to KV groups (`n_key_value_heads`), each
read by `n_heads / n_key_value_heads` query heads; a group patch equals patching the same
values into every head of the group of the expanded (ungrouped) model.

Positions are ints in prompt coordinates (NaN for an example shorter than the cell) or span
names (each prompt's own span, patched whole), as in `interp.patching.sweep`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from interp.arch import Arch
from interp.graph import Node, Site
from interp.patching.engine import (
    DEFAULT_ROWS,
    At,
    Direction,
    check_direction,
    check_prompts,
    cross_edit,
    heads_at,
    named_only,
    node_edit,
    positional,
    prepare,
    run_copies,
)
from interp.patching.results import PatchResult, detach
from interp.patching.sweep import CorruptLike, MetricArg, PromptsLike, corrupt_arg, index_axis, position_axis
from interp.tl import HookedTransformer

Which = Literal["k", "v", "kv"]


def kv_patch(
    model: HookedTransformer,
    prompts: PromptsLike,
    metric: MetricArg,
    *args: object,
    corrupt: CorruptLike | None = None,
    which: Which = "kv",
    layers: Sequence[int] | None = None,
    positions: Sequence[int | str] | str | None = None,
    groups: Sequence[int] | None = None,
    per_group: bool = True,
    cumulative: bool = False,
    direction: Direction = "denoising",
    rows: int = DEFAULT_ROWS,
    progress: bool = False,
    alpha: float = 0.05,
    n_boot: int = 1000,
) -> PatchResult:
    """Patch the keys and/or values of each (layer, position[, KV group]) separately; one value
    per example (`.per_example`), `.values` their mean.

    The corrupted run is `prompts.partner` or `corrupt=` (the old order
    ``kv_patch(model, clean, corrupt, metric)`` still works). `groups` index KV groups (heads on
    models without grouped-query attention); with `per_group=False` all groups of a
    (layer, position) are patched together and the result is over (layer, pos).

    `cumulative`: cell l replaces the keys/values at every layer >= l at once, in one copy
    (e.g. "the context's K/V from another prompt at layers l.."); the layer axis is then the
    first replaced layer. Positions that are all span names let the two prompts of an example
    differ in length (cross-position patching, see `interp.patching.sweep`).
    """
    legacy, metric, _ = positional("kv_patch", metric, args, {})
    corrupt = corrupt_arg("kv_patch", corrupt, legacy)  # type: ignore[assignment]
    if which not in ("k", "v", "kv"):
        raise ValueError(f"which: expected 'k', 'v' or 'kv', got {which!r}")
    direction = check_direction(direction)
    arch = Arch.of(model)
    cross = named_only(positions)
    clean, bad = check_prompts(model, prompts, corrupt, cross=cross)  # type: ignore[arg-type]
    n_groups = heads_at(model, Site.K)
    if groups is not None:
        for g in groups:
            if not isinstance(g, int) or isinstance(g, bool) or not 0 <= g < n_groups:
                hint = (f"; K/V are per KV group under grouped-query attention (query head h reads "
                        f"group h // {arch.group_size})") if n_groups < arch.n_heads else ""
                raise ValueError(f"groups: expected KV group indices in [0, {n_groups}), got {g!r}{hint}")
        if not per_group:
            raise ValueError("groups: expected per_group=True when groups are given, got per_group=False")
    layer_ix = index_axis(layers, arch.n_layers, "layers")
    pos_ix = position_axis(positions, clean)
    group_ix = index_axis(groups, n_groups, "groups")
    sites = [Site(s) for s in which]
    if not isinstance(cumulative, bool):
        raise ValueError(f"cumulative: expected a bool, got {cumulative!r}")
    edited = {layer: (tuple(range(layer, arch.n_layers)) if cumulative else (layer,)) for layer in layer_ix}
    names = {Node(x, s).hook_name for layer in layer_ix for x in edited[layer] for s in sites}
    runs = prepare(model, clean, bad, metric, names, direction, cross=cross)  # type: ignore[arg-type]

    def edit(node: At):
        return cross_edit(model, node, runs) if cross else node_edit(model, node, runs.source, clean)

    copies, labels = [], []
    for layer in layer_ix:
        for p in pos_ix:
            for g in (group_ix if per_group else (None,)):
                copies.append([edit(At(x, s, p, g)) for x in edited[layer] for s in sites])
                labels.append(" + ".join(str(At(layer, s, p, g)) for s in sites) + (" (and later layers)"
                                                                                    if cumulative else ""))
    values = run_copies(model, runs, copies, metric, rows=rows, progress=progress,  # type: ignore[arg-type]
                        desc=f"patching {which}", labels=labels)
    if per_group:
        axes = ("layer", "pos", "kv_head" if n_groups < arch.n_heads else "head")
        coords: tuple[tuple, ...] = (layer_ix, pos_ix, group_ix)
    else:
        axes, coords = ("layer", "pos"), (layer_ix, pos_ix)
    shape = (*(len(c) for c in coords), len(clean))
    return PatchResult(detach(values).reshape(shape), axes, coords, which, direction,
                       runs.clean_values, runs.corrupt_values, method="K/V patching", alpha=alpha, n_boot=n_boot)
