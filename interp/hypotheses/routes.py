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
in a random-initialised model of the same shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.arch import Arch
from interp.graph import Node, Site
from interp.hypotheses.base import Verdict, estimate, random_like, unpadded
from interp.patching import path_patch
from interp.patching.metrics import PositionMetric
from interp.stats import Estimate
from interp.tokens import Batch

PerExampleMetric = Callable[[Tensor, int], PositionMetric]  # (tokens row, example index) -> metric


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
    baseline_total: Tensor
    verdict: Verdict
    meta: dict = field(default_factory=dict)
    clean_shows_behaviour: bool = True  # the clean-minus-corrupted total effect is positive (CI above 0)
    behaviour_reason: str | None = None  # why not, when clean_shows_behaviour is False

    @property
    def values(self) -> Tensor:
        return torch.stack([r.effect.mean() for r in self.routes])

    def share(self, r: RouteEffect) -> float:
        return float(r.effect.mean() / self.total.mean())

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for r in self.routes:
            e = r.estimate()
            rows.append({"model": self.model_name, "route": r.name, "kind": r.kind, "receiver": r.receiver,
                         "first_stream": r.first_stream, "layers": str(r.layers), "via": r.via,
                         "value": e.value, "ci_low": e.low, "ci_high": e.high, "share": self.share(r)})
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
                                     hoverinfo="skip"))
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
        fig.update_layout(
            title=f"Routes from position {self.source} to {self.target} — {self.model_name} "
                  "(solid: via keys, dotted: via values; dashed grey: negative share; width: |share|)",
            xaxis=dict(tickvals=list(xs.values()), ticktext=[str(p) for p in positions], title="position"),
            yaxis=dict(title="layer (residual stream entering block)", dtick=1), template="plotly_white", height=450)
        return fig


def _route_effects(model: HookedTransformer, clean: Tensor, corrupt: Tensor, metric: PerExampleMetric,
                   source: int, target: int, via: list[int]) -> tuple[Tensor, list[RouteEffect]]:
    arch = Arch.of(model)
    n = clean.shape[0]
    specs: list[tuple[str, str, str, str, tuple[int, ...], int | None, object, list[Node]]] = []
    for c in range(arch.n_layers):
        for rec, site in (("k", Site.K), ("v", Site.V)):
            specs.append((f"U^{c} R@L{c} ({rec})", "direct", rec, "residual" if c else "kv", (c,), None,
                          Node(c, Site.RESID_PRE, pos=source),
                          [Node(c, site, pos=source, head=g) for g in range(arch.n_kv_heads)]))
    for p in via:
        for c1 in range(arch.n_layers):
            for c2 in range(c1 + 1, arch.n_layers):
                for rec, site in (("k", Site.K), ("v", Site.V)):
                    specs.append((f"R@L{c1}->{p}->R@L{c2} ({rec})", "via", rec, "residual" if c1 else "kv",
                                  (c1, c2), p, Node(c1, Site.ATTN_OUT, pos=p),
                                  [Node(c2, site, pos=p, head=g) for g in range(arch.n_kv_heads)]))
    # joint: every measured route into layer c2 through its keys (or values) at once
    for c2 in range(arch.n_layers):
        senders = [Node(c2, Site.RESID_PRE, pos=source)] + [Node(c1, Site.ATTN_OUT, pos=p)
                                                           for p in via for c1 in range(c2)]
        for rec, site in (("k", Site.K), ("v", Site.V)):
            specs.append((f"joint -> L{c2} ({rec})", "joint", rec, "mixed", (c2,), None, [senders],
                          [Node(c2, site, pos=q, head=g) for q in [source, *via] for g in range(arch.n_kv_heads)]))
    effects = torch.zeros(len(specs), n, dtype=torch.float64)
    total = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        m = metric(clean[i], i)
        for j, (_, _, _, _, _, _, sender, receivers) in enumerate(specs):
            res = path_patch(model, clean[i: i + 1], corrupt[i: i + 1], m, sender, receivers, stream="kv",
                             reader=[target])
            effects[j, i] = float(res.values.reshape(-1)[0]) - res.corrupt_metric
            total[i] = res.clean_metric - res.corrupt_metric
    routes = [RouteEffect(name, kind, rec, first, layers, p, effects[j])
              for j, (name, kind, rec, first, layers, p, _, _) in enumerate(specs)]
    return total, routes


def routes(
    model: HookedTransformer,
    clean_tokens: Int[Tensor, "n pos"] | Batch,
    corrupt_tokens: Int[Tensor, "n pos"] | Batch,
    metric: PerExampleMetric,
    *,
    source: int,
    target: int = -1,
    via: list[int] | None = None,
    baseline: HookedTransformer | None = None,
    seed: int = 0,
) -> RoutesResult:
    """Decompose the clean-vs-corrupted effect at `target` into residual-first and K/V-first routes.

    `clean_tokens` and `corrupt_tokens` differ at `source` (the information's origin).
    `metric(tokens_row, i)` builds the example's metric (e.g. `logprob(answer[i])`), read at
    `target`. `via`: intermediate positions for two-step routes (default: every position strictly
    between source and target).
    """
    arch = Arch.of(model)
    clean_tokens = unpadded(clean_tokens, arch.d_vocab, "clean_tokens", "routes", n_ctx=arch.n_ctx)
    corrupt_tokens = unpadded(corrupt_tokens, arch.d_vocab, "corrupt_tokens", "routes", n_ctx=arch.n_ctx)
    if clean_tokens.shape != corrupt_tokens.shape:
        raise ValueError(f"corrupt_tokens: expected shape {tuple(clean_tokens.shape)}, got {tuple(corrupt_tokens.shape)}")
    seq = clean_tokens.shape[1]
    t = target % seq
    if not 0 <= source < t:
        raise ValueError(f"source: expected a position before the target {t}, got {source}")
    via = list(range(source + 1, t)) if via is None else list(via)
    if any(not source < p < t for p in via):
        raise ValueError(f"via: expected positions strictly between source {source} and target {t}, got {via}")
    total, found = _route_effects(model, clean_tokens, corrupt_tokens, metric, source, t, via)
    base = random_like(model, seed) if baseline is None else baseline
    b_total, b_routes = _route_effects(base, clean_tokens, corrupt_tokens, metric, source, t, via)

    tot, b_tot = estimate(total), estimate(b_total)
    single = [r for r in found if r.kind != "joint"]
    best = max(single, key=lambda r: float(r.effect.mean()))
    best_e = best.estimate()
    b_best = next(r for r in b_routes if r.name == best.name).estimate()
    shows = tot.low > 0
    behaviour_reason = None if shows else (
        f"the clean run does not show the behaviour: its metric minus the corrupted run's is {tot} (CI not above "
        f"0), so there is no effect to decompose into routes")
    if not shows:
        verdict = Verdict(False, behaviour_reason)
    elif not best_e.above(b_best):
        verdict = Verdict(False, f"the total effect {tot} or its largest route {best.name} {best_e} does not clear "
                                 f"the random-initialised baseline (total {b_tot}, same route {b_best})")
    else:
        share = float(best.effect.mean() / total.mean())
        joint = max((r for r in found if r.kind == "joint"), key=lambda r: float(r.effect.mean()))
        verdict = Verdict(True, (
            f"The largest single route is {best.name} ({best.first_stream}-first, through the "
            f"{'keys' if best.receiver == 'k' else 'values'}): {best_e} of a total {tot} ({share:.0%}); all routes "
            f"into {joint.name.removeprefix('joint -> ')} together carry {joint.estimate()} "
            f"({float(joint.effect.mean() / total.mean()):.0%}) (random-initialised baseline total {b_tot})."))
    return RoutesResult(model.cfg.model_name, source, t, arch.n_layers, total, tuple(found), b_total, verdict,
                        meta={"n": int(clean_tokens.shape[0]), "via": via}, clean_shows_behaviour=shows,
                        behaviour_reason=behaviour_reason)
