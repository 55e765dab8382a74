"""Routes: does an effect travel residual-first ("up, then right") or K/V-first ("right, then up")?

On the layer x position grid (DESIGN.md), information from a source position s reaches a target
position t > s only by moving right through attention at some layer. We measure, with exact
path patching (Goldowsky-Dill et al. 2023; every other path frozen), the route classes a small
model can realise:

- ``U^c R`` — up at s through layers < c (their attention at s itself and MLPs included), then
  read sideways by t at layer c (sender: resid_pre[c] at s; receivers: layer c's keys / values
  at s, read by t only). Residual-first when c >= 1, K/V-first when c = 0.
- ``R_c1 -> p -> R_c2`` — read sideways at layer c1 by an intermediate position p, then read
  by t at layer c2 > c1 through p's keys or values (sender: layer c1's attention output at p;
  receivers: layer c2's keys / values at p, read by t only). Its first move is right at c1,
  so it is K/V-first when c1 = 0.

Receivers are split into K and V, so the K-composition route of an induction circuit (the
previous-token information enters the KEY at the source) is told apart from value routes.
Effects are per example (change of the metric, clean into corrupted, in the metric's units) with
bootstrap CIs, and shares of the total clean-minus-corrupted effect. Routes interact (attention
is a softmax): single-route shares need not add up to one, and we report them as measured. Baseline: the same routes
in a random-initialised model of the same shape (`interp.baseline`: ``baseline="auto"`` builds it only for a model of
at most 1 GiB, after the model's routes, and releases it; without one no route is claimed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go
import torch
from torch import Tensor

from interp.arch import Arch, Model
from interp.arch import model_name as name_of
from interp.baseline import BaselineSpec, baseline_for, unbaselined
from interp.graph import Node, Site
from interp.hypotheses.base import Verdict, estimate, positions_of, prompts_of
from interp.metrics import answer_logprob
from interp.patching import At, Path, path_patch, path_patch_many
from interp.prompts import LAST, Prompts
from interp.stats import Estimate


@dataclass(frozen=True)
class RouteEffect:
    name: str
    kind: str  # "direct" (U^c R), "via" (R -> p -> R) or "joint" (all routes into one layer at once)
    receiver: str  # "k" or "v"
    first_stream: str  # "residual", "kv" or "mixed" (joint rows)
    layers: tuple[int, ...]  # (c,) or (c1, c2)
    via: int | None
    effect: Tensor  # [n] per-example metric change (patched - corrupted)

    def estimate(self) -> Estimate:
        return estimate(self.effect)


@dataclass(frozen=True)
class RoutesResult:
    model_name: str
    source: int
    target: int
    n_layers: int
    total: Tensor  # [n] clean - corrupted metric
    routes: tuple[RouteEffect, ...]
    baseline_total: Tensor | None  # None without a baseline (see baseline_note)
    verdict: Verdict
    meta: dict = field(default_factory=dict)
    clean_shows_behaviour: bool = True  # the clean-minus-corrupted total effect is positive (CI above 0)
    behaviour_reason: str | None = None  # why not, when clean_shows_behaviour is False
    baseline_note: str | None = None  # the baseline compared with, or why there is none (interp.baseline)

    @property
    def values(self) -> Tensor:
        """[route] mean effect over the examples that have the route."""
        return torch.stack([_nanmean(r.effect) for r in self.routes])

    @property
    def per_example(self) -> Tensor:
        """[route, n] effects (NaN: the example has no such route)."""
        return torch.stack([r.effect for r in self.routes])

    def share(self, r: RouteEffect) -> float:
        return float(_nanmean(r.effect) / self.total.mean())

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for r in self.routes:
            e = r.estimate()
            rows.append({"model": self.model_name, "route": r.name, "kind": r.kind, "receiver": r.receiver,
                         "first_stream": r.first_stream, "layers": str(r.layers), "via": r.via,
                         "value": e.value, "ci_low": e.low, "ci_high": e.high,
                         "n": int(torch.isfinite(r.effect).sum()), "share": self.share(r)})
        return pd.DataFrame(rows)

    def plot(self) -> go.Figure:
        """The grid (positions x layers) with each route drawn: width and opacity by |share|, the
        sign by the line style (a route that opposes the total effect is dashed, in grey, and says
        "negative" in its legend), the signed share in the hover text and at the route's end."""
        fig = go.Figure()
        frame = self.to_frame()
        positions = sorted({self.source, self.target, *[r.via for r in self.routes if r.via is not None]})
        xs = {p: i for i, p in enumerate(positions)}
        for p in positions:
            fig.add_trace(go.Scatter(x=[xs[p]] * (self.n_layers + 1), y=list(range(self.n_layers + 1)),
                                     mode="markers", marker=dict(color="#bbb", size=8), showlegend=False,
                                     hoverinfo="skip", name=f"grid: position {p}, layers 0..{self.n_layers}"))
        colors = {"residual": "#1f77b4", "kv": "#d62728"}
        shown: set[str] = set()
        for r, (_, row) in zip(self.routes, frame.iterrows(), strict=True):
            if r.kind == "joint":
                continue
            share = max(0.0, min(1.0, abs(row.share)))
            negative = row.share < 0
            if r.kind == "direct":
                (c,) = r.layers
                path = [(self.source, 0), (self.source, c), (self.target, c + 1), (self.target, self.n_layers)]
            else:
                c1, c2 = r.layers
                path = [(self.source, 0), (self.source, c1), (r.via, c1 + 1), (r.via, c2),
                        (self.target, c2 + 1), (self.target, self.n_layers)]
            legend = f"{r.first_stream}-first" + (", negative (opposes the effect)" if negative else "")
            dash = ("dash" if r.receiver == "k" else "dashdot") if negative else (
                "solid" if r.receiver == "k" else "dot")
            x = [xs[p] + (0.04 if r.receiver == "v" else -0.04) for p, _ in path]
            fig.add_trace(go.Scatter(
                x=x, y=[y for _, y in path], mode="lines+text",
                text=[""] * (len(path) - 1) + [f"{row.share:+.0%}" if share >= 0.05 else ""],
                textposition="top center",
                line=dict(color="#7f7f7f" if negative else colors[r.first_stream], width=1 + 12 * share, dash=dash),
                opacity=0.25 + 0.75 * share, name=legend, legendgroup=legend, showlegend=legend not in shown,
                hovertext=f"{r.name}: effect {row.value:+.3f} [{row.ci_low:+.3f}, {row.ci_high:+.3f}], "
                          f"share {row.share:+.2f}", hoverinfo="text"))
            shown.add(legend)
        from interp import viz

        fig.update_xaxes(tickvals=list(xs.values()), ticktext=[str(p) for p in positions],
                         title_text="position in the prompt (tokens; source, via positions, read-out)")
        fig.update_yaxes(title_text="layer (residual stream entering block; top = after the last)", dtick=1)
        total = estimate(self.total)
        return viz.finish(fig, title=f"Routes from position {self.source} to {self.target} — {self.model_name}",
                          caption=f"n = {int(self.total.numel())} prompts; total effect (clean - corrupted) "
                                  f"{total} ({viz.CI_TEXT}). Colour: the stream a route takes first (blue: "
                                  "residual, red: K/V); solid: read through the keys, dotted: through the values; "
                                  "dashed grey: a negative share; width and opacity: |share of the total|. Hover "
                                  "a route for its effect and CI.")


def route_specs(n_layers: int, n_kv: int, source: int, via: Sequence[int]) -> list[RouteSpec]:
    """Every measured route from `source` through the `via` positions (module docstring)."""
    specs: list[RouteSpec] = []
    for c in range(n_layers):
        for rec, site in (("k", Site.K), ("v", Site.V)):
            specs.append(RouteSpec(f"U^{c} R@L{c} ({rec})", "direct", rec, "residual" if c else "kv", (c,), None,
                                   Node(c, Site.RESID_PRE, pos=source),
                                   tuple(Node(c, site, pos=source, head=g) for g in range(n_kv))))
    for p in via:
        for c1 in range(n_layers):
            for c2 in range(c1 + 1, n_layers):
                for rec, site in (("k", Site.K), ("v", Site.V)):
                    specs.append(RouteSpec(f"R@L{c1}->{p}->R@L{c2} ({rec})", "via", rec, "residual" if c1 else "kv",
                                           (c1, c2), p, Node(c1, Site.ATTN_OUT, pos=p),
                                           tuple(Node(c2, site, pos=p, head=g) for g in range(n_kv))))
    # joint: every measured route into layer c2 through its keys (or values) at once
    for c2 in range(n_layers):
        senders = [Node(c2, Site.RESID_PRE, pos=source)] + [Node(c1, Site.ATTN_OUT, pos=p)
                                                           for p in via for c1 in range(c2)]
        for rec, site in (("k", Site.K), ("v", Site.V)):
            specs.append(RouteSpec(f"joint -> L{c2} ({rec})", "joint", rec, "mixed", (c2,), None, (tuple(senders),),
                                   tuple(Node(c2, site, pos=q, head=g) for q in [source, *via] for g in range(n_kv))))
    return specs


@dataclass(frozen=True)
class RouteSpec:
    name: str
    kind: str
    receiver: str
    first_stream: str
    layers: tuple[int, ...]
    via: int | None
    sender: object  # a Node, or a tuple holding one group of Nodes patched together
    receivers: tuple[Node, ...]


def example_specs(model: Model, p: Prompts, source: Tensor, via: Sequence[int] | None
                  ) -> list[list[RouteSpec]]:
    """Each example's routes: from its own source, through the `via` positions strictly between
    its source and its last prompt token (default: all of them)."""
    arch = Arch.of(model)
    last = p.index(LAST)
    out = []
    for i in range(len(p)):
        s, t = int(source[i]), int(last[i])
        if not 0 <= s < t:
            raise ValueError(f"source of prompt {i}: expected a position before its last prompt token {t}, got {s}")
        v = list(range(s + 1, t)) if via is None else [q for q in via if s < q < t]
        out.append(route_specs(arch.n_layers, arch.n_kv_heads, s, v))
    return out


def _route_effects(model: Model, p: Prompts, source: Tensor, via: Sequence[int] | None
                   ) -> tuple[Tensor, list[RouteSpec], Tensor]:
    """The [n] totals (clean - corrupted), the routes and their [route, n] effects (patched -
    corrupted; NaN for an example that cannot take the route), batched over the examples and
    the routes: one `path_patch_many` call holding a request per receiver (layer, K or V,
    position), all its senders in that request.

    Positions are per example: a direct route starts at each prompt's own source; a two-step
    route through position q exists for the prompts whose source < q < last token; the joint
    route into a layer takes every route of that prompt at once."""
    arch = Arch.of(model)
    L, G = arch.n_layers, arch.n_kv_heads
    n, width = len(p), p.tokens.shape[1]
    last = p.index(LAST)
    cols = torch.arange(width)[None]
    between = (cols > source[:, None]) & (cols < last[:, None])  # [n, pos]
    vias = sorted(set(range(width)) if via is None else set(int(q) for q in via))
    between &= torch.isin(cols, torch.tensor(vias, dtype=torch.long))
    metric = answer_logprob()
    site_of = {"k": Site.K, "v": Site.V}
    # plan every request first, then run them all in one `path_patch_many` call (the clean and
    # corrupted runs once, the patched copies of every request batched together)
    paths: list[Path] = []
    sizes: list[int] = []

    def request(senders: list, receivers: list) -> int:
        paths.append(Path(senders, receivers, stream="kv", reader=LAST))
        sizes.append(len(senders))
        return len(paths) - 1

    direct: list[tuple[int, int, str]] = []
    for c in range(L):
        for rec in ("k", "v"):
            direct.append((request([At(c, Site.RESID_PRE, pos=source)],
                                   [At(c, site_of[rec], pos=source, head=g) for g in range(G)]), c, rec))
    two_step: list[tuple[int, int, int, str, Tensor]] = []
    for q in vias:
        has = between[:, q] if q < width else torch.zeros(n, dtype=torch.bool)
        if not bool(has.any()):
            continue
        at_q = torch.zeros(n, width, dtype=torch.bool)
        at_q[has, q] = True  # only the prompts that can take a route through q
        for c2 in range(1, L):
            for rec in ("k", "v"):
                two_step.append((request([At(c1, Site.ATTN_OUT, pos=at_q) for c1 in range(c2)],
                                         [At(c2, site_of[rec], pos=at_q, head=g) for g in range(G)]), q, c2, rec, has))
    # joint: every measured route into layer c2 through its keys (or values) at once
    onehot = torch.zeros(n, width, dtype=torch.bool)
    onehot[torch.arange(n), source] = True
    joint: list[tuple[int, int, str]] = []
    for c2 in range(L):
        group = [At(c2, Site.RESID_PRE, pos=source)] + [At(c1, Site.ATTN_OUT, pos=between) for c1 in range(c2)]
        for rec in ("k", "v"):
            joint.append((request([group], [At(c2, site_of[rec], pos=onehot | between, head=g) for g in range(G)]),
                          c2, rec))
    res = path_patch_many(model, p, metric, paths)
    total = (res.clean_values - res.corrupt_values).double()
    effects = (res.per_example - res.corrupt_values[None]).double()  # [row, n]
    offsets = [0]
    for k in sizes:
        offsets.append(offsets[-1] + k)

    def eff(j: int) -> Tensor:
        return effects[offsets[j]: offsets[j + 1]]  # [sender group, n]

    specs: list[RouteSpec] = []
    rows: list[Tensor] = []
    for j, c, rec in direct:
        specs.append(RouteSpec(f"U^{c} R@L{c} ({rec})", "direct", rec, "residual" if c else "kv", (c,), None,
                               None, ()))
        rows.append(eff(j)[0])
    for j, q, c2, rec, has in two_step:
        e = eff(j)
        for c1 in range(c2):
            specs.append(RouteSpec(f"R@L{c1}->{q}->R@L{c2} ({rec})", "via", rec, "residual" if c1 else "kv",
                                   (c1, c2), q, None, ()))
            rows.append(torch.where(has, e[c1], torch.full_like(e[c1], float("nan"))))
    for j, c2, rec in joint:
        # a prompt with no intermediate position: its joint route is the direct one
        d = rows[[s.name for s in specs].index(f"U^{c2} R@L{c2} ({rec})")]
        specs.append(RouteSpec(f"joint -> L{c2} ({rec})", "joint", rec, "mixed", (c2,), None, None, ()))
        rows.append(torch.where(between.any(1) | (c2 == 0), eff(j)[0], d))
    order = sorted(range(len(specs)), key=lambda j: _order_key(specs[j]))
    return total, [specs[j] for j in order], torch.stack([rows[j] for j in order])  # type: ignore[return-value]


def _order_key(s: RouteSpec) -> tuple:
    """Direct routes, then two-step routes by position and layers, then joint ones (the per-example
    loop's order)."""
    kind = {"direct": 0, "via": 1, "joint": 2}[s.kind]
    return (kind, s.via or 0, s.layers, s.receiver)


def _route_effects_loop(model: Model, p: Prompts, specs: list[list[RouteSpec]]
                        ) -> tuple[Tensor, list[RouteSpec], Tensor]:
    """The same, one example and one route at a time (each prompt run alone, unpadded): the
    reference the batched path is tested against."""
    n = len(p)
    names: dict[str, RouteSpec] = {}
    for per in specs:
        for spec in per:
            names.setdefault(spec.name, spec)
    order = {k: j for j, k in enumerate(names)}
    effects = torch.full((len(names), n), float("nan"), dtype=torch.float64)
    total = torch.zeros(n, dtype=torch.float64)
    metric = answer_logprob()
    for i in range(n):
        one = p.select([i])
        for spec in specs[i]:
            res = path_patch(model, one, metric, senders=spec.sender, receivers=list(spec.receivers), stream="kv",
                             reader=LAST)
            effects[order[spec.name], i] = float(res.per_example.reshape(-1)[0] - res.corrupt_values[0])
            total[i] = float(res.clean_values[0] - res.corrupt_values[0])
    return total, list(names.values()), effects


def routes(
    model: Model,
    prompts: Prompts,
    *,
    source: str | int = "source",
    via: Sequence[int] | None = None,
    baseline: Model | BaselineSpec | None = "auto",
    seed: int = 0,
) -> RoutesResult:
    """Decompose the clean-vs-corrupted effect at each prompt's last token into residual-first and
    K/V-first routes.

    `prompts`: clean prompts (any lengths, padded left or right) with answers; their `partner`
    is the corrupted run, of the same lengths, differing at the source (the information's
    origin). `source`: a span name (its last token, per prompt) or an int in prompt
    coordinates. The metric is log p(answer) at the last prompt token (summed over a multi-token
    answer's teacher-forced positions). `via`: intermediate positions for two-step routes
    (default: every position strictly between each prompt's source and last token; a route a
    prompt cannot take is NaN for it and left out of its mean and CI). `baseline`: the comparison
    model, "random", "none" or "auto" (`interp.baseline`: a random-initialised model of the same
    shape only for a model of at most 1 GiB; None means "auto").
    """
    arch = Arch.of(model)
    p = prompts_of(prompts, model)
    if p.answers is None or p.partner is None:
        raise ValueError("routes prompts: expected answers and a partner (the corrupted prompts), got "
                         f"answers={p.answers is not None}, partner={p.partner is not None}")
    q = p.partner.right()
    if len(q) != len(p) or not torch.equal(q.lengths, p.lengths):
        raise ValueError(f"routes prompts.partner (the corrupted run): expected {len(p)} prompts of the same lengths "
                         f"({p.lengths.tolist()[:8]}...), got lengths {q.lengths.tolist()[:8]}...")
    p = p.with_partner(q)
    src = positions_of(p, source, "routes source")
    if not bool(torch.isfinite(src).all()):
        i = int(torch.nonzero(~torch.isfinite(src))[0, 0])
        raise ValueError(f"source of prompt {i}: expected a position inside its {int(p.prompt_lengths[i])} tokens, "
                         f"got {source!r}")
    src = src.long()
    example_specs(model, p, src, via)  # checks every source against its prompt's last token
    total, found_specs, effects = _route_effects(model, p, src, via)
    plan = baseline_for(model, baseline, seed=seed)
    b_total, b_specs, b_effects = plan.run(model, lambda m: _route_effects(m, p, src, via)) or (None, [], None)
    found = [RouteEffect(s.name, s.kind, s.receiver, s.first_stream, s.layers, s.via, effects[j])
             for j, s in enumerate(found_specs)]
    b_routes = [RouteEffect(s.name, s.kind, s.receiver, s.first_stream, s.layers, s.via, b_effects[j])
                for j, s in enumerate(b_specs)]
    return _result(name_of(model), arch.n_layers, p, src, total, found, b_total, b_routes, via, plan.note)


def _result(name: str, n_layers: int, p: Prompts, src: Tensor, total: Tensor, found: list[RouteEffect],
            b_total: Tensor | None, b_routes: list[RouteEffect], via: Sequence[int] | None,
            note: str | None = None) -> RoutesResult:
    tot = estimate(total)
    single = [r for r in found if r.kind != "joint"]
    best = max(single, key=lambda r: float(_nanmean(r.effect)))
    best_e = best.estimate()
    shows = tot.low > 0
    behaviour_reason = None if shows else (
        f"the clean run does not show the behaviour: its metric minus the corrupted run's is {tot} (CI not above "
        f"0), so there is no effect to decompose into routes")
    if b_total is not None:
        b_tot = estimate(b_total)
        b_best = next(r for r in b_routes if r.name == best.name).estimate()
    if not shows:
        verdict = Verdict(False, behaviour_reason)
    elif b_total is None:
        verdict = Verdict(False, unbaselined(str(note), (
            f"the largest single route is {best.name} ({best.first_stream}-first, through the "
            f"{'keys' if best.receiver == 'k' else 'values'}): {best_e} of a total {tot}")))
    elif not best_e.above(b_best):
        verdict = Verdict(False, f"the total effect {tot} or its largest route {best.name} {best_e} does not clear "
                                 f"the random-initialised baseline (total {b_tot}, same route {b_best})")
    else:
        share = float(_nanmean(best.effect) / total.mean())
        joint = max((r for r in found if r.kind == "joint"), key=lambda r: float(_nanmean(r.effect)))
        verdict = Verdict(True, (
            f"The largest single route is {best.name} ({best.first_stream}-first, through the "
            f"{'keys' if best.receiver == 'k' else 'values'}): {best_e} of a total {tot} ({share:.0%}); all routes "
            f"into {joint.name.removeprefix('joint -> ')} together carry {joint.estimate()} "
            f"({float(_nanmean(joint.effect) / total.mean()):.0%}) (random-initialised baseline total {b_tot})."))
    last = p.index(LAST)
    vias = sorted({r.via for r in found if r.via is not None})
    return RoutesResult(name, int(src[0]), int(last[0]), n_layers, total, tuple(found), b_total, verdict,
                        meta={"n": len(p), "via": vias if via is None else list(via), "sources": src.tolist(),
                              "targets": last.tolist()},
                        clean_shows_behaviour=shows, behaviour_reason=behaviour_reason, baseline_note=note)


def _nanmean(x: Tensor) -> Tensor:
    x = x[torch.isfinite(x)]
    return x.mean() if x.numel() else torch.tensor(float("nan"), dtype=torch.float64)
