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

Padded prompts: pass a `Batch` (interp.tokens); each prompt is read at its own last real token
and computed exactly as if run alone (prompts are grouped by length and run unpadded). A plain
tensor means every position is a real token.

Baseline: a random-initialised model of the same shape; no verdict, and no sufficiency layer,
unless the clean model's accuracy clears that baseline (`clean_shows_behaviour`) and knocking
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
from transformer_lens import HookedTransformer

from interp.arch import Arch
from interp.graph import Node, Site
from interp.hooks import Patch, block_attention
from interp.hypotheses.base import Outcome, Verdict, curve_frame, estimate, random_like, readout
from interp.stats import Estimate, bootstrap
from interp.tokens import Batch, check_tokens


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
        frame = self.to_frame()
        fig = make_subplots(rows=1, cols=3, subplot_titles=(
            "accuracy", "KL to the clean output (nats)", "share of the prediction"))
        colors = {"knockout": "#d62728", "transplant": "#1f77b4", "kv_replaced": "#2ca02c",
                  "share_in_residual": "#1f77b4", "share_via_kv": "#ff7f0e"}
        for col, metric in ((1, "accuracy"), (2, "kl"), (3, "recovery")):
            for name, sub in frame[frame.metric == metric].groupby("intervention", sort=False):
                sub = sub.sort_values("layer")
                fig.add_trace(go.Scatter(x=sub.layer, y=sub.value, mode="lines+markers", name=f"{name}",
                                         line=dict(color=colors[name]), legendgroup=name, showlegend=col != 2,
                                         error_y=dict(type="data", symmetric=False,
                                                      array=sub.ci_high - sub.value,
                                                      arrayminus=sub.value - sub.ci_low)), row=1, col=col)
        clean = float(self.clean.correct.mean())
        fig.add_hline(y=clean, line_dash="dot", annotation_text="clean", row=1, col=1)
        fig.update_xaxes(title_text="layer l (intervention at layers >= l / at resid_pre[l])")
        fig.update_layout(title=f"Last-token sufficiency — {self.model_name}", template="plotly_white",
                          height=420)
        return fig


def _recovery(o: Outcome, clean: Outcome, neutral: Outcome) -> Estimate:
    def stat(x: Tensor) -> Tensor:  # x: [..., 3, n] -> ratio of means
        m = x.mean(-1)
        return (m[..., 0] - m[..., 1]) / (m[..., 2] - m[..., 1])

    return bootstrap(torch.stack([o.logprob, neutral.logprob, clean.logprob], dim=1), stat)


def _curves(model: HookedTransformer, tokens: Tensor, neutral: Tensor, answer: Tensor, batch_size: int
            ) -> tuple[Outcome, Outcome, list[Outcome], list[Outcome], list[Outcome]]:
    arch = Arch.of(model)
    L, T = arch.n_layers, tokens.shape[1] - 1
    names = [Node(layer, Site.RESID_PRE).hook_name for layer in range(L)]
    names += [Node(L - 1, Site.RESID_POST).hook_name]
    kv_names = [Node(layer, s).hook_name for layer in range(L) for s in (Site.K, Site.V)]
    clean_l, neut_l = [], []
    knock: list[list[Tensor]] = [[] for _ in range(L + 1)]
    trans: list[list[Tensor]] = [[] for _ in range(L + 1)]
    kvrep: list[list[Tensor]] = [[] for _ in range(L + 1)]
    for i in range(0, tokens.shape[0], batch_size):
        tb, nb = tokens[i: i + batch_size], neutral[i: i + batch_size]
        with torch.inference_mode():
            c_logits, c_cache = model.run_with_cache(tb, names_filter=names)
            n_logits, n_cache = model.run_with_cache(nb, names_filter=kv_names)
        clean_l.append(c_logits[:, -1])
        neut_l.append(n_logits[:, -1])
        for layer in range(L + 1):
            blocks = [block_attention(x, T, list(range(T))) for x in range(layer, L)] if T > 0 else []
            knock[layer].append(readout(model, tb, blocks, batch_size=batch_size) if blocks else c_logits[:, -1])
            site = Node(layer, Site.RESID_PRE, pos=T) if layer < L else Node(L - 1, Site.RESID_POST, pos=T)
            trans[layer].append(readout(model, nb, [Patch(site, source=c_cache[site.hook_name])],
                                        batch_size=batch_size))
            kv = [Patch(Node(x, s), pos=tuple(range(T)), source=n_cache[Node(x, s).hook_name])
                  for x in range(layer, L) for s in (Site.K, Site.V)] if T > 0 else []
            kvrep[layer].append(readout(model, tb, kv, batch_size=batch_size) if kv else c_logits[:, -1])
    clean_logits, neutral_logits = torch.cat(clean_l), torch.cat(neut_l)
    clean = Outcome.of(clean_logits, answer)
    neutral_o = Outcome.of(neutral_logits, answer, clean_logits)

    def outs(parts: list[list[Tensor]]) -> list[Outcome]:
        return [Outcome.of(torch.cat(p), answer, clean_logits) for p in parts]

    return clean, neutral_o, outs(knock), outs(trans), outs(kvrep)


def _groups(tokens: Batch, neutral: Batch | None, subset: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(example indices, unpadded tokens, unpadded neutral) per prompt length, over `subset`."""
    out = []
    lengths = tokens.lengths[subset].cpu()
    for length in sorted(set(lengths.tolist())):
        idx = subset[lengths == length]
        t = tokens.tokens[idx.to(tokens.tokens.device), :length]
        if neutral is not None:
            nt = neutral.tokens[idx.to(neutral.tokens.device), :length]
        elif len(idx) < 2:
            raise ValueError(f"tokens: expected at least 2 prompts of each length to build a neutral context from "
                             f"another example, got 1 of length {length}; pass `neutral` explicitly")
        else:
            nt = neutral_context(t)
        out.append((idx, t, nt))
    return out


def _cat(parts: list[Outcome], order: Tensor) -> Outcome:
    """Outcomes of groups concatenated in `order`, put back in example order."""
    inv = torch.argsort(order)
    return Outcome(*(torch.cat([getattr(o, f) for o in parts])[inv] for f in ("correct", "logprob", "kl")))


def _grouped_curves(model: HookedTransformer, groups: list[tuple[Tensor, Tensor, Tensor]], answer: Tensor,
                    batch_size: int) -> tuple[Outcome, Outcome, list[Outcome], list[Outcome], list[Outcome]]:
    runs = [_curves(model, t, nt, answer[idx.to(answer.device)], batch_size) for idx, t, nt in groups]
    order = torch.cat([idx for idx, _, _ in groups])
    clean = _cat([r[0] for r in runs], order)
    neutral = _cat([r[1] for r in runs], order)
    curves = [[_cat([r[k][layer] for r in runs], order) for layer in range(len(runs[0][k]))] for k in (2, 3, 4)]
    return clean, neutral, curves[0], curves[1], curves[2]


def _as_batch(tokens: Tensor | Batch, d_vocab: int, name: str, n_ctx: int) -> Batch:
    if isinstance(tokens, Batch):
        check_tokens(tokens.tokens, d_vocab, name=name, n_ctx=n_ctx)
        return tokens.right()
    return Batch.of(check_tokens(tokens, d_vocab, name=name, n_ctx=n_ctx))


def last_token_sufficiency(
    model: HookedTransformer,
    tokens: Int[Tensor, "n pos"] | Batch,
    answer: Int[Tensor, "n"],
    *,
    neutral: Int[Tensor, "n pos"] | Batch | None = None,
    baseline: HookedTransformer | None = None,
    tolerance: float = 0.05,
    batch_size: int = 256,
    seed: int = 0,
) -> LastTokenResult:
    """Knockout, transplant and K/V-replacement curves of the last position, per layer.

    `tokens`: prompts whose next token after the last real position is `answer`: a tensor of
    one length, or a padded `Batch` (each prompt read at its own last token). `neutral`: the same
    prompts with a neutral context, same lengths (default: another example's earlier tokens of
    the same length, last token kept). `baseline`: the comparison model (default:
    random-initialised, same shape). `tolerance`: how close to clean accuracy counts as
    "suffices".
    """
    arch = Arch.of(model)
    batch = _as_batch(tokens, arch.d_vocab, "tokens", arch.n_ctx)
    n, L = batch.tokens.shape[0], arch.n_layers
    answer = torch.as_tensor(answer).long().cpu()
    if answer.shape != (n,):
        raise ValueError(f"answer: expected shape ({n},), got {tuple(answer.shape)}")
    if n < 4:
        raise ValueError(f"tokens: expected at least 4 examples for confidence intervals, got {n}")
    nbatch = None
    if neutral is not None:
        nbatch = _as_batch(neutral, arch.d_vocab, "neutral", arch.n_ctx)
        if nbatch.tokens.shape[0] != n or not torch.equal(nbatch.lengths.cpu(), batch.lengths.cpu()):
            raise ValueError(f"neutral: expected {n} prompts with the same lengths as tokens "
                             f"({batch.lengths.tolist()[:8]}...), got {nbatch.tokens.shape[0]} with lengths "
                             f"{nbatch.lengths.tolist()[:8]}...")
    batch = Batch(batch.tokens.to(model.cfg.device), batch.lengths.cpu(), "right")
    if nbatch is None:  # built once over all prompts, so the baseline's subset shares it
        nt = batch.tokens.clone()
        for idx, _, group_neutral in _groups(batch, None, torch.arange(n)):
            nt[idx.to(nt.device), : group_neutral.shape[1]] = group_neutral
        nbatch = Batch(nt, batch.lengths, "right")
    else:
        nbatch = Batch(nbatch.tokens.to(model.cfg.device), nbatch.lengths.cpu(), "right")

    clean, neut, knock, trans, kv = _grouped_curves(model, _groups(batch, nbatch, torch.arange(n)), answer,
                                                    batch_size)
    base = random_like(model, seed) if baseline is None else baseline
    b_clean, _, b_knock, _, _ = _grouped_curves(base, _groups(batch, nbatch, torch.arange(min(128, n))), answer,
                                                batch_size)
    layers = tuple(range(L + 1))

    clean_acc, base_acc = estimate(clean.correct), estimate(b_clean.correct)
    drop0 = estimate(clean.correct - knock[0].correct)
    acc = [o.correct.mean().item() for o in knock]
    name = model.cfg.model_name
    shows = clean_acc.above(base_acc)
    behaviour_reason = None if shows else (
        f"clean accuracy {clean_acc} does not clear the random-initialised baseline {base_acc}, so there is no "
        f"prediction to attribute")
    suff, why = None, None
    # the first layer from which cutting the context at every later layer keeps clean accuracy
    first = next(layer for layer in layers if all(a >= clean_acc.value - tolerance for a in acc[layer:]))
    if not shows:
        why = behaviour_reason
        verdict = Verdict(False, behaviour_reason)
    elif not drop0.excludes(0.0):
        why = (f"blocking all attention from the last position to the context changes accuracy by {drop0} "
               f"(CI includes 0): the context is not needed at all")
        verdict = Verdict(False, why)
    elif first == 0:
        why = (f"cutting the context from layer 0 keeps accuracy within the tolerance {tolerance} of clean "
               f"(drop {drop0}): there is no layer contrast")
        verdict = Verdict(False, why)
    elif first >= L:
        # cutting at l = L blocks nothing: "sufficient from L" is true of any model, not a finding
        k = estimate(knock[L - 1].correct)
        contrast = estimate(clean.correct - knock[L - 1].correct)
        why = (f"no layer below n_layers={L} suffices: cutting the context at layer {L - 1} alone gives accuracy "
               f"{k} vs {clean_acc} clean")
        verdict = Verdict(False, why + " (CI of the drop includes 0)") if not contrast.low > 0 else Verdict(True, (
            f"The last position is not self-sufficient before the output: cutting its attention to earlier "
            f"positions at the last layer ({L - 1}) alone gives accuracy {k} vs {clean_acc} clean, so it still "
            f"reads the context there (random-initialised baseline {base_acc})."))
    else:
        k, prev = estimate(knock[first].correct), estimate(knock[first - 1].correct)
        contrast = estimate(clean.correct - knock[first - 1].correct)
        if not contrast.excludes(0.0) or contrast.value <= 0:
            why = (f"cutting from layer {first - 1} changes accuracy by {contrast} (CI includes 0): no layer "
                   f"contrast marks where the last position becomes sufficient")
            verdict = Verdict(False, why)
        else:
            suff = first
            verdict = Verdict(True, (
                f"The last position's residual suffices from layer {suff} on (of {L}): with its attention to "
                f"earlier positions cut at layers >= {suff}, accuracy is {k} vs {clean_acc} clean, while cutting "
                f"from layer {suff - 1} gives {prev} (random-initialised baseline {base_acc})."))
    return LastTokenResult(name, layers, clean, neut, tuple(knock), tuple(trans), tuple(kv), b_clean, b_knock[0],
                           suff, verdict, meta={"n": n, "tolerance": tolerance,
                                                "lengths": sorted(set(batch.lengths.tolist()))},
                           clean_shows_behaviour=shows, behaviour_reason=behaviour_reason, sufficiency_reason=why)
