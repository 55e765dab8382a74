"""Attribution patching: a first-order estimate of every cell's patching effect at once.

Attribution patching (Nanda 2023; Syed et al. 2023): the effect of patching activation a from
the source run into the base run is approximated by the first-order Taylor term
    (a_source - a_base) . dm/da |base
summed over the features of each (layer, position[, head]) cell. It costs two forward passes
(source: activations; base: activations and the graph) and one backward pass, whatever the
number of cells. It fails where the metric saturates or effects cancel (Kramar et al. 2024,
AtP*), so pass an exact `PatchResult` over the same cells to get the correlation with exact
patching reported next to the estimates.
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.arch import Arch
from interp.graph import Node, Site, parse_site
from interp.patching.engine import Direction, cached_run, check_direction, check_pair, heads_at
from interp.patching.metrics import Metric, check_scalar
from interp.patching.results import AttributionResult, PatchResult, detach, pearson
from interp.patching.sweep import SWEEP_SITES


def attribute(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupt_tokens: Int[Tensor, "_batch _pos"],  # checked against clean_tokens with a clear error
    metric: Metric,
    site: Site | str = "resid_pre",
    *,
    direction: Direction = "denoising",
    exact: PatchResult | None = None,
) -> AttributionResult:
    """Estimated metric change of patching each (layer, pos[, head]) of `site`, every layer.

    Units: the metric's units; compare `values` with `exact.effect`. With `exact` (a sweep of
    the same site, direction and cells), the Pearson correlation is stored in `.correlation`.
    """
    site = parse_site(site)
    if site not in SWEEP_SITES:
        raise ValueError(f"attribution site: expected one of {[s.value for s in SWEEP_SITES]}, got {site.value!r}")
    direction = check_direction(direction)
    arch = Arch.of(model)
    clean_tokens, corrupt_tokens = check_pair(model, clean_tokens, corrupt_tokens)
    seq_len = clean_tokens.shape[1]
    nodes = [Node(layer, site) for layer in range(arch.n_layers)]
    for n in nodes:
        n.validate(arch, seq_len)
    names = [n.hook_name for n in nodes]
    base_tokens, source_tokens = ((corrupt_tokens, clean_tokens) if direction == "denoising"
                                  else (clean_tokens, corrupt_tokens))
    # forward 1: the source activations
    _, source = cached_run(model, source_tokens, set(names))

    # forward 2 + backward: gradients at the base run through zero-valued leaves added to each
    # activation, so no parameter needs requires_grad and no .grad is written anywhere
    acts: dict[str, Tensor] = {}
    leaves: dict[str, Tensor] = {}

    def grab(act: Tensor, hook) -> Tensor:
        leaf = torch.zeros_like(act, requires_grad=True)
        acts[hook.name], leaves[hook.name] = act.detach(), leaf
        return act + leaf

    with torch.enable_grad(), model.hooks(fwd_hooks=[(n, grab) for n in names]):
        logits = model(base_tokens)
        value = check_scalar(metric(logits))
        if not value.requires_grad:
            raise ValueError("metric: expected a differentiable function of the logits, got a value "
                             "with no gradient (is it computed with .item(), argmax or inference_mode?)")
        grads = torch.autograd.grad(value, [leaves[n] for n in names], allow_unused=True)
    base_metric = float(value.detach())

    per_layer = []
    for n, g in zip(names, grads, strict=True):
        diff = source[n] - acts[n]
        g = torch.zeros_like(diff) if g is None else g
        # a patch replaces the cell in every example of the batch at once (as in
        # transformer_lens.patching), so its first-order effect sums over features and the batch
        per_layer.append((diff * g).sum(-1).sum(0))  # [pos(, head)]
    values = detach(torch.stack(per_layer))
    if site.per_head:
        axes = ("layer", "pos", "kv_head" if site.per_kv_group and heads_at(model, site) < arch.n_heads
                else "head")
        coords: tuple[tuple, ...] = (tuple(range(arch.n_layers)), tuple(range(seq_len)),
                                     tuple(range(values.shape[-1])))
    else:
        axes, coords = ("layer", "pos"), (tuple(range(arch.n_layers)), tuple(range(seq_len)))
    correlation = None
    if exact is not None:
        if exact.site != site.value or exact.direction != direction:
            raise ValueError(f"exact: expected a {direction} sweep of site {site.value!r}, got a "
                             f"{exact.direction} sweep of {exact.site!r}")
        index = [list(c) for c in exact.coords]
        sub = values[index[0]][:, index[1]]
        if site.per_head:
            sub = sub[:, :, index[2]]
        correlation = pearson(sub, exact.effect)
    return AttributionResult(values, axes, coords, site.value, direction, base_metric, correlation)
