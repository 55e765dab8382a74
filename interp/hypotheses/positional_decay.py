"""Positional-information decay: how do decodable position and the use of a fact fade?

Three measurements per model (typically the same task under different positional schemes:
learned absolute, rotary, none — Haviv et al. 2022 show NoPE models still learn position):

(a) Probes, by layer: absolute position (ridge R^2 over many positions per prompt, split by
    prompt; only real tokens are sampled, never pads) and the distance from the query to the
    needed fact (at each prompt's own query position), with bootstrap CIs and a shuffled-label
    baseline.
(b) Accuracy as a function of the needed fact's distance d, measured per prompt (tokens from
    the span `fact`'s last token to the last prompt token), prompts of any lengths grouped
    by d (or by distance bins) inside one call.
(c) Causal use: knock out the read-out's attention to the fact's tokens at every layer; the
    drop in the answer's log-prob as a function of d, with a fitted exponential decay
    drop(d) = a * exp(-d / tau) + c. A decay length is reported only when the measured curve
    falls monotonically (within its CIs) and tau lies strictly inside the optimiser's bounds; a
    fit at a bound says the data do not constrain a length (`DecayFit.length` is None, with the
    reason). A lost-in-the-middle profile (Liu et al. 2023) would show
    middle distances below both ends; tiny from-scratch models may show recency only — we report
    what is measured.

Baseline: a random-initialised model of the same shape (accuracy at chance, no decay to speak
of); no verdict unless the trained models clear it. Per model, `interp.baseline`'s policy:
``baseline="auto"`` builds it only for a model of at most 1 GiB (after that model's own
measurements, released before the next model); without one, that model gets no claim and its
`baseline_note` says why. A model whose clean accuracy at the shortest
distance does not clear its baseline does not show the behaviour
(`SchemeDecay.clean_shows_behaviour` False, with the reason): it gets no profile and no decay
length.
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

from interp.arch import Arch, Model
from interp.baseline import BaselineSpec, baseline_for
from interp.hypotheses.base import (
    Outcome,
    Verdict,
    estimate,
    run_outcomes,
)
from interp.lens.residual import layer_labels, residual_stack
from interp.metrics import answer_logprob, top1
from interp.patching import knockout
from interp.probing import ProbeResult, fit
from interp.prompts import ANSWER, LAST, Prompts, as_prompts
from interp.stats import Estimate
from interp.tokens import Batch, check_tokens


@dataclass(frozen=True)
class DecayFit:
    """drop(d) = a exp(-d / tau) + c fitted to the knockout drops (a, tau, c NaN when the fit fails).

    `length` (tokens) is tau only when the curve decays: the measured drops never rise with
    distance (beyond the tolerance), a > 0, and tau lies strictly inside the optimiser's bounds
    `tau_bounds`. Otherwise `length` is None and `reason` says why: a tau at a bound is the
    optimiser's limit, not a measurement."""

    a: float
    tau: float
    c: float
    length: float | None
    reason: str | None = None
    tau_bounds: tuple[float, float] = (math.nan, math.nan)

    @property
    def decays(self) -> bool:
        return self.length is not None


@dataclass(frozen=True)
class SchemeDecay:
    """Everything measured for one model."""

    name: str
    position_probe: ProbeResult
    distance_probe: ProbeResult
    clean: dict[int, Outcome]  # distance -> outcomes
    knocked: dict[int, Outcome]  # distance -> outcomes with the fact's K/V knocked out at every layer
    baseline_clean: dict[int, Outcome]
    decay_fit: DecayFit
    profile: str | None  # None when the clean run does not show the behaviour
    clean_shows_behaviour: bool = True
    behaviour_reason: str | None = None  # why not, when clean_shows_behaviour is False
    rows: dict[int, Tensor] = field(default_factory=dict)  # distance -> the prompts' rows in that group
    baseline_note: str | None = None  # the baseline compared with, or why there is none (interp.baseline)

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
                b = m.baseline_clean.get(d)
                for analysis, est, base in (
                        ("accuracy", m.accuracy(d), estimate(b.correct) if b is not None else None),
                        ("knockout_drop", m.drop(d), None)):
                    rows.append({"model": name, "analysis": analysis, "layer": np.nan, "distance": d,
                                 "value": est.value, "ci_low": est.low, "ci_high": est.high,
                                 "baseline": base.value if base else np.nan})
        return pd.DataFrame(rows)

    def plot(self, training_length: int | None = None) -> go.Figure:
        """Four panels: absolute-position and distance probes by layer (R², shuffled-label
        baseline dotted), accuracy and the knockout drop by the fact's distance (random-init
        accuracy dashed); colour = the model (positional scheme). `training_length`: the longest
        distance seen in training, drawn as a reference line."""
        from interp import viz

        frame = self.to_frame()
        fig = make_subplots(rows=2, cols=2, horizontal_spacing=0.1, vertical_spacing=0.2, subplot_titles=(
            "absolute position decodable (ridge probe)", "distance to the fact decodable (ridge probe)",
            "accuracy vs the fact's distance", "causal use: drop in log p(answer) when the fact is knocked out"))
        cells = ((1, 1, "position_r2", "layer"), (1, 2, "distance_r2", "layer"),
                 (2, 1, "accuracy", "distance"), (2, 2, "knockout_drop", "distance"))
        for i, name in enumerate(self.models):
            short = name.removeprefix("retrieval-")
            c = viz.color(short, i)
            for row, col, analysis, x in cells:
                sub = frame[(frame.analysis == analysis) & (frame.model == name)].sort_values(x)
                hover = [self.labels[int(v)] for v in sub[x]] if x == "layer" else [f"d = {int(v)}" for v in sub[x]]
                viz.line(fig, sub[x], sub.value, name=f"{name} (trained)", color_=c, low=sub.ci_low,
                         high=sub.ci_high, row=row, col=col, legendgroup=name, showlegend=(row, col) == (1, 1),
                         hover_x=hover, unit="nats" if analysis == "knockout_drop" else "")
                if analysis in ("position_r2", "distance_r2", "accuracy"):
                    kind = viz.REFERENCE if analysis != "accuracy" else viz.BASELINE
                    label = "shuffled labels" if analysis != "accuracy" else "random-init"
                    viz.line(fig, sub[x], sub.baseline, name=f"{name} ({label})", color_=c, model=kind,
                             row=row, col=col, legendgroup=f"{name} {label}",
                             showlegend=(row, col) in ((1, 1), (2, 1)), hover_x=hover)
        for col in (1, 2):
            fig.update_xaxes(**viz.layer_ticks(self.labels), row=1, col=col)
            fig.update_xaxes(title_text="distance from the query to the needed fact (tokens)", row=2, col=col)
        fig.update_yaxes(title_text="probe R² (held-out prompts)", row=1, col=1)
        fig.update_yaxes(title_text="probe R² (held-out prompts)", row=1, col=2)
        viz.accuracy_axis(fig, row=2, col=1, title="top-1 accuracy (fraction of prompts)")
        fig.update_yaxes(title_text="drop in log p(answer) (nats)", row=2, col=2)
        if training_length is not None:
            for col in (1, 2):
                viz.reference(fig, x=training_length, text=f"longest distance in training ({training_length})",
                              row=2, col=col, dash="dash")
        n = sorted({int(m.clean[d].correct.numel()) for m in self.models.values() for d in m.clean})
        return viz.finish(fig, title="Positional-information decay across positional schemes",
                          caption=f"{n[0] if len(n) == 1 else f'{n[0]}-{n[-1]}'} prompts per distance. Colour: the "
                                  f"model; solid: trained; dashed: random-initialised model of the same shape; "
                                  f"dotted: probe on shuffled labels. Bands: {viz.CI_TEXT}.",
                          height=640)


def _fit_decay(d: Sequence[int], y: Sequence[float], tolerance: float = 0.0) -> DecayFit:
    """Fit drop(d) = a exp(-d / tau) + c; a length only for a monotone decay fitted inside the bounds.

    `tolerance`: how far (in y's units) a later distance may rise above an earlier one and still
    count as noise (positional_decay passes the drops' largest CI half-width)."""
    from scipy.optimize import curve_fit

    x, v = np.asarray(d, dtype=float), np.asarray(y, dtype=float)
    order = np.argsort(x)
    x, v = x[order], v[order]
    # a tau beyond 10x the longest distance is a straight line over the measured range, one below
    # a tenth of the shortest is a step before the first point: neither is constrained by the data
    lo, hi = float(x.min()) / 10, 10 * float(x.max())
    try:
        (a, tau, c), _ = curve_fit(lambda t, a, tau, c: a * np.exp(-t / tau) + c, x, v,
                                   p0=(max(v.max() - v.min(), 1e-3), min(max(x.mean(), 1.0), hi / 2), v.min()),
                                   bounds=([-np.inf, lo, -np.inf], [np.inf, hi, np.inf]), maxfev=20000)
    except (RuntimeError, ValueError) as e:
        return DecayFit(math.nan, math.nan, math.nan, None, f"the exponential fit failed ({e})", (lo, hi))
    a, tau, c = float(a), float(tau), float(c)
    rises = [(i, j) for i in range(len(v)) for j in range(i + 1, len(v)) if v[j] > v[i] + tolerance]
    reason = None
    if rises:
        i, j = max(rises, key=lambda ij: v[ij[1]] - v[ij[0]])
        reason = (f"the curve is not monotone: it rises from {v[i]:.3g} at d={x[i]:g} to {v[j]:.3g} at "
                  f"d={x[j]:g}")
    elif a <= 0:
        reason = f"the fitted curve does not fall with distance (a = {a:.3g})"
    elif tau >= hi * (1 - 1e-2) or tau <= lo * (1 + 1e-2):
        reason = (f"the fitted length {tau:.3g} sits at the optimiser's bound [{lo:.3g}, {hi:.3g}]: "
                  f"the measured distances do not constrain a decay length")
    return DecayFit(a, tau, c, None if reason else tau, reason, (lo, hi))


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


def sample_positions(lengths: Int[Tensor, "n"], k: int, generator: torch.Generator
                     ) -> tuple[Int[Tensor, "n k"], torch.Tensor]:
    """Up to `k` distinct real positions per prompt (never a pad: each prompt's positions are
    0..length-1 in the right-padded layout), and the mask of the filled slots. Prompts shorter
    than `k` fill their spare slots with their first draw (masked out)."""
    cols = torch.zeros(len(lengths), k, dtype=torch.long)
    valid = torch.zeros(len(lengths), k, dtype=torch.bool)
    for i, length in enumerate(lengths.tolist()):
        draw = torch.randperm(int(length), generator=generator)[:k]
        cols[i] = draw[0]
        cols[i, : len(draw)] = draw
        valid[i, : len(draw)] = True
    return cols, valid


def distance_groups(prompts: Prompts, fact: str = "fact", bins: Sequence[int] | None = None
                    ) -> tuple[Tensor, dict[int, Tensor]]:
    """Each prompt's distance (tokens from the fact's last token to the last prompt token) and the
    prompts of each distance group (`bins`: upper edges, each prompt in the first edge >= its
    distance; None: one group per distinct distance), in ascending order, rows in prompt order."""
    dist = prompts.index(LAST) - prompts.index(fact)
    if bool((dist < 1).any()):
        i = int(torch.nonzero(dist < 1)[0, 0])
        raise ValueError(f"span {fact!r} of prompt {i}: expected it before the last prompt token, got distance "
                         f"{int(dist[i])}")
    if bins is None:
        label = dist
    else:
        edges = torch.tensor(sorted(int(x) for x in bins))
        if edges.numel() == 0 or bool((dist > edges[-1]).any()):
            raise ValueError(f"bins: expected upper edges covering every distance (max {int(dist.max())}), got "
                             f"{edges.tolist()}")
        label = edges[torch.searchsorted(edges, dist)]
    groups = {int(d): torch.nonzero(label == d)[:, 0] for d in sorted(set(label.tolist()))}
    return dist, groups


def positional_decay(
    models: Mapping[str, Model],
    prompts: Prompts,
    *,
    fact: str = "fact",
    bins: Sequence[int] | None = None,
    position_prompts: Prompts | Batch | Tensor | None = None,
    positions_per_prompt: int = 16,
    baseline: Mapping[str, Model | BaselineSpec] | Model | BaselineSpec | None = "auto",
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> DecayResult:
    """Probe, accuracy-vs-distance and knockout-vs-distance curves for each model, in one call.

    `prompts`: prompts of any lengths (padded left or right) with answers and a span `fact` (the
    tokens holding the needed fact). Each prompt's distance is measured on its own: from the
    fact's last token to its last prompt token (the read-out); prompts are grouped by distance
    (`bins`: upper edges of distance bins; default: one group per distinct distance) inside.
    `position_prompts`: prompts for the absolute-position probe (only real tokens are sampled);
    default: `prompts`. `baseline`: for every model, or per model name (a mapping; a name it lacks
    gets "auto"), the comparison model, "random", "none" or "auto" (`interp.baseline`: a
    random-initialised model of the same shape only for a model of at most 1 GiB; None means "auto").
    """
    if not models:
        raise ValueError("positional_decay: expected at least one model, got none")
    if positions_per_prompt < 1:
        raise ValueError(f"positions_per_prompt: expected at least 1, got {positions_per_prompt}")
    p = as_prompts(prompts).right()
    if p.answers is None:
        raise ValueError("positional_decay prompts: expected answers, got none; build them with answers=...")
    if fact not in p.spans:
        raise ValueError(f"positional_decay prompts: expected a span {fact!r} (the needed fact), got spans "
                         f"{sorted(p.spans)}")
    dist, groups = distance_groups(p, fact, bins)
    if len(groups) < 3:
        raise ValueError(f"prompts: expected at least 3 distances (or bins) to see a decay, got {sorted(groups)}")
    distances = tuple(groups)
    g = torch.Generator().manual_seed(seed)
    pos_batch = as_prompts(p if position_prompts is None else position_prompts).right()
    n_layers = {Arch.of(m).n_layers for m in models.values()}
    labels = tuple(layer_labels(max(n_layers)))
    last = p.index(LAST)
    out: dict[str, SchemeDecay] = {}
    for name, model in models.items():
        arch = Arch.of(model)
        check_tokens(p.tokens, arch.d_vocab, name="prompts", n_ctx=arch.n_ctx)
        choice = baseline.get(name, "auto") if isinstance(baseline, Mapping) else baseline
        plan = baseline_for(model, choice, seed=seed, what=f"baseline for {name!r}")
        # (a) probes: absolute position at sampled real tokens ...
        cols, valid = sample_positions(pos_batch.lengths, positions_per_prompt, g)
        rows = torch.arange(len(cols))[:, None].expand_as(cols)
        acts = residual_stack(model, pos_batch.tokens, positions=cols, progress=progress)  # [layer, n, k, d]
        feats = acts[:, valid].float()
        position_probe = fit(feats, cols[valid].double(), "ridge", groups=rows[valid], seed=seed,
                             meta={"model": name, "target": "absolute position", "position": "sampled"})
        # ... and the distance to the fact at each prompt's own last prompt token (one run per group)
        order = torch.cat(list(groups.values()))
        acts_q = torch.cat([residual_stack(model, p.select(idx).tokens, positions=last[idx][:, None],
                                           progress=progress)[:, :, 0] for idx in groups.values()], dim=1)
        distance_probe = fit(acts_q.float(), dist[order].double(), "ridge", seed=seed,
                             meta={"model": name, "target": "distance to fact", "position": "last"})
        # (b) accuracy and (c) knockout of the read-out's attention to the fact, per distance group
        clean, knocked = {}, {}
        for d, idx in groups.items():
            sub = p.select(idx)
            clean[d] = run_outcomes(model, sub, batch_size=batch_size)
            # the read-out span's attention to the fact's tokens, blocked at every layer
            k_top, k_lp = (knockout(model, sub, m, at=ANSWER, sources=fact, start_layers=[0], rows=batch_size)
                           for m in (top1(), answer_logprob()))
            knocked[d] = Outcome(k_top.per_example[0], k_lp.per_example[0], k_top.kl_per_example[0].clamp_min(0))
        b_clean = plan.run(model, lambda m: {d: run_outcomes(m, p.select(idx), batch_size=batch_size)
                                             for d, idx in groups.items()}) or {}
        near = distances[0]
        acc_near, lp_near = estimate(clean[near].correct), estimate(clean[near].logprob)
        if b_clean:
            base_near, b_lp_near = estimate(b_clean[near].correct), estimate(b_clean[near].logprob)
        # the behaviour: retrieval at the shortest distance, by top-1 or (a real model whose top-1 is
        # rarely exactly the answer) by log p(answer) above the random-initialised model's
        shows = bool(b_clean) and (acc_near.above(base_near) or lp_near.above(b_lp_near))
        if shows:
            drop_est = [estimate(clean[d].logprob - knocked[d].logprob) for d in distances]
            tol = max((e.high - e.low) / 2 for e in drop_est)
            decay_fit = _fit_decay(distances, [e.value for e in drop_est], tolerance=tol)
            why, profile = None, _profile([estimate(clean[d].correct) for d in distances])
        else:
            why = (f"clean accuracy {acc_near} (log p(answer) {lp_near}) at d={near} does not clear the "
                   f"random-initialised baseline {base_near} ({b_lp_near}): the model does not retrieve, so there is "
                   f"no decay to measure" if b_clean else
                   f"unbaselined, so no claim is made (baseline: {plan.note}); measured without it: clean accuracy "
                   f"{acc_near} at d={near}, {estimate(clean[distances[-1]].correct)} at d={distances[-1]}")
            decay_fit, profile = DecayFit(math.nan, math.nan, math.nan, None, why), None
        out[name] = SchemeDecay(name, position_probe, distance_probe, clean, knocked, b_clean, decay_fit, profile,
                                clean_shows_behaviour=shows, behaviour_reason=why,
                                rows={d: idx for d, idx in groups.items()}, baseline_note=plan.note)

    verdict = _verdict(out, distances)
    return DecayResult(out, distances, labels, verdict, meta={"positions_per_prompt": positions_per_prompt,
                                                              "distance": dist, "fact": fact})


def _verdict(models: Mapping[str, SchemeDecay], distances: tuple[int, ...]) -> Verdict:
    near, far = distances[0], distances[-1]
    usable = {k: m for k, m in models.items() if m.clean_shows_behaviour}
    unbaselined = {k: m for k, m in models.items() if not m.baseline_clean}
    if not usable:
        if unbaselined:
            return Verdict(False, "; ".join(f"{k}: {m.behaviour_reason}" for k, m in unbaselined.items())
                           + "".join(f"; {k}: its accuracy at the shortest distance does not clear its "
                                     f"random-initialised baseline" for k in models if k not in unbaselined))
        return Verdict(False, "no model's accuracy at the shortest distance clears its random-initialised baseline")
    parts = []
    for k, m in usable.items():
        a_near, a_far = m.accuracy(near), m.accuracy(far)
        decays = a_far.high < a_near.low
        fit = m.decay_fit
        # a causal decay is claimed only when the knockout effect at the nearest distance is above
        # the farthest one (CIs apart); the fitted length is reported with it
        drops = f"drop {m.drop(near).value:.2f} nats at d={near}, {m.drop(far).value:.2f} at d={far}"
        if m.drop(near).above(m.drop(far)) and fit.length is not None:
            decay = f"knockout effect decays (fitted length {fit.length:.0f} tokens; {drops})"
        elif m.drop(near).above(m.drop(far)):
            decay = f"knockout effect falls with distance ({drops}) but has no decay length: {fit.reason}"
        else:
            decay = f"knockout effect does not decay ({drops})"
        r2 = m.position_probe
        best = int(r2.value.argmax())
        parts.append(f"{k}: accuracy {a_near} at d={near} -> {a_far} at d={far}"
                     f"{' (decays)' if decays else ''}, profile '{m.profile}', {decay}, absolute position "
                     f"decodable with R² {float(r2.value[best]):.2f} [{float(r2.ci_low[best]):.2f}, "
                     f"{float(r2.ci_high[best]):.2f}] (shuffled {float(r2.shuffled[best]):.2f})")
    skipped = "".join(f" ({k}: no claim, {m.behaviour_reason})" for k, m in unbaselined.items())
    if len(usable) == 1:
        return Verdict(True, "Measured — " + parts[0] + "." + skipped)
    differ = [(a, b) for a in usable for b in usable if a < b and
              (usable[a].accuracy(far).above(usable[b].accuracy(far)) or
               usable[b].accuracy(far).above(usable[a].accuracy(far)))]
    sentence = (f"Positional schemes differ at the longest distance ({', '.join(f'{a} vs {b}' for a, b in differ)}) — "
                if differ else "Schemes are not distinguishable at the longest distance — ")
    return Verdict(True, sentence + "; ".join(parts) + "." + skipped)
