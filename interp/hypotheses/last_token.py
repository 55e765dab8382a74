"""Last-token sufficiency: from which layer does the last position's residual alone suffice?

Only the last position's final vector is unembedded, yet every layer's attention lets it re-read
the keys and values of earlier positions. Definitions (Geva et al. 2023 and METHODS.md), for a
prompt whose last position is T, per layer l in 0..L (L = n_layers):

- N(l), knockout: block attention from T to every earlier position at layers >= l. With l = L
  nothing is blocked (KL exactly 0). The first l from which accuracy stays at the clean level is
  where the last position stops needing the context's K/V stream.
- S(l), transplant: run a neutral context (earlier tokens from another example, last token kept)
  and write the clean resid_pre[l] of T into it. S(L) is the clean prediction by construction;
  S(0) is the neutral run itself (the embedding of T does not depend on the context).
- K/V dependence: run the clean prompt but take the keys and values of positions < T from the
  neutral run at layers >= l.
- Share (per layer): recovery R = (m - m_neutral) / (m_clean - m_neutral) of the answer's
  log-prob. R_S(l) is the share already in the last residual at layer l; 1 - R_KV(l) is the
  share that still arrives by re-reading earlier positions at layers >= l.

Prompts (`interp.prompts.Prompts`) of any lengths, padded left or right: each is read at its own
last prompt token and computed exactly as if run alone (one right-padded batch, every edit at
each prompt's own positions). The neutral context is the prompts' partner (same lengths, same
last token) or, by default, another example's context (`neutral_prompts`). A multi-token answer
is read over its teacher-forced span: the knockout blocks that span from the context, the
transplant writes the whole span, and the answer's log-prob sums its tokens.

Baseline: a random-initialised model of the same shape (`interp.baseline`: ``baseline="auto"``
builds it only for a model of at most 1 GiB, after the curves, and releases it; none: no verdict,
said in `baseline_note`); no verdict, and no sufficiency layer, unless the clean model's accuracy
clears that baseline (`clean_shows_behaviour`) and knocking
out the whole context measurably hurts. A sufficiency layer needs a contrast that could have
failed: it is below n_layers (cutting at l = n_layers blocks nothing, true of any model) and
cutting from the layer below measurably drops accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Int
from plotly.subplots import make_subplots
from torch import Tensor

from interp.arch import Arch, Model
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
    outcome,
    prompts_of,
    unbaselined,
)
from interp.metrics import answer_logprob, kl_to, top1
from interp.patching import knockout, kv_patch, sweep
from interp.prompts import ANSWER, LAST, Prompts
from interp.stats import Estimate, bootstrap
from interp.tokens import Batch


def neutral_context(tokens: Int[Tensor, "n pos"], shift: int = 1) -> Int[Tensor, "n pos"]:
    """Each prompt's earlier tokens replaced by another example's (rolled by `shift`); last kept."""
    out = tokens.roll(shift, dims=0).clone()
    out[:, -1] = tokens[:, -1]
    return out


@dataclass(frozen=True)
class LastTokenResult:
    """Curves over layers l = 0..L of knockout N(l), transplant S(l) and K/V dependence."""

    model_name: str
    layers: tuple[int, ...]
    clean: Outcome
    neutral: Outcome
    knockout: tuple[Outcome, ...]
    transplant: tuple[Outcome, ...]
    kv: tuple[Outcome, ...]
    baseline_clean: Outcome | None
    baseline_knockout0: Outcome | None
    sufficient_from: int | None  # in 1..n_layers-1, only with a failing layer below it; else None
    verdict: Verdict
    meta: dict = field(default_factory=dict)
    clean_shows_behaviour: bool = True  # clean accuracy clears the random-initialised baseline
    behaviour_reason: str | None = None  # why not, when clean_shows_behaviour is False
    sufficiency_reason: str | None = None  # why sufficient_from is None
    baseline_note: str | None = None  # the baseline compared with, or why there is none (interp.baseline)

    @property
    def values(self) -> Tensor:
        """[3, layer] accuracy under knockout, transplant and K/V replacement."""
        return torch.stack([torch.stack([o.correct.mean() for o in curve])
                            for curve in (self.knockout, self.transplant, self.kv)])

    def share_in_residual(self) -> list[Estimate]:
        """Per layer: recovery of the answer log-prob by the transplanted last residual (R_S)."""
        return [_recovery(o, self.clean, self.neutral) for o in self.transplant]

    def share_via_kv(self) -> list[Estimate]:
        """Per layer: share of the prediction lost when earlier K/V at layers >= l is neutral."""
        out = []
        for o in self.kv:
            r = _recovery(o, self.clean, self.neutral)
            out.append(Estimate(1 - r.value, 1 - r.high, 1 - r.low))
        return out

    def to_frame(self) -> pd.DataFrame:
        frames = []
        for name, curve in (("knockout", self.knockout), ("transplant", self.transplant), ("kv_replaced", self.kv)):
            acc = torch.stack([o.correct for o in curve], dim=1)
            kl = torch.stack([o.kl for o in curve], dim=1)
            frames.append(curve_frame(acc, self.layers, "layer", intervention=name, metric="accuracy"))
            frames.append(curve_frame(kl, self.layers, "layer", intervention=name, metric="kl"))
        for name, ests in (("share_in_residual", self.share_in_residual()), ("share_via_kv", self.share_via_kv())):
            frames.append(pd.DataFrame([{"layer": layer, "value": e.value, "ci_low": e.low, "ci_high": e.high,
                                         "intervention": name, "metric": "recovery"}
                                        for layer, e in zip(self.layers, ests, strict=True)]))
        frame = pd.concat(frames, ignore_index=True)
        frame.insert(0, "model", self.model_name)
        return frame

    def plot(self) -> go.Figure:
        """Three panels over the layer l an intervention starts at: top-1 accuracy (clean
        accuracy as a reference line, chance floor 0), KL to the clean output, and the share of
        the answer's log-prob carried in the residual / via K/V; colour = the intervention."""
        from interp import viz

        frame = self.to_frame()
        labels = [f"{layer}" for layer in self.layers]
        fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08, subplot_titles=(
            "top-1 accuracy after the intervention", "KL(clean || intervened) at the last position",
            "share of log p(answer) recovered"))
        names = {"knockout": "knockout: last position's attention cut at layers >= l",
                 "transplant": "transplant: last residual at l into a neutral context",
                 "kv_replaced": "K/V of the context from a neutral run at layers >= l",
                 "share_in_residual": "share in the last residual (transplant)",
                 "share_via_kv": "share via the context's K/V"}
        for col, metric in ((1, "accuracy"), (2, "kl"), (3, "recovery")):
            for name, sub in frame[frame.metric == metric].groupby("intervention", sort=False):
                sub = sub.sort_values("layer")
                viz.line(fig, sub.layer, sub.value, name=names[str(name)], color_=viz.color(str(name)),
                         low=sub.ci_low, high=sub.ci_high, row=1, col=col, legendgroup=str(name),
                         showlegend=col != 2, hover_x=[f"l = {x}" for x in sub.layer],
                         unit="nats" if metric == "kl" else "")
        viz.reference(fig, y=float(self.clean.correct.double().mean()), text="clean accuracy", row=1, col=1,
                      position="bottom right")
        if self.baseline_clean is not None:
            viz.reference(fig, y=float(self.baseline_clean.correct.double().mean()), row=1, col=1,
                          text="random-init model, clean", position="top right", dash="dash")
        viz.accuracy_axis(fig, row=1, col=1, title="top-1 accuracy (fraction of prompts)")
        fig.update_yaxes(title_text="KL (nats)", rangemode="tozero", row=1, col=2)
        fig.update_yaxes(title_text="share (1 = all of clean - neutral)", row=1, col=3)
        fig.update_xaxes(tickmode="array", tickvals=list(self.layers), ticktext=labels,
                         title_text=f"from layer l ({max(self.layers)}: after the last block)")
        if self.sufficient_from is not None:
            viz.reference(fig, x=self.sufficient_from, text=f"sufficient from l = {self.sufficient_from}",
                          row=1, col=1, dash="dash")
        n = int(self.clean.correct.numel())
        return viz.finish(fig, title=f"Last-token sufficiency — {self.model_name}",
                          caption=f"n = {n} prompts. Colour: the intervention. Share = (intervened - neutral) / "
                                  f"(clean - neutral) of the mean log p(answer); the neutral context replaces "
                                  f"every earlier token by another prompt's. Bands: {viz.CI_TEXT}.")


def _recovery(o: Outcome, clean: Outcome, neutral: Outcome) -> Estimate:
    def stat(x: Tensor) -> Tensor:  # x: [..., 3, n] -> ratio of means
        m = x.mean(-1)
        return (m[..., 0] - m[..., 1]) / (m[..., 2] - m[..., 1])

    return bootstrap(torch.stack([o.logprob, neutral.logprob, clean.logprob], dim=1), stat)


CONTEXT = "last-token:context"  # every position before each prompt's last prompt token


def _curves(model: Model, p: Prompts, batch_size: int
            ) -> tuple[Outcome, Outcome, list[Outcome], list[Outcome], list[Outcome]]:
    """Clean, neutral, knockout, transplant and K/V curves; `p.partner` is the neutral context.

    The read-out span is `answer` (the last prompt token and any teacher-forced answer tokens);
    the context is every position before the last prompt token. The curves are the patching
    engine's: knockout = `knockout(at="answer")` from each start layer l; transplant = a
    denoising `sweep` at the `answer` span (clean resid_pre[l] into the neutral run; l = L: the
    final resid_post); K/V = a noising `kv_patch` of the context, cumulative (layers >= l in
    one copy). Every edit is per example, so each prompt is computed as if run alone."""
    L = Arch.of(model).n_layers
    q = p.right()
    nq = q.partner.right()  # type: ignore[union-attr]
    ctx = torch.stack([torch.zeros(len(q), dtype=torch.long), q.index(LAST)], dim=1)
    q = q.with_spans(**{CONTEXT: ctx}).with_partner(nq.with_spans(**{CONTEXT: ctx}))
    parts: dict[str, list] = {"clean": [], "neutral": [], "ref": []}
    for rows in chunks(len(q), batch_size):
        sub = q.select(rows).right()
        c_logits = forward(model, sub)
        n_logits = forward(model, sub.partner.right())  # type: ignore[union-attr]
        ref = last_logits(c_logits, sub)
        parts["ref"].append(ref)
        parts["clean"].append(outcome(c_logits, sub))
        parts["neutral"].append(outcome(n_logits, sub, reference=ref))
    ref = torch.cat(parts["ref"])
    metrics = {"correct": top1(), "logprob": answer_logprob(), "kl": kl_to(ref)}
    layers = list(range(L + 1))
    knock = {k: knockout(model, q, metrics[k], at=ANSWER, start_layers=layers, rows=batch_size)
             for k in ("correct", "logprob")}
    trans, kvrep = {}, {}
    for k, m in metrics.items():
        kw = dict(positions=[ANSWER], direction="denoising", rows=batch_size)
        pre = sweep(model, q, m, site=Site.RESID_PRE, **kw)
        post = sweep(model, q, m, site=Site.RESID_POST, layers=[L - 1], **kw)
        trans[k] = torch.cat([pre.per_example[:, 0], post.per_example[:, 0]])  # [L + 1, n]
        kv = kv_patch(model, q, m, positions=[CONTEXT], per_group=False, cumulative=True, direction="noising",
                      rows=batch_size)
        kvrep[k] = torch.cat([kv.per_example[:, 0], kv.clean_values[None]])  # l = L: nothing replaced

    def curve(t: dict[str, Tensor]) -> list[Outcome]:
        return [Outcome(t["correct"][x], t["logprob"][x], t["kl"][x].clamp_min(0)) for x in layers]

    knocked = {"correct": knock["correct"].per_example, "logprob": knock["logprob"].per_example,
               "kl": knock["correct"].kl_per_example}
    return (Outcome.cat(parts["clean"]), Outcome.cat(parts["neutral"]), curve(knocked), curve(trans), curve(kvrep))


def _baseline_curves(model: Model, p: Prompts, batch_size: int) -> tuple[Outcome, Outcome]:
    """The baseline's clean outcome and its knockout from layer 0 (what the verdict compares)."""
    clean, _, knock, _, _ = _curves(model, p, batch_size)
    return clean, knock[0]


def neutral_prompts(prompts: Prompts) -> Prompts:
    """Each prompt's context (every token before its last prompt token) replaced by another
    example's, the last prompt token and any teacher-forced answer tokens kept: the previous
    example of the same length (as `neutral_context` within each length), else the context of the
    longest other prompt (its first tokens, or repeated when it is shorter)."""
    p = prompts.right()
    toks = p.tokens.cpu()
    last = p.index(LAST)
    out = toks.clone()
    keys = list(zip(p.lengths.tolist(), p.prompt_lengths.tolist(), strict=True))
    for key in dict.fromkeys(keys):
        idx = torch.tensor([i for i, k in enumerate(keys) if k == key])
        if len(idx) > 1:
            for i, j in zip(idx.tolist(), idx.roll(1).tolist(), strict=True):
                out[i, : int(last[i])] = toks[j, : int(last[i])]
            continue
        i, t = int(idx[0]), int(last[idx[0]])
        if len(p) < 2:
            raise ValueError("prompts: expected at least 2 prompts to take a neutral context from another, got 1; "
                             "pass the neutral context as the prompts' partner")
        # the longest other prompt's context (repeated when it is shorter than this one's)
        j = max((k for k in range(len(p)) if k != i), key=lambda k: int(last[k]))
        ctx = toks[j, : max(int(last[j]), 1)]
        out[i, :t] = ctx.repeat(t // len(ctx) + 1)[:t]
    return Prompts(out.to(p.tokens.device), p.lengths, "right", p.prompt_lengths,
                   {k: v for k, v in p.spans.items() if k not in (LAST, ANSWER)}, p.answers, p.answer_lengths)


def last_token_sufficiency(
    model: Model,
    prompts: Prompts | Batch | Tensor,
    *,
    baseline: Model | BaselineSpec | None = "auto",
    tolerance: float = 0.05,
    batch_size: int = 256,
    seed: int = 0,
) -> LastTokenResult:
    """Knockout, transplant and K/V-replacement curves of the last position, per layer.

    `prompts`: prompts of any lengths (padded left or right) with answers, each read at its own
    last prompt token (a multi-token answer: at its teacher-forced read-out span). Their
    `partner`, when given, is the neutral context: the same lengths, the same last token (and
    answer tokens), other earlier tokens (default: `neutral_prompts`). `baseline`: the
    comparison model, "random", "none" or "auto" (a random-initialised model of the same shape for a
    model of at most 1 GiB, `interp.baseline`; None means "auto"). `tolerance`: how close to clean
    accuracy counts as "suffices".
    """
    arch = Arch.of(model)
    p = prompts_of(prompts, model)
    n, L = len(p), arch.n_layers
    if p.answers is None:
        raise ValueError("last_token_sufficiency prompts: expected answers (the token after each prompt), got none; "
                         "build them with answers=...")
    if n < 4:
        raise ValueError(f"prompts: expected at least 4 examples for confidence intervals, got {n}")
    if p.partner is None:  # built once over all prompts, so the baseline's subset shares it
        p = p.with_partner(neutral_prompts(p))
    else:
        q = p.partner.right()
        if len(q) != n or not torch.equal(q.lengths, p.lengths) or not torch.equal(q.index(LAST), p.index(LAST)):
            raise ValueError(f"prompts.partner (the neutral context): expected {n} prompts with the same lengths and "
                             f"last positions as the prompts ({p.lengths.tolist()[:8]}...), got lengths "
                             f"{q.lengths.tolist()[:8]}...")
        p = p.with_partner(q)

    clean, neut, knock, trans, kv = _curves(model, p, batch_size)
    plan = baseline_for(model, baseline, seed=seed)
    b_curves = plan.run(model, lambda m: _baseline_curves(m, p.select(torch.arange(min(128, n))), batch_size))
    layers = tuple(range(L + 1))

    clean_acc, clean_lp = estimate(clean.correct), estimate(clean.logprob)
    if b_curves is not None:
        b_clean, b_knock0 = b_curves
        base_acc, base_lp = estimate(b_clean.correct), estimate(b_clean.logprob)
        by_accuracy = clean_acc.above(base_acc)
    else:  # unbaselined: top-1 when the model gets most prompts right
        b_clean, b_knock0 = None, None
        by_accuracy = clean_acc.excludes(0.0) and clean_acc.value >= 0.5
    # The measure: top-1 accuracy when the model's clean accuracy clears the baseline's; otherwise
    # (a real model whose top-1 is rarely exactly the answer) the answer's log-prob, with the
    # tolerance a share of the clean-minus-neutral log-prob gap.
    if by_accuracy:
        measure, score, tol, unit = "accuracy", (lambda o: o.correct), tolerance, "accuracy"
    else:
        gap = float(clean.logprob.mean() - neut.logprob.mean())
        measure, score, tol, unit = "logprob", (lambda o: o.logprob), tolerance * abs(gap), "log p(answer)"
    clean_m = clean_acc if measure == "accuracy" else clean_lp
    drop0 = estimate(score(clean) - score(knock[0]))
    acc = [score(o).mean().item() for o in knock]
    name = name_of(model)
    # the first layer from which cutting the context at every later layer keeps the clean level
    first = next(layer for layer in layers if all(a >= clean_m.value - tol for a in acc[layer:]))
    suff, why = None, None
    if b_curves is None:
        shows = False
        behaviour_reason = why = f"not established without a baseline ({plan.note})"
        verdict = Verdict(False, unbaselined(plan.note, (
            f"clean accuracy {clean_acc}, log p(answer) {clean_lp}; cutting the last position's attention to the "
            f"context at every layer changes {unit} by {drop0}; cut from layer {first} on, {unit} stays within "
            f"{tol:.3g} of clean")))
        return LastTokenResult(name, layers, clean, neut, tuple(knock), tuple(trans), tuple(kv), None, None,
                               None, verdict, meta={"n": n, "tolerance": tolerance, "measure": measure,
                                                    "lengths": sorted(set(p.prompt_lengths.tolist()))},
                               clean_shows_behaviour=False, behaviour_reason=behaviour_reason,
                               sufficiency_reason=why, baseline_note=plan.note)
    base_m = base_acc if measure == "accuracy" else base_lp
    shows = clean_acc.above(base_acc) or clean_lp.above(base_lp)
    behaviour_reason = None if shows else (
        f"clean accuracy {clean_acc} and log p(answer) {clean_lp} do not clear the random-initialised baseline "
        f"({base_acc}, {base_lp}), so there is no prediction to attribute")
    if not shows:
        why = behaviour_reason
        verdict = Verdict(False, behaviour_reason)
    elif not drop0.excludes(0.0):
        why = (f"blocking all attention from the last position to the context changes {unit} by {drop0} "
               f"(CI includes 0): the context is not needed at all")
        verdict = Verdict(False, why)
    elif first == 0:
        why = (f"cutting the context from layer 0 keeps {unit} within the tolerance {tol:.3g} of clean "
               f"(drop {drop0}): there is no layer contrast")
        verdict = Verdict(False, why)
    elif first >= L:
        # cutting at l = L blocks nothing: "sufficient from L" is true of any model, not a finding
        k = estimate(score(knock[L - 1]))
        contrast = estimate(score(clean) - score(knock[L - 1]))
        why = (f"no layer below n_layers={L} suffices: cutting the context at layer {L - 1} alone gives {unit} "
               f"{k} vs {clean_m} clean")
        verdict = Verdict(False, why + " (CI of the drop includes 0)") if not contrast.low > 0 else Verdict(True, (
            f"The last position is not self-sufficient before the output: cutting its attention to earlier "
            f"positions at the last layer ({L - 1}) alone gives {unit} {k} vs {clean_m} clean, so it still "
            f"reads the context there (random-initialised baseline {base_m})."))
    else:
        k, prev = estimate(score(knock[first])), estimate(score(knock[first - 1]))
        contrast = estimate(score(clean) - score(knock[first - 1]))
        if not contrast.excludes(0.0) or contrast.value <= 0:
            why = (f"cutting from layer {first - 1} changes {unit} by {contrast} (CI includes 0): no layer "
                   f"contrast marks where the last position becomes sufficient")
            verdict = Verdict(False, why)
        else:
            suff = first
            verdict = Verdict(True, (
                f"The last position's residual suffices from layer {suff} on (of {L}): with its attention to "
                f"earlier positions cut at layers >= {suff}, {unit} is {k} vs {clean_m} clean, while cutting "
                f"from layer {suff - 1} gives {prev} (random-initialised baseline {base_m})."))
    return LastTokenResult(name, layers, clean, neut, tuple(knock), tuple(trans), tuple(kv), b_clean, b_knock0,
                           suff, verdict, meta={"n": n, "tolerance": tolerance, "measure": measure,
                                                "lengths": sorted(set(p.prompt_lengths.tolist()))},
                           clean_shows_behaviour=shows, behaviour_reason=behaviour_reason, sufficiency_reason=why,
                           baseline_note=plan.note)
