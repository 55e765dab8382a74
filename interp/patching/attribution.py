"""Attribution patching: a first-order estimate of every cell's patching effect at once.

Attribution patching (Nanda 2023; Syed et al. 2023): the effect of patching activation a from
the source run into the base run is approximated by the first-order Taylor term
    (a_source - a_base) . dm/da |base
summed over the features of each (layer, position[, head]) cell, for each example (the metric
gives one value per example, and example i's value depends only on its own activations, so one
backward pass of the sum gives every example's gradient). It costs two forward passes (source:
activations; base: activations and the graph) and one backward pass, whatever the number of
cells. It fails where the metric saturates or effects cancel (Kramar et al. 2024, AtP*), so pass
an exact `PatchResult` over the same cells to get the correlation with exact patching reported
next to the estimates. Positions are prompt coordinates; an example shorter than a position is
NaN there.
"""

from __future__ import annotations

import torch

from interp.arch import Arch
from interp.graph import Node, Site, parse_site
from interp.hooks import Map, run
from interp.metrics import as_metric, check_per_example
from interp.patching.engine import (
    Direction,
    cached_run,
    check_direction,
    check_prompts,
    heads_at,
    positional,
)
from interp.patching.results import AttributionResult, PatchResult, cell_mean, detach, pearson
from interp.patching.sweep import SWEEP_SITES, CorruptLike, MetricArg, PromptsLike, corrupt_arg
from interp.tl import HookedTransformer


def attribute(
    model: HookedTransformer,
    prompts: PromptsLike,
    metric: MetricArg,
    *args: object,
    site: Site | str | None = None,
    corrupt: CorruptLike | None = None,
    direction: Direction = "denoising",
    exact: PatchResult | None = None,
    alpha: float = 0.05,
    n_boot: int = 1000,
) -> AttributionResult:
    """Estimated metric change of patching each (layer, pos[, head]) of `site`, every layer, per
    example (`.per_example` [..., n]; `.values` the mean).

    Units: the metric's units; compare with `exact.per_example_effect` / `exact.effect`. With
    `exact` (a sweep of the same site, direction and int cells), the Pearson correlation of the
    means is stored in `.correlation`. The corrupted run is `prompts.partner` or `corrupt=`; the
    old order ``attribute(model, clean, corrupt, metric[, site])`` still works.
    """
    legacy, metric, got = positional("attribute", metric, args, {"site": site})
    corrupt = corrupt_arg("attribute", corrupt, legacy)  # type: ignore[assignment]
    site = got["site"] or "resid_pre"  # type: ignore[assignment]
    site = parse_site(site)  # type: ignore[arg-type]
    if site not in SWEEP_SITES:
        raise ValueError(f"attribution site: expected one of {[s.value for s in SWEEP_SITES]}, got {site.value!r}")
    direction = check_direction(direction)
    metric = as_metric(metric)
    arch = Arch.of(model)
    clean, bad = check_prompts(model, prompts, corrupt)  # type: ignore[arg-type]
    batch, width = clean.tokens.shape
    nodes = [Node(layer, site) for layer in range(arch.n_layers)]
    for n in nodes:
        n.validate(arch, width)
    names = [n.hook_name for n in nodes]
    base_tokens, source_tokens = ((bad.tokens, clean.tokens) if direction == "denoising"
                                  else (clean.tokens, bad.tokens))
    # forward 1: the source activations
    _, source = cached_run(model, source_tokens, set(names))

    # forward 2 + backward: gradients at the base run through zero-valued leaves added to each
    # activation, so no parameter needs requires_grad and no .grad is written anywhere
    # (through the one run path, `interp.hooks.run`, with a `Map` edit per hooked site)
    acts: dict[str, torch.Tensor] = {}
    leaves: dict[str, torch.Tensor] = {}

    def grab(name: str):
        def fn(act: torch.Tensor) -> torch.Tensor:
            leaf = torch.zeros_like(act, requires_grad=True)
            acts[name], leaves[name] = act.detach(), leaf
            return act + leaf

        return fn

    with torch.enable_grad():
        logits = run(model, base_tokens, edits=[Map(n, fn=grab(n.hook_name)) for n in nodes], grad=True,
                     check_finite=False).logits
        value = check_per_example(metric(logits, clean), batch, "metric")
        if not value.requires_grad:
            raise ValueError("metric: expected a differentiable function of the logits, got a value "
                             "with no gradient (is it computed with .item(), argmax or inference_mode?)")
        grads = torch.autograd.grad(value.sum(), [leaves[n] for n in names], allow_unused=True)
    base_values = value.detach().to("cpu", torch.float64)

    per_layer = []
    for n, g in zip(names, grads, strict=True):
        diff = source[n] - acts[n]
        g = torch.zeros_like(diff) if g is None else g
        per_layer.append((diff * g).sum(-1))  # [batch, pos(, head)]: one estimate per example and cell
    values = detach(torch.stack(per_layer)).movedim(1, -1)  # [layer, pos(, head), batch]
    missing = torch.arange(width)[:, None] >= clean.lengths.cpu()[None]  # [pos, batch]
    if site.per_head:
        missing = missing[:, None]
    values = values.masked_fill(missing[None], float("nan"))
    if site.per_head:
        axes = ("layer", "pos", "kv_head" if site.per_kv_group and heads_at(model, site) < arch.n_heads
                else "head")
        coords: tuple[tuple, ...] = (tuple(range(arch.n_layers)), tuple(range(width)),
                                     tuple(range(values.shape[2])))
    else:
        axes, coords = ("layer", "pos"), (tuple(range(arch.n_layers)), tuple(range(width)))
    correlation = None
    if exact is not None:
        if exact.site != site.value or exact.direction != direction:
            raise ValueError(f"exact: expected a {direction} sweep of site {site.value!r}, got a "
                             f"{exact.direction} sweep of {exact.site!r}")
        if not all(isinstance(p, int) for p in exact.coords[1]):
            raise ValueError(f"exact: expected a sweep over int positions, got positions {exact.coords[1]}")
        mean = cell_mean(values)
        index = [list(c) for c in exact.coords]
        sub = mean[index[0]][:, [p % width for p in index[1]]]
        if site.per_head:
            sub = sub[:, :, index[2]]
        correlation = pearson(sub, exact.effect)
    return AttributionResult(values, axes, coords, site.value, direction, base_values, correlation,
                             alpha=alpha, n_boot=n_boot)
