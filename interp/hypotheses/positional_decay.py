"""Positional-information decay: how do decodable position and the use of a fact fade?

Three measurements per model (typically the same task under different positional schemes:
learned absolute, rotary, none — Haviv et al. 2022 show NoPE models still learn position):

(a) Probes, by layer: absolute position (ridge R^2 over many positions per prompt, split by
    prompt) and the distance from the query to the needed fact (at the query position), with
    bootstrap CIs and a shuffled-label baseline.
(b) Accuracy as a function of the needed fact's distance d (prompts grouped by d).
(c) Causal use: knock out the query's attention to the fact's positions at every layer; the
    drop in the answer's log-prob as a function of d, with a fitted exponential decay
    drop(d) = a * exp(-d / tau) + c. A lost-in-the-middle profile (Liu et al. 2023) would show
    middle distances below both ends; tiny from-scratch models may show recency only — we report
    what is measured.

Baseline: a random-initialised model of the same shape (accuracy at chance, no decay to speak
of); no verdict unless the trained models clear it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Int
from plotly.subplots import make_subplots
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.arch import Arch
from interp.hooks import block_attention
from interp.hypotheses.base import Outcome, Verdict, estimate, random_like, readout
from interp.lens.residual import layer_labels, residual_stack
from interp.probing import ProbeResult, fit
from interp.stats import Estimate
from interp.tokens import check_tokens


@dataclass(frozen=True)
class DistanceSet:
    """Prompts whose needed fact sits at one distance: the fact's positions are the same in all."""

    tokens: Int[Tensor, "n pos"]
    answer: Int[Tensor, "n"]
    fact_pos: tuple[int, ...]  # positions holding the fact (e.g. key and value)
    query_pos: int = -1

    def __post_init__(self) -> None:
        check_tokens(self.tokens)
        if self.answer.shape != (self.tokens.shape[0],):
            raise ValueError(f"DistanceSet.answer: expected shape ({self.tokens.shape[0]},), "
                             f"got {tuple(self.answer.shape)}")
        q = self.query_pos % self.tokens.shape[1]
        if not self.fact_pos or any(not 0 <= p < q for p in self.fact_pos):
            raise ValueError(f"DistanceSet.fact_pos: expected positions before the query ({q}), got {self.fact_pos}")


@dataclass(frozen=True)
class SchemeDecay:
    """Everything measured for one model."""

    name: str
    position_probe: ProbeResult
    distance_probe: ProbeResult
    clean: dict[int, Outcome]  # distance -> outcomes
    knocked: dict[int, Outcome]  # distance -> outcomes with the fact's K/V knocked out at every layer
    baseline_clean: dict[int, Outcome]
    decay_fit: dict[str, float]  # a, tau, c of drop(d) = a exp(-d/tau) + c (NaN when the fit fails)
    profile: str

    def accuracy(self, d: int) -> Estimate:
        return estimate(self.clean[d].correct)

    def drop(self, d: int) -> Estimate:
        return estimate(self.clean[d].logprob - self.knocked[d].logprob)


@dataclass(frozen=True)
class DecayResult:
    models: dict[str, SchemeDecay]
    distances: tuple[int, ...]
    labels: tuple[str, ...]
    verdict: Verdict
    meta: dict = field(default_factory=dict)

    @property
    def values(self) -> Tensor:
        """[model, distance] accuracy."""
        return torch.tensor([[m.clean[d].correct.mean().item() for d in self.distances]
                             for m in self.models.values()])

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for name, m in self.models.items():
            for analysis, probe in (("position_r2", m.position_probe), ("distance_r2", m.distance_probe)):
                for _, r in probe.to_frame().iterrows():
                    rows.append({"model": name, "analysis": analysis, "layer": int(r.layer), "distance": np.nan,
                                 "value": r.value, "ci_low": r.ci_low, "ci_high": r.ci_high,
                                 "baseline": r.shuffled})
            for d in self.distances:
                for analysis, est, base in (
                        ("accuracy", m.accuracy(d), estimate(m.baseline_clean[d].correct)),
                        ("knockout_drop", m.drop(d), None)):
                    rows.append({"model": name, "analysis": analysis, "layer": np.nan, "distance": d,
                                 "value": est.value, "ci_low": est.low, "ci_high": est.high,
                                 "baseline": base.value if base else np.nan})
        return pd.DataFrame(rows)

    def plot(self) -> go.Figure:
        frame = self.to_frame()
        fig = make_subplots(rows=1, cols=4, subplot_titles=(
            "absolute position: probe R²", "distance to fact: probe R²", "accuracy vs distance",
            "knockout: drop in log p(answer)"))
        palette = {name: c for name, c in zip(self.models, ["#1f77b4", "#d62728", "#2ca02c", "#9467bd",
                                                             "#ff7f0e"], strict=False)}
        for col, analysis, x in ((1, "position_r2", "layer"), (2, "distance_r2", "layer"),
                                 (3, "accuracy", "distance"), (4, "knockout_drop", "distance")):
            for name, sub in frame[frame.analysis == analysis].groupby("model", sort=False):
                sub = sub.sort_values(x)
                xs = [self.labels[int(v)] for v in sub[x]] if x == "layer" else sub[x]
                fig.add_trace(go.Scatter(x=xs, y=sub.value, mode="lines+markers", name=name, legendgroup=name,
                                         showlegend=col == 1, line=dict(color=palette.get(name)),
                                         error_y=dict(type="data", symmetric=False, array=sub.ci_high - sub.value,
                                                      arrayminus=sub.value - sub.ci_low)), row=1, col=col)
                if analysis == "knockout_drop":
                    fitp = self.models[name].decay_fit
                    if all(math.isfinite(v) for v in fitp.values()):
                        d = np.linspace(min(self.distances), max(self.distances), 50)
                        fig.add_trace(go.Scatter(x=d, y=fitp["a"] * np.exp(-d / fitp["tau"]) + fitp["c"],
                                                 mode="lines", line=dict(dash="dot", color=palette.get(name)),
                                                 name=f"{name} fit", showlegend=False), row=1, col=col)
        fig.update_layout(title="Positional-information decay", template="plotly_white", height=430)
        return fig


def _fit_decay(d: Sequence[int], y: Sequence[float]) -> dict[str, float]:
    from scipy.optimize import curve_fit

    x, v = np.asarray(d, dtype=float), np.asarray(y, dtype=float)
    try:
        (a, tau, c), _ = curve_fit(lambda t, a, tau, c: a * np.exp(-t / tau) + c, x, v,
                                   p0=(max(v.max() - v.min(), 1e-3), max(x.mean(), 1.0), v.min()),
                                   bounds=([-np.inf, 1e-3, -np.inf], [np.inf, 1e6, np.inf]), maxfev=20000)
        return {"a": float(a), "tau": float(tau), "c": float(c)}
    except (RuntimeError, ValueError):
        return {"a": math.nan, "tau": math.nan, "c": math.nan}


def _profile(acc: Sequence[Estimate]) -> str:
    """'lost in the middle' (middle third below both ends), 'recency' (falls with distance),
    'primacy' (rises with distance) or 'flat'."""
    k = max(1, len(acc) // 3)
    near, mid, far = acc[:k], acc[k:len(acc) - k], acc[len(acc) - k:]
    mean = lambda xs: sum(e.value for e in xs) / max(len(xs), 1)  # noqa: E731
    hi = lambda xs: max(e.high for e in xs)  # noqa: E731
    lo = lambda xs: min(e.low for e in xs)  # noqa: E731
    if mid and hi(mid) < lo(near) and hi(mid) < lo(far):
        return "lost in the middle"
    if mean(far) < mean(near) and hi(far) < lo(near):
        return "recency"
    if mean(near) < mean(far) and hi(near) < lo(far):
        return "primacy"
    return "flat"


def positional_decay(
    models: Mapping[str, HookedTransformer],
    by_distance: Mapping[int, DistanceSet],
    *,
    position_tokens: Int[Tensor, "n pos"] | None = None,
    positions_per_prompt: int = 16,
    baseline: Mapping[str, HookedTransformer] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> DecayResult:
    """Probe, accuracy-vs-distance and knockout-vs-distance curves for each model.

    `by_distance`: prompts grouped by the distance of the needed fact. `position_tokens`: prompts
    for the absolute-position probe (default: all prompts of `by_distance`).
    """
    if not models:
        raise ValueError("positional_decay: expected at least one model, got none")
    if len(by_distance) < 3:
        raise ValueError(f"by_distance: expected at least 3 distances to see a decay, got {len(by_distance)}")
    distances = tuple(sorted(by_distance))
    g = torch.Generator().manual_seed(seed)
    all_tokens = torch.cat([by_distance[d].tokens for d in distances])
    pos_tokens = all_tokens if position_tokens is None else check_tokens(position_tokens)
    dist_labels = torch.cat([torch.full((len(by_distance[d].tokens),), float(d)) for d in distances])
    n_layers = {Arch.of(m).n_layers for m in models.values()}
    labels = tuple(layer_labels(max(n_layers)))
    out: dict[str, SchemeDecay] = {}
    for name, model in models.items():
        base = (baseline or {}).get(name) or random_like(model, seed)
        # (a) probes
        acts = residual_stack(model, pos_tokens, progress=progress)  # [layer, n, pos, d]
        n, p = pos_tokens.shape[:2]
        cols = torch.stack([torch.randperm(p, generator=g)[:positions_per_prompt] for _ in range(n)])
        rows = torch.arange(n)[:, None].expand_as(cols)
        feats = acts[:, rows.flatten(), cols.flatten()].float()
        position_probe = fit(feats, cols.flatten().double(), "ridge", groups=rows.flatten(), seed=seed,
                             meta={"model": name, "target": "absolute position", "position": "sampled"})
        acts_q = residual_stack(model, all_tokens, progress=progress)
        q = by_distance[distances[0]].query_pos
        distance_probe = fit(acts_q[:, :, q].float(), dist_labels.double(), "ridge", seed=seed,
                             meta={"model": name, "target": "distance to fact", "position": "query"})
        # (b) accuracy and (c) knockout, per distance
        clean, knocked, b_clean = {}, {}, {}
        for d in distances:
            s = by_distance[d]
            qpos = s.query_pos % s.tokens.shape[1]
            ref = readout(model, s.tokens, pos=s.query_pos, batch_size=max(256, len(s.tokens)))
            clean[d] = Outcome.of(ref, s.answer)
            blocks = [block_attention(layer, qpos, list(s.fact_pos)) for layer in range(Arch.of(model).n_layers)]
            knocked[d] = Outcome.of(readout(model, s.tokens, blocks, pos=s.query_pos,
                                            batch_size=max(256, len(s.tokens))), s.answer, ref)
            b_clean[d] = Outcome.of(readout(base, s.tokens, pos=s.query_pos, batch_size=max(256, len(s.tokens))),
                                    s.answer)
        drops = [float((clean[d].logprob - knocked[d].logprob).mean()) for d in distances]
        out[name] = SchemeDecay(name, position_probe, distance_probe, clean, knocked, b_clean,
                                _fit_decay(distances, drops), _profile([estimate(clean[d].correct) for d in distances]))

    verdict = _verdict(out, distances)
    return DecayResult(out, distances, labels, verdict, meta={"positions_per_prompt": positions_per_prompt})


def _verdict(models: Mapping[str, SchemeDecay], distances: tuple[int, ...]) -> Verdict:
    near, far = distances[0], distances[-1]
    usable = {k: m for k, m in models.items()
              if m.accuracy(near).above(estimate(m.baseline_clean[near].correct))}
    if not usable:
        return Verdict(False, "no model's accuracy at the shortest distance clears its random-initialised baseline")
    parts = []
    for k, m in usable.items():
        a_near, a_far = m.accuracy(near), m.accuracy(far)
        decays = a_far.high < a_near.low
        fit = m.decay_fit
        # a causal decay is claimed only when the knockout effect at the nearest distance is above
        # the farthest one (CIs apart); the fitted length is reported with it
        if m.drop(near).above(m.drop(far)) and math.isfinite(fit["tau"]) and fit["a"] > 0:
            decay = f"knockout effect decays (fitted length {fit['tau']:.0f} tokens)"
        else:
            decay = (f"knockout effect does not decay (drop {m.drop(near).value:.2f} nats at d={near}, "
                     f"{m.drop(far).value:.2f} at d={far})")
        r2 = m.position_probe
        best = int(r2.value.argmax())
        parts.append(f"{k}: accuracy {a_near} at d={near} -> {a_far} at d={far}"
                     f"{' (decays)' if decays else ''}, profile '{m.profile}', {decay}, absolute position "
                     f"decodable with R² {float(r2.value[best]):.2f} [{float(r2.ci_low[best]):.2f}, "
                     f"{float(r2.ci_high[best]):.2f}] (shuffled {float(r2.shuffled[best]):.2f})")
    if len(usable) == 1:
        return Verdict(True, "Measured — " + parts[0] + ".")
    differ = [(a, b) for a in usable for b in usable if a < b and
              (usable[a].accuracy(far).above(usable[b].accuracy(far)) or
               usable[b].accuracy(far).above(usable[a].accuracy(far)))]
    sentence = (f"Positional schemes differ at the longest distance ({', '.join(f'{a} vs {b}' for a, b in differ)}) — "
                if differ else "Schemes are not distinguishable at the longest distance — ")
    return Verdict(True, sentence + "; ".join(parts) + ".")
