"""Multi-hop planning: is the bridge entity computed internally, where, and before the answer?

For two-hop prompts ("the capital of the state containing Dallas" -> bridge Texas -> Austin):

(a) Decodability, by layer, at each named position (the last position, and e.g. the queried
    entity's position — Wang et al. 2024 find the bridge at non-final positions): a linear probe
    (interp.probing, multinomial logistic, split by example) for the bridge and for the answer,
    with the Hewitt-Liang control task (a random label per word type, e.g. per fact token) and a
    random-initialised model of the same shape as baselines; and the logit lens's reciprocal
    rank of the bridge and the answer tokens (Biran et al. 2024's EntRec). We report the first
    layer where each becomes decodable and never assume a hop-aligned order (later hops can be
    decodable first).
(b) Causal: interchange intervention. Patch the residual at (layer, position) from a matched
    prompt whose bridge differs; the interchange-intervention accuracy (IIA) is the share of
    prompts whose prediction switches to the partner's answer.
(c) Planning ahead: `plan_ahead` asks whether h_t encodes x_{t+2}, x_{t+3} (the future lens,
    Pal et al. 2023) above bigram and unigram baselines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Int
from plotly.subplots import make_subplots
from torch import Tensor

from interp.arch import Arch, Model, device_of
from interp.arch import model_name as name_of
from interp.baseline import BaselineSpec, baseline_for
from interp.graph import Site
from interp.hypotheses.base import (
    Outcome,
    Verdict,
    chunks,
    curve_frame,
    estimate,
    forward,
    last_logits,
    positions_of,
    prompts_of,
    run_outcomes,
    unbaselined,
)
from interp.lens import future_lens, logit_lens
from interp.lens.future import FutureLensConfig, FutureLensResult
from interp.lens.residual import layer_labels, residual_stack
from interp.metrics import ReadMetric
from interp.patching import sweep
from interp.probing import ProbeResult, fit
from interp.prompts import LAST, Prompts
from interp.stats import Estimate
from interp.tokens import Batch


def _decodable_from(p: ProbeResult, margin: float = 0.0) -> int | None:
    """First layer whose probe CI lies above its control, shuffled and majority baselines."""
    for i, layer in enumerate(p.layers):
        floor = max(float(torch.nan_to_num(p.control[i], nan=0.0)), float(p.shuffled[i]), p.chance)
        if float(p.ci_low[i]) > floor + margin:
            return layer
    return None


@dataclass(frozen=True)
class MultihopResult:
    """Decodability (probes, logit lens) and interchange interventions, per layer and position.

    `iia[position][layer]`: per-example outcome of the patched run w.r.t. the partner's answer
    (first token); `iia_logit_diff[position]`: [layer, n] logit(partner's answer) - logit(own
    answer) at `last` in the patched run (nats; NaN for a prompt without that position), with
    `clean_logit_diff` / `partner_logit_diff` the same difference in the unpatched prompt and in
    the partner run (where the partner's answer is the right one)."""

    model_name: str
    labels: tuple[str, ...]  # lens layers: resid_pre of each block, then the final resid_post
    positions: dict[str, Tensor]  # name -> [n] index in each prompt (prompt coordinates; NaN: none)
    probes: dict[tuple[str, str], ProbeResult]  # (position name, "bridge"|"answer") -> probe over layers
    baseline_probes: dict[tuple[str, str], ProbeResult]
    lens_rr: dict[str, Tensor]  # "bridge"/"answer" -> [layer, n] reciprocal rank at the last position
    iia: dict[str, tuple[Outcome, ...]]  # position name -> per patched layer: outcome w.r.t. partner's answer
    baseline_iia: dict[str, tuple[Outcome, ...]]
    clean: Outcome
    decodable_from: dict[tuple[str, str], int | None]  # all None when the clean run does not show the behaviour
    verdict: Verdict
    meta: dict = field(default_factory=dict)
    clean_shows_behaviour: bool = True  # accuracy above 0 (CI) and at least 0.5, or log p(answer) above baseline
    behaviour_reason: str | None = None  # why not, when clean_shows_behaviour is False
    iia_logit_diff: dict[str, Tensor] = field(default_factory=dict)  # position -> [layer, n]
    baseline_iia_logit_diff: dict[str, Tensor] = field(default_factory=dict)
    clean_logit_diff: Tensor | None = None  # [n]
    partner_logit_diff: Tensor | None = None  # [n]
    baseline_note: str | None = None  # the baseline compared with, or why there is none (interp.baseline)

    @property
    def values(self) -> Tensor:
        """[position, layer] interchange-intervention accuracy (mean over examples)."""
        return torch.stack([torch.stack([_nanmean(o.correct) for o in self.iia[p]]) for p in self.positions])

    @property
    def per_example(self) -> Tensor:
        """[position, layer, n] patched logit difference (partner's answer - own answer), nats."""
        return torch.stack([self.iia_logit_diff[p] for p in self.positions])

    def iia_estimate(self, position: str, layer: int) -> Estimate:
        return estimate(self.iia[position][layer].correct)

    def shift_estimate(self, position: str, layer: int, baseline: bool = False) -> Estimate:
        """Mean shift of the logit difference towards the partner's answer by the patch (nats)."""
        if baseline and not self.baseline_iia_logit_diff:
            raise ValueError(f"shift_estimate(baseline=True): expected a result with a baseline, got none "
                             f"({self.baseline_note})")
        table = self.baseline_iia_logit_diff if baseline else self.iia_logit_diff
        clean = self.meta.get("baseline_clean_logit_diff") if baseline else self.clean_logit_diff
        return estimate(table[position][layer] - clean)

    def to_frame(self) -> pd.DataFrame:
        frames = []
        for (pos, target), p in self.probes.items():
            f = p.to_frame()[["layer", "value", "ci_low", "ci_high", "control", "shuffled", "chance"]]
            frames.append(f.assign(analysis="probe", position=pos, target=target, model="trained", n=p.meta.get("n")))
        for (pos, target), p in self.baseline_probes.items():
            f = p.to_frame()[["layer", "value", "ci_low", "ci_high"]]
            frames.append(f.assign(analysis="probe", position=pos, target=target, model="random-init",
                                   n=p.meta.get("n")))
        for target, rr in self.lens_rr.items():
            frames.append(curve_frame(rr.T.double(), range(rr.shape[0]), "layer", analysis="logit_lens_rr",
                                      position="last", target=target, model="trained"))
        for table, model in ((self.iia, "trained"), (self.baseline_iia, "random-init")):
            for pos, outs in table.items():
                acc = torch.stack([o.correct for o in outs], 1)
                frames.append(curve_frame(acc, range(len(outs)), "layer", analysis="iia", position=pos,
                                          target="partner_answer", model=model))
        for table, model in ((self.iia_logit_diff, "trained"), (self.baseline_iia_logit_diff, "random-init")):
            for pos, ld in table.items():
                frames.append(curve_frame(ld.T.double(), range(ld.shape[0]), "layer", analysis="iia_logit_diff",
                                          position=pos, target="partner_answer", model=model))
        frame = pd.concat(frames, ignore_index=True)
        frame["layer_label"] = [self.labels[int(x)] if int(x) < len(self.labels) else str(x) for x in frame.layer]
        return frame

    def plot(self) -> go.Figure:
        """Three panels over the lens layers: probe accuracy (trained solid, random-init dashed,
        majority-class chance dotted), logit-lens reciprocal rank at the last position, and the
        interchange-intervention accuracy; colour = what is decoded (bridge / answer / partner's answer)."""
        from interp import viz

        frame = self.to_frame()
        fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08, subplot_titles=(
            "linear probe (held-out prompts)", "logit lens at the last position",
            "interchange intervention (patch from a partner prompt)"))
        shown: set[str] = set()
        for col, analysis in ((1, "probe"), (2, "logit_lens_rr"), (3, "iia")):
            sub = frame[frame.analysis == analysis]
            for (pos, target, model), g in sub.groupby(["position", "target", "model"], sort=False):
                g = g.sort_values("layer")
                what = "partner's answer" if target == "partner_answer" else target
                name = f"{what} @ {pos} ({model})"
                viz.line(fig, g.layer, g.value, name=name, color_=viz.color(str(target), 4), model=str(model),
                         low=g.ci_low, high=g.ci_high, row=1, col=col, showlegend=name not in shown,
                         hover_x=g.layer_label)
                shown.add(name)
        chance = frame[(frame.analysis == "probe") & frame.chance.notna()].chance if "chance" in frame else None
        if chance is not None and len(chance):
            viz.reference(fig, y=float(chance.max()), text="majority-class chance", row=1, col=1)
        for col, title in ((1, "probe accuracy (fraction of held-out prompts)"),
                           (2, "reciprocal rank of the token (1 = top-1)"),
                           (3, "IIA: fraction switched to the partner's answer")):
            viz.accuracy_axis(fig, row=1, col=col, title=title)
            fig.update_xaxes(**viz.layer_ticks(self.labels, short=True), row=1, col=col)
        n = int(self.clean.correct.numel())
        return viz.finish(fig, title=f"Multi-hop: where the bridge and the answer appear — {self.model_name}",
                          caption=f"n = {n} prompts. Colour: the decoded token; solid: trained model, dashed: "
                                  f"random-initialised model of the same shape. Bands: {viz.CI_TEXT}.")


def _nanmean(x: Tensor) -> Tensor:
    x = x[torch.isfinite(x)]
    return x.mean() if x.numel() else torch.tensor(float("nan"), dtype=torch.float64)


POS = "multihop:position"  # the one-token span an interchange patches (each prompt's own index)


def _at_last(prompts: Prompts) -> Tensor:
    return (prompts.index(LAST) + prompts.shift())[:, None]


def _partner_metrics() -> dict[str, ReadMetric]:
    """Read at each prompt's `last`: top-1 is the partner's answer, log p(partner's answer), and
    logit(partner's answer) - logit(own answer) (first answer tokens; nats)."""

    def other(x: Tensor, p: Prompts) -> Tensor:
        return p.partner.first_answer.to(x.device)[:, None]  # type: ignore[union-attr]

    return {
        "correct": ReadMetric("partner_top1", _at_last,
                              lambda x, p: (x[:, 0].argmax(-1) == other(x, p)[:, 0]).float()),
        "logprob": ReadMetric("partner_logprob", _at_last,
                              lambda x, p: x[:, 0].float().log_softmax(-1).gather(-1, other(x, p))[:, 0]),
        "logit_diff": ReadMetric("partner_logit_diff", _at_last,
                                 lambda x, p: (x[:, 0].gather(-1, other(x, p))
                                               - x[:, 0].gather(-1, p.first_answer.to(x.device)[:, None]))[:, 0]),
    }


def _interchange(model: Model, p: Prompts, pos: dict[str, Tensor], ppos: dict[str, Tensor],
                 batch_size: int) -> tuple[dict[str, tuple[Outcome, ...]], dict[str, Tensor]]:
    """Patch each lens layer's residual at each named position from the partner (read at the
    partner's own index of that name, written at the prompt's: `interp.patching.sweep` at a
    one-token span, noising direction, so the two prompts may differ in length): per-example
    outcome w.r.t. the partner's first answer token, and the logit difference partner's answer -
    own answer at `last`."""
    n_layers = Arch.of(model).n_layers
    n = len(p)
    metrics = _partner_metrics()
    outs: dict[str, tuple[Outcome, ...]] = {}
    lds: dict[str, Tensor] = {}
    for k in pos:
        i, j = pos[k], ppos[k]
        ok = torch.isfinite(i) & torch.isfinite(j)
        q = p.with_spans(**{POS: torch.where(ok, i, 0).long()}).with_partner(
            p.partner.with_spans(**{POS: torch.where(ok, j, 0).long()}))  # type: ignore[union-attr]
        nan = torch.where(ok, 0.0, float("nan")).double()
        vals = {}
        for name, metric in metrics.items():
            kw = dict(positions=[POS], direction="noising")
            pre = sweep(model, q, metric, site=Site.RESID_PRE, **kw)
            post = sweep(model, q, metric, site=Site.RESID_POST, layers=[n_layers - 1], **kw)
            vals[name] = torch.cat([pre.per_example[:, 0], post.per_example[:, 0]]) + nan  # [lens layer, n]
        zero = torch.zeros(n, dtype=torch.float64) + nan
        outs[k] = tuple(Outcome(vals["correct"][li], vals["logprob"][li], zero) for li in range(n_layers + 1))
        lds[k] = vals["logit_diff"]
    return outs, lds


def _clean_runs(model: Model, p: Prompts, batch_size: int) -> tuple[Outcome, Tensor, Tensor]:
    """The clean outcome, the clean logit difference (partner's answer - own) and the partner run's."""
    own, other = p.first_answer, p.partner.first_answer  # type: ignore[union-attr]
    clean = run_outcomes(model, p, batch_size=batch_size)
    c_ld, p_ld = torch.empty(len(p), dtype=torch.float64), torch.empty(len(p), dtype=torch.float64)
    for rows in chunks(len(p), batch_size):
        sub, psub = p.select(rows), p.partner.select(rows)  # type: ignore[union-attr]
        c = last_logits(forward(model, sub), sub)
        q = last_logits(forward(model, psub), psub)
        c_ld[rows] = (c.gather(-1, other[rows, None]) - c.gather(-1, own[rows, None]))[:, 0].double()
        p_ld[rows] = (q.gather(-1, other[rows, None]) - q.gather(-1, own[rows, None]))[:, 0].double()
    return clean, c_ld, p_ld


def multihop(
    model: Model,
    prompts: Prompts,
    bridge: Int[Tensor, "batch"] | None = None,
    *,
    positions: Sequence[str | int] = (LAST,),
    control_types: Int[Tensor, "batch"] | None = None,
    baseline: Model | BaselineSpec | None = "auto",
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> MultihopResult:
    """Bridge and answer decodability by layer, and interchange interventions on the bridge.

    `prompts`: two-hop prompts (any lengths, padded left or right) with answers, predicted at
    `last`, and a `partner` whose bridge (hence answer) differs, with its own answers and the
    same span names. `bridge`: token id of each prompt's bridge entity (its first token; None:
    only the answer is probed). `positions`: the positions to examine — span names (read at each
    prompt's and each partner's own index) or ints in prompt coordinates (NaN for a prompt
    without that position). `control_types`: the Hewitt-Liang type of each prompt (each type gets
    a random label in the control task; choose a type the bridge is a function of, e.g. the fact
    token a->b, so that memorising types solves the control as well as the task; default: the
    token before the last). `baseline`: the comparison model, "random", "none" or "auto" (a
    random-initialised model of the same shape for a model of at most 1 GiB, `interp.baseline`;
    None means "auto"), run after the model's own measurements.
    """
    arch = Arch.of(model)
    p = prompts_of(prompts, model)
    n = len(p)
    if p.answers is None or p.partner is None or p.partner.answers is None:
        raise ValueError("multihop prompts: expected answers and a partner with answers (a prompt with another "
                         f"bridge), got answers={p.answers is not None}, partner={p.partner is not None}; "
                         "build them with answers=... and with_partner(...)")
    p = p.with_partner(p.partner.right())
    if n < 20:
        raise ValueError(f"prompts: expected at least 20 prompts to split probes by example, got {n}")
    labels_by = {"answer": p.first_answer}
    if bridge is not None:
        bridge = torch.as_tensor(bridge).long().cpu()
        if bridge.shape != (n,):
            raise ValueError(f"bridge: expected shape ({n},), got {tuple(bridge.shape)}")
        labels_by = {"bridge": bridge, **labels_by}
    if not positions:
        raise ValueError("positions: expected at least one span name or int, got none")
    names = [str(x) for x in positions]
    pos = {str(x): positions_of(p, x, "multihop position") for x in positions}
    ppos = {str(x): positions_of(p.partner, x, "multihop position") for x in positions}
    last = p.index(LAST)
    rows_all = torch.arange(n)
    types = (p.tokens.cpu()[rows_all, (last - 1).clamp_min(0)] if control_types is None
             else torch.as_tensor(control_types).long().cpu())

    def probes_for(m: Model) -> dict[tuple[str, str], ProbeResult]:
        out = {}
        for pname in names:
            ok = torch.isfinite(pos[pname])
            idx = torch.where(ok, pos[pname], 0).long()
            acts = residual_stack(m, p.tokens, positions=idx[:, None], progress=progress)[:, :, 0]  # [layer, n, d]
            feats = acts[:, ok.to(acts.device)].float()
            for target, labels in labels_by.items():
                out[(pname, target)] = fit(feats, labels[ok].long(), "logistic", types=types[ok], seed=seed,
                                           meta={"model": name_of(m), "position": pname, "target": target,
                                                 "n": int(ok.sum())})
        return out

    probes = probes_for(model)
    lens = {t: logit_lens(model, p, pos=last.to(p.tokens.device), target=lab.to(p.tokens.device), progress=progress)
            for t, lab in labels_by.items()}
    rr = {t: (1.0 / (1 + r.target_rank[:, :, 0].double())) for t, r in lens.items()}

    iia, iia_ld = _interchange(model, p, pos, ppos, batch_size)
    clean, clean_ld, partner_ld = _clean_runs(model, p, batch_size)
    plan = baseline_for(model, baseline, seed=seed)
    measured = plan.run(model, lambda m: (probes_for(m), *_interchange(m, p, pos, ppos, batch_size),
                                          *_clean_runs(m, p, batch_size)[:2]))
    b_probes, b_iia, b_iia_ld, b_clean, b_clean_ld = measured if measured is not None else ({}, {}, {}, None, None)
    decodable = {k: _decodable_from(x) for k, x in probes.items()}
    labels = tuple(layer_labels(arch.n_layers))

    acc = estimate(clean.correct)
    lp = estimate(clean.logprob)
    b_lp = estimate(b_clean.logprob) if b_clean is not None else None
    # the behaviour: the model solves the prompts (top-1), or at least gives the answer more
    # log-probability than the random-initialised model does (a real model's top-1 may differ)
    shows = (acc.excludes(0.0) and acc.value >= 0.5) or (b_lp is not None and lp.above(b_lp))
    shift = {k: v - clean_ld for k, v in iia_ld.items()}
    best = max(((pn, layer) for pn in names for layer in range(arch.n_layers)),
               key=lambda k: float(_nanmean(shift[k[0]][k[1]])))
    best_iia, best_shift = estimate(iia[best[0]][best[1]].correct), estimate(shift[best[0]][best[1]])
    full = estimate(partner_ld - clean_ld)
    best_b_shift = None if b_clean is None else estimate(b_iia_ld[best[0]][best[1]] - b_clean_ld)
    b_last, a_last = decodable.get((LAST, "bridge")), decodable.get((LAST, "answer"))
    behaviour_reason = None if shows else (
        f"two-hop accuracy is {acc} and log p(answer) {lp} does not clear the random-initialised model's {b_lp}; "
        f"the model does not solve these prompts" if b_lp is not None else
        f"two-hop accuracy is {acc} (not above 0.5) and there is no baseline to compare log p(answer) {lp} with "
        f"({plan.note})")
    if b_clean is None:
        verdict = Verdict(False, unbaselined(plan.note, (
            f"two-hop accuracy {acc}, log p(answer) {lp}; the largest patch, at {labels[best[1]]} of '{best[0]}', "
            f"switches {best_iia} of prompts to the partner's answer and moves the logit difference by "
            f"{best_shift} nats of the {full} that separate the two runs")))
        if not shows:
            decodable = {k: None for k in decodable}
    elif not shows:
        decodable = {k: None for k in decodable}  # no layer is reported for a behaviour the model lacks
        verdict = Verdict(False, behaviour_reason)
    elif not best_shift.above(best_b_shift):
        verdict = Verdict(False, f"no patch moves the logit difference towards the partner's answer beyond the "
                                 f"random-initialised baseline (best {best_shift} vs {best_b_shift} nats at "
                                 f"{labels[best[1]]} of '{best[0]}'; IIA {best_iia} vs "
                                 f"{estimate(b_iia[best[0]][best[1]].correct)})")
    else:
        order = ("not decodable" if b_last is None else
                 f"decodable at the last position from {labels[b_last]}"
                 + ("" if a_last is None else
                    f", {'before' if b_last < a_last else 'not before'} the answer ({labels[a_last]})"))
        lead = ("The bridge is computed internally: it is " + order + "; p" if bridge is not None
                else "P")
        verdict = Verdict(True, (
            f"{lead}atching the residual at {labels[best[1]]} of position '{best[0]}' from a prompt with another "
            f"bridge switches the answer to that prompt's answer in {best_iia} of prompts (random-initialised "
            f"baseline {estimate(b_iia[best[0]][best[1]].correct)}) and moves the logit difference (partner's answer - own) by {best_shift} nats "
            f"of the {full} that separate the two runs (baseline {best_b_shift})."))
    return MultihopResult(
        model_name=name_of(model), labels=labels, positions=pos, probes=probes, baseline_probes=b_probes,
        lens_rr=rr, iia=iia, baseline_iia=b_iia, clean=clean, decodable_from=decodable, verdict=verdict,
        meta={"n": n, "accuracy": acc, "logprob": lp, "baseline_logprob": b_lp,
              "baseline_clean_logit_diff": b_clean_ld, "lengths": sorted(set(p.prompt_lengths.tolist()))},
        clean_shows_behaviour=shows, behaviour_reason=behaviour_reason, iia_logit_diff=iia_ld,
        baseline_iia_logit_diff=b_iia_ld, clean_logit_diff=clean_ld, partner_logit_diff=partner_ld,
        baseline_note=plan.note)


@dataclass(frozen=True)
class PlanAheadResult:
    """Future-lens accuracy for x_{t+k} by layer against bigram/unigram baselines."""

    lens: FutureLensResult
    baseline: FutureLensResult | None  # the same lens on a random-initialised model of the same shape
    verdict: Verdict
    clean: Estimate | None = None  # the model's own accuracy on x_(t+1)..x_(t+max offset), teacher-forced
    baseline_clean: Estimate | None = None  # the same for the random-initialised model
    clean_shows_behaviour: bool = True  # clean above baseline_clean: the model emits the planned tokens
    behaviour_reason: str | None = None  # why not, when clean_shows_behaviour is False
    baseline_note: str | None = None  # the baseline compared with, or why there is none (interp.baseline)

    @property
    def values(self) -> Tensor:
        return self.lens.accuracy

    def to_frame(self) -> pd.DataFrame:
        frames = [self.lens.to_frame().assign(model="trained")]
        if self.baseline is not None:
            frames.append(self.baseline.to_frame().assign(model="random-init"))
        return pd.concat(frames, ignore_index=True)

    def plot(self) -> go.Figure:
        """The future lens by layer for each offset k (colour), the trained model solid and the
        random-initialised one dashed; the bigram predictor as a dotted reference line per k."""
        from interp import viz

        fig = go.Figure()
        for j, k in enumerate(self.lens.offsets):
            c = viz.color(f"k={k}", j)
            for res, model in ((self.lens, viz.TRAINED), (self.baseline, viz.BASELINE)):
                if res is None:
                    continue
                f = res.to_frame()
                g = f[(f.method == "linear") & (f.offset == k)].sort_values("layer")
                viz.line(fig, list(range(len(g))), g.accuracy, name=f"x[t+{k}] ({model})", color_=c, model=model,
                         low=g.ci_low, high=g.ci_high, hover_x=g.label)
            bigram = float(self.lens.baselines[j, 0, 0])
            fig.add_trace(go.Scatter(x=[0, len(self.lens.layers) - 1], y=[bigram, bigram], mode="lines",
                                     name=f"x[t+{k}] bigram predictor (reference)",
                                     line=dict(color=c, dash=viz.DASH[viz.REFERENCE], width=1.5),
                                     hovertemplate=f"bigram predictor, k={k}: %{{y:.3f}}<extra></extra>"))
        viz.accuracy_axis(fig, title="top-1 accuracy of x[t+k] (fraction of held-out tokens)")
        fig.update_xaxes(**viz.layer_ticks(self.lens.labels))
        clean = "" if self.clean is None else f" The model's own teacher-forced accuracy on those tokens: {self.clean}."
        return viz.finish(fig, title=f"Plan-ahead: decoding tokens beyond the next one — {self.lens.model_name}",
                          caption=f"n = {int(self.lens.n_test_examples[0])} held-out prompts "
                                  f"({int(self.lens.n_test_tokens[0])} tokens). "
                                  f"A linear future lens reads h[t] at the planning position and predicts x[t+k]. "
                                  f"Solid: trained model; "
                                  + ("dashed: random-initialised model; " if self.baseline is not None else
                                     f"no model baseline ({self.baseline_note}); ")
                                  + f"dotted: bigram predictor from x[t]. Bands: {viz.CI_TEXT}.{clean}")


def plan_ahead(
    model: Model,
    prompts: Prompts | Batch | Tensor,
    mask: Bool[Tensor, "n pos"] | None = None,
    *,
    at: str = "plan",
    offsets: tuple[int, ...] = (2, 3),
    baseline: Model | BaselineSpec | None = "auto",
    seed: int = 0,
    progress: bool = False,
) -> PlanAheadResult:
    """Does the hidden state at the span `at` (or the positions of `mask`, right-padded layout)
    already encode x_{t+2}, x_{t+3}?

    `prompts` of any lengths: only positions t whose x_(t + max offset) is a real token of that
    prompt are read. No layer is claimed unless the model itself emits the tokens it would be
    planning: its teacher-forced accuracy on x_(t+1)..x_(t+max offset) from the masked positions
    t clears the random-initialised model's (`clean_shows_behaviour`). `baseline`: the comparison
    model, "random", "none" or "auto" (`interp.baseline`: the random-initialised model only for a
    model of at most 1 GiB; without one no layer is claimed)."""
    p = prompts_of(prompts, model)
    width = p.tokens.shape[1]
    mask = (p.span_mask(at, width) if mask is None else torch.as_tensor(mask, dtype=torch.bool).cpu())
    if mask.shape != (len(p), width):
        raise ValueError(f"mask: expected shape {(len(p), width)}, got {tuple(mask.shape)}")
    mask = mask & (torch.arange(width)[None] + max(offsets) < p.lengths[:, None])
    tokens = p.tokens
    cfg = FutureLensConfig(offsets=offsets, seed=seed)
    res = future_lens(model, tokens, mask=mask, config=cfg, progress=progress)
    clean = estimate(_emits(model, tokens, mask, max(offsets)))
    plan = baseline_for(model, baseline, seed=seed)
    measured = plan.run(model, lambda m: (future_lens(m, tokens, mask=mask, config=cfg, progress=progress),
                                          estimate(_emits(m, tokens, mask, max(offsets)))))
    base, b_clean = measured if measured is not None else (None, None)
    shows = b_clean is not None and clean.above(b_clean)
    behaviour_reason = None if shows else (
        f"the model's own accuracy on the {max(offsets)} tokens after the masked positions is {clean}, not above the "
        f"random-initialised model's {b_clean}: it does not emit what it would be planning" if b_clean is not None
        else f"not established without a baseline ({plan.note})")
    frame = res.to_frame()
    claims = []
    for k in offsets:
        o = offsets.index(k)
        # above the bigram baseline, and above the same lens on a random-initialised model
        layers = [x for x in res.beats_bigram(k)
                  if base is None or res.ci_low[o, res.layers.index(x)] > base.ci_high[o, base.layers.index(x)]]
        if layers:
            lin = frame[(frame.offset == k) & (frame.method == "linear") & (frame.layer == layers[0])].iloc[0]
            big = frame[(frame.offset == k) & (frame.method == "bigram")].iloc[0]
            claims.append(f"x_(t+{k}) from {lin.label} on (accuracy {lin.accuracy:.2f} "
                          f"[{lin.ci_low:.2f}, {lin.ci_high:.2f}] vs bigram {big.accuracy:.2f})")
    if base is None:
        verdict = Verdict(False, unbaselined(plan.note, (
            f"the model's own accuracy on the tokens it would plan is {clean}; above the bigram baseline: "
            + ("; ".join(claims) if claims else "no layer, for any offset tested"))))
    elif not shows:
        verdict = Verdict(False, behaviour_reason)
    elif claims:
        verdict = Verdict(True, "Hidden states already encode tokens beyond the next one: a linear future lens "
                                f"decodes {'; '.join(claims)}, above the bigram baseline's paired CI and "
                                f"the same lens on a random-initialised model.")
    else:
        verdict = Verdict(False, "no layer decodes x_(t+k) above both the bigram baseline and the same lens on a "
                                 "random-initialised model, for any offset tested")
    return PlanAheadResult(res, base, verdict, clean, b_clean, shows, behaviour_reason, plan.note)


def _emits(model: Model, tokens: Tensor, mask: Tensor, k: int) -> Tensor:
    """Per example: teacher-forced top-1 accuracy on x_(t+1)..x_(t+k) over its masked positions t."""
    with torch.inference_mode():
        pred = model(tokens.to(device_of(model))).argmax(-1).cpu()  # pred[:, j] predicts tokens[:, j + 1]
    n, seq = tokens.shape
    hits = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    for i, t in mask.nonzero().tolist():
        for j in range(t, min(t + k, seq - 1)):
            hits[i] += float(pred[i, j] == tokens[i, j + 1])
            count[i] += 1
    if not bool((count > 0).all()):
        raise ValueError(f"mask: expected at least one masked position with a next token in every prompt, got "
                         f"{int((count == 0).sum())} prompts without")
    return hits / count
