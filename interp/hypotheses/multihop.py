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

from collections.abc import Mapping
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Int
from plotly.subplots import make_subplots
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.arch import Arch
from interp.graph import Node, Site
from interp.hooks import Patch
from interp.hypotheses.base import Outcome, Verdict, curve_frame, estimate, random_like, readout, unpadded
from interp.lens import future_lens, logit_lens
from interp.lens.future import FutureLensConfig, FutureLensResult
from interp.lens.residual import layer_labels, residual_stack
from interp.probing import ProbeResult, fit
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
    """Decodability (probes, logit lens) and interchange accuracy, per layer and position."""

    model_name: str
    labels: tuple[str, ...]  # lens layers: resid_pre of each block, then the final resid_post
    positions: dict[str, int]
    probes: dict[tuple[str, str], ProbeResult]  # (position name, "bridge"|"answer") -> probe over layers
    baseline_probes: dict[tuple[str, str], ProbeResult]
    lens_rr: dict[str, Tensor]  # "bridge"/"answer" -> [layer, n] reciprocal rank at the last position
    iia: dict[str, tuple[Outcome, ...]]  # position name -> per patched layer: outcome w.r.t. partner's answer
    baseline_iia: dict[str, tuple[Outcome, ...]]
    clean: Outcome
    decodable_from: dict[tuple[str, str], int | None]  # all None when the clean run does not show the behaviour
    verdict: Verdict
    meta: dict = field(default_factory=dict)
    clean_shows_behaviour: bool = True  # two-hop accuracy above 0 (CI) and at least 0.5
    behaviour_reason: str | None = None  # why not, when clean_shows_behaviour is False

    @property
    def values(self) -> Tensor:
        """[position, layer] interchange-intervention accuracy."""
        return torch.stack([torch.stack([o.correct.mean() for o in self.iia[p]]) for p in self.positions])

    def iia_estimate(self, position: str, layer: int) -> Estimate:
        return estimate(self.iia[position][layer].correct)

    def to_frame(self) -> pd.DataFrame:
        frames = []
        for (pos, target), p in self.probes.items():
            f = p.to_frame()[["layer", "value", "ci_low", "ci_high", "control", "shuffled", "chance"]]
            frames.append(f.assign(analysis="probe", position=pos, target=target, model="trained"))
        for (pos, target), p in self.baseline_probes.items():
            f = p.to_frame()[["layer", "value", "ci_low", "ci_high"]]
            frames.append(f.assign(analysis="probe", position=pos, target=target, model="random-init"))
        for target, rr in self.lens_rr.items():
            frames.append(curve_frame(rr.T.double(), range(rr.shape[0]), "layer", analysis="logit_lens_rr",
                                      position="last", target=target, model="trained"))
        for name, table, model in (("iia", self.iia, "trained"), ("iia", self.baseline_iia, "random-init")):
            for pos, outs in table.items():
                acc = torch.stack([o.correct for o in outs], 1)
                frames.append(curve_frame(acc, range(len(outs)), "layer", analysis=name, position=pos,
                                          target="partner_answer", model=model))
        frame = pd.concat(frames, ignore_index=True)
        frame["layer_label"] = [self.labels[int(x)] if int(x) < len(self.labels) else str(x) for x in frame.layer]
        return frame

    def plot(self) -> go.Figure:
        frame = self.to_frame()
        fig = make_subplots(rows=1, cols=3, subplot_titles=(
            "probe accuracy (test)", "logit lens: reciprocal rank at the last position",
            "interchange-intervention accuracy"))
        palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
        shown: set[str] = set()
        for col, analysis in ((1, "probe"), (2, "logit_lens_rr"), (3, "iia")):
            sub = frame[frame.analysis == analysis]
            for i, ((pos, target, model), g) in enumerate(sub.groupby(["position", "target", "model"], sort=False)):
                g = g.sort_values("layer")
                name = f"{target} @ {pos} ({model})"
                fig.add_trace(go.Scatter(
                    x=g.layer_label, y=g.value, mode="lines+markers", name=name, legendgroup=name,
                    showlegend=name not in shown,
                    line=dict(color=palette[i % len(palette)], dash="dot" if model != "trained" else "solid"),
                    error_y=dict(type="data", symmetric=False, array=g.ci_high - g.value,
                                 arrayminus=g.value - g.ci_low)), row=1, col=col)
                shown.add(name)
        fig.update_layout(title=f"Multi-hop: bridge and answer by layer — {self.model_name}",
                          template="plotly_white", height=450)
        return fig


def multihop(
    model: HookedTransformer,
    tokens: Int[Tensor, "n pos"] | Batch,
    bridge: Int[Tensor, "n"],
    answer: Int[Tensor, "n"],
    *,
    partner_tokens: Int[Tensor, "n pos"] | Batch,
    partner_answer: Int[Tensor, "n"],
    positions: Mapping[str, int] | None = None,
    control_types: Int[Tensor, "n"] | None = None,
    baseline: HookedTransformer | None = None,
    seed: int = 0,
    progress: bool = False,
) -> MultihopResult:
    """Bridge and answer decodability by layer, and interchange interventions on the bridge.

    `tokens`: two-hop prompts of one length, predicted at the last position; `bridge` and
    `answer`: token ids of the bridge entity and the answer; `partner_tokens` /
    `partner_answer`: matched prompts whose bridge (hence answer) differs. `positions`: names
    for the positions to examine (default: the last). `control_types`: the Hewitt-Liang type of
    each prompt (each type gets a random label in the control task; choose a type the bridge is
    a function of, e.g. the fact token a->b, so that memorising types solves the control as
    well as the task; default: the token before the last).
    """
    arch = Arch.of(model)
    tokens = unpadded(tokens, arch.d_vocab, "tokens", "multihop", n_ctx=arch.n_ctx)
    partner_tokens = unpadded(partner_tokens, arch.d_vocab, "partner_tokens", "multihop", n_ctx=arch.n_ctx)
    n, seq = tokens.shape
    if partner_tokens.shape != tokens.shape:
        raise ValueError(f"partner_tokens: expected shape {tuple(tokens.shape)}, got {tuple(partner_tokens.shape)}")
    for name, t in (("bridge", bridge), ("answer", answer), ("partner_answer", partner_answer)):
        if t.shape != (n,):
            raise ValueError(f"{name}: expected shape ({n},), got {tuple(t.shape)}")
    if n < 20:
        raise ValueError(f"tokens: expected at least 20 prompts to split probes by example, got {n}")
    pos = {"last": seq - 1} if positions is None else {k: int(v) % seq for k, v in positions.items()}
    types = (tokens[:, -2] if control_types is None else control_types).cpu()
    base = random_like(model, seed) if baseline is None else baseline

    def probes_for(m: HookedTransformer) -> dict[tuple[str, str], ProbeResult]:
        acts = residual_stack(m, tokens, progress=progress)  # [layer, n, pos, d]
        out = {}
        for pname, p in pos.items():
            feats = acts[:, :, p].float()
            for target, labels in (("bridge", bridge), ("answer", answer)):
                out[(pname, target)] = fit(feats, labels.cpu().long(), "logistic", types=types, seed=seed,
                                           meta={"model": m.cfg.model_name, "position": pname, "target": target})
        return out

    probes, b_probes = probes_for(model), probes_for(base)
    lens = {t: logit_lens(model, tokens, pos=-1, target=lab.to(tokens.device), progress=progress)
            for t, lab in (("bridge", bridge), ("answer", answer))}
    rr = {t: (1.0 / (1 + r.target_rank[:, :, 0].double())) for t, r in lens.items()}

    def interchange(m: HookedTransformer) -> dict[str, tuple[Outcome, ...]]:
        names = [Node(x, Site.RESID_PRE).hook_name for x in range(arch.n_layers)]
        names.append(Node(arch.n_layers - 1, Site.RESID_POST).hook_name)
        with torch.inference_mode():
            _, src = m.run_with_cache(partner_tokens.to(m.cfg.device), names_filter=names)
        out = {}
        for pname, p in pos.items():
            outs = []
            for layer in range(arch.n_layers + 1):
                node = (Node(layer, Site.RESID_PRE, pos=p) if layer < arch.n_layers
                        else Node(arch.n_layers - 1, Site.RESID_POST, pos=p))
                logits = readout(m, tokens, [Patch(node, source=src[node.hook_name])], batch_size=max(256, n))
                outs.append(Outcome.of(logits, partner_answer))
            out[pname] = tuple(outs)
        return out

    iia, b_iia = interchange(model), interchange(base)
    clean = Outcome.of(readout(model, tokens, batch_size=max(256, n)), answer)
    decodable = {k: _decodable_from(p) for k, p in probes.items()}
    labels = tuple(layer_labels(arch.n_layers))

    acc = estimate(clean.correct)
    best = max(((pn, layer) for pn in pos for layer in range(arch.n_layers)),
               key=lambda k: float(iia[k[0]][k[1]].correct.mean()))
    best_iia, best_base = estimate(iia[best[0]][best[1]].correct), estimate(b_iia[best[0]][best[1]].correct)
    b_last, a_last = decodable.get(("last", "bridge")), decodable.get(("last", "answer"))
    shows = acc.excludes(0.0) and acc.value >= 0.5
    behaviour_reason = None if shows else f"two-hop accuracy is {acc}; the model does not solve these prompts"
    if not shows:
        decodable = {k: None for k in decodable}  # no layer is reported for a behaviour the model lacks
        verdict = Verdict(False, behaviour_reason)
    elif not best_iia.above(best_base):
        verdict = Verdict(False, f"no patch moves the answer to the partner's beyond the random-initialised "
                                 f"baseline (best IIA {best_iia} vs {best_base})")
    else:
        order = ("not decodable" if b_last is None else
                 f"decodable at the last position from {labels[b_last]}"
                 + ("" if a_last is None else
                    f", {'before' if b_last < a_last else 'not before'} the answer ({labels[a_last]})"))
        verdict = Verdict(True, (
            f"The bridge is computed internally: it is {order}; patching the residual at "
            f"{labels[best[1]]} of position '{best[0]}' from a prompt with another bridge switches the answer to "
            f"that prompt's answer in {best_iia} of prompts (random-initialised baseline {best_base})."))
    return MultihopResult(
        model_name=model.cfg.model_name, labels=labels, positions=pos, probes=probes, baseline_probes=b_probes,
        lens_rr=rr, iia=iia, baseline_iia=b_iia, clean=clean, decodable_from=decodable, verdict=verdict,
        meta={"n": n, "accuracy": acc}, clean_shows_behaviour=shows, behaviour_reason=behaviour_reason)


@dataclass(frozen=True)
class PlanAheadResult:
    """Future-lens accuracy for x_{t+k} by layer against bigram/unigram baselines."""

    lens: FutureLensResult
    baseline: FutureLensResult  # the same lens on a random-initialised model of the same shape
    verdict: Verdict
    clean: Estimate | None = None  # the model's own accuracy on x_(t+1)..x_(t+max offset), teacher-forced
    baseline_clean: Estimate | None = None  # the same for the random-initialised model
    clean_shows_behaviour: bool = True  # clean above baseline_clean: the model emits the planned tokens
    behaviour_reason: str | None = None  # why not, when clean_shows_behaviour is False

    @property
    def values(self) -> Tensor:
        return self.lens.accuracy

    def to_frame(self) -> pd.DataFrame:
        return pd.concat([self.lens.to_frame().assign(model="trained"),
                          self.baseline.to_frame().assign(model="random-init")], ignore_index=True)

    def plot(self) -> go.Figure:
        fig = self.lens.plot()
        base = self.baseline.to_frame()
        for k, sub in base[base.method == "linear"].groupby("offset"):
            fig.add_trace(go.Scatter(x=sub.layer, y=sub.accuracy, mode="lines", line=dict(dash="dash"),
                                     name=f"k={k} random-init model"))
        return fig


def plan_ahead(
    model: HookedTransformer,
    tokens: Int[Tensor, "n pos"] | Batch,
    mask: Bool[Tensor, "n pos"],
    *,
    offsets: tuple[int, ...] = (2, 3),
    seed: int = 0,
    progress: bool = False,
) -> PlanAheadResult:
    """Does the hidden state at the masked positions already encode x_{t+2}, x_{t+3}?

    No layer is claimed unless the model itself emits the tokens it would be planning: its
    teacher-forced accuracy on x_(t+1)..x_(t+max offset) from the masked positions t clears the
    random-initialised model's (`clean_shows_behaviour`)."""
    tokens = unpadded(tokens, Arch.of(model).d_vocab, "tokens", "plan_ahead", n_ctx=Arch.of(model).n_ctx)
    cfg = FutureLensConfig(offsets=offsets, seed=seed)
    res = future_lens(model, tokens, mask=mask, config=cfg, progress=progress)
    random_model = random_like(model, seed)
    base = future_lens(random_model, tokens, mask=mask, config=cfg, progress=progress)
    clean, b_clean = (estimate(_emits(m, tokens, mask, max(offsets))) for m in (model, random_model))
    shows = clean.above(b_clean)
    behaviour_reason = None if shows else (
        f"the model's own accuracy on the {max(offsets)} tokens after the masked positions is {clean}, not above the "
        f"random-initialised model's {b_clean}: it does not emit what it would be planning")
    frame = res.to_frame()
    claims = []
    for k in offsets:
        o = offsets.index(k)
        # above the bigram baseline, and above the same lens on a random-initialised model
        layers = [x for x in res.beats_bigram(k)
                  if res.ci_low[o, res.layers.index(x)] > base.ci_high[o, base.layers.index(x)]]
        if layers:
            lin = frame[(frame.offset == k) & (frame.method == "linear") & (frame.layer == layers[0])].iloc[0]
            big = frame[(frame.offset == k) & (frame.method == "bigram")].iloc[0]
            claims.append(f"x_(t+{k}) from {lin.label} on (accuracy {lin.accuracy:.2f} "
                          f"[{lin.ci_low:.2f}, {lin.ci_high:.2f}] vs bigram {big.accuracy:.2f})")
    if not shows:
        verdict = Verdict(False, behaviour_reason)
    elif claims:
        verdict = Verdict(True, "Hidden states already encode tokens beyond the next one: a linear future lens "
                                f"decodes {'; '.join(claims)}, above the bigram baseline's paired CI and "
                                f"the same lens on a random-initialised model.")
    else:
        verdict = Verdict(False, "no layer decodes x_(t+k) above both the bigram baseline and the same lens on a "
                                 "random-initialised model, for any offset tested")
    return PlanAheadResult(res, base, verdict, clean, b_clean, shows, behaviour_reason)


def _emits(model: HookedTransformer, tokens: Tensor, mask: Tensor, k: int) -> Tensor:
    """Per example: teacher-forced top-1 accuracy on x_(t+1)..x_(t+k) over its masked positions t."""
    with torch.inference_mode():
        pred = model(tokens.to(model.cfg.device)).argmax(-1).cpu()  # pred[:, j] predicts tokens[:, j + 1]
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
