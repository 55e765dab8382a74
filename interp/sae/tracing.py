"""Trace SAE features through a model: where they fire, what they write, what they cause.

- `trace`: feature activations over a dataset, with each feature's top-activating contexts
  (the firing token highlighted) and its direct logit effect.
- `direct_logit_effect`: a feature's decoder direction through the unembedding, with the final
  norm handled as in the logit lens (nostalgebraist 2020): centred (LayerNorm), multiplied by the
  norm's weight and divided by its scale (the per-token norm of the final residual; by default
  1, which keeps the ranking of tokens; `trace` uses the dataset's mean scale).
- `feature_attribution`: activation x gradient attribution of a metric to features (Syed et al. 2023's
  attribution patching applied to SAE features, as in Marks et al. 2024, "Sparse feature
  circuits"), checked against exact feature ablation by `check_attribution` (report the
  correlation: saturation and cancellation make the linear estimate fail, Kramar et al. 2024).
  (Not `interp.patching.attribute`, which attributes a metric to model nodes, not SAE features.)
- `ablate`: exact ablation of a set of features (the SAE error term is kept, so nothing else
  changes) and the metric that results.
- `steer`: add a multiple of a feature's decoder direction at the SAE's hook (Templeton et al.
  2024, "Scaling monosemanticity", feature steering).

Every function takes `Prompts` (or a padded `Batch`, or a token tensor), runs through
`interp.hooks.run` (right-padded: each prompt's values equal running it alone), selects positions
by name (`positions="last"`, a span name, "all", indices or a mask) and takes metrics of the one
contract ``metric(logits, prompts) -> [batch]`` (`interp.metrics`; a one-argument
TransformerLens-style metric is applied per example through `interp.metrics.as_metric`).
"""

from __future__ import annotations

import contextlib
import html
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from plotly.subplots import make_subplots
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm

from interp.graph import FINAL_NORM_SCALE, RESIDUAL_WRITERS, Node, site_of
from interp.hooks import Map, intervene, run
from interp.metrics import Metric, as_metric
from interp.prompts import Prompts
from interp.sae.checks import check_sae
from interp.sae.data import Positions, as_batch, chunks, position_mask
from interp.sae.evaluation import splice_edit
from interp.stats import pearson
from interp.tl import HookedTransformer
from interp.tokens import Batch, Tokenizer


def _writes_residual(name: str) -> bool:
    return site_of(name) in RESIDUAL_WRITERS


def _features_index(sae: SAE, features: Sequence[int] | Tensor | None) -> Tensor:
    if features is None:
        return torch.arange(sae.cfg.d_sae)
    idx = torch.as_tensor(list(features) if not isinstance(features, Tensor) else features, dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= sae.cfg.d_sae):
        raise ValueError(f"features: expected indices in [0, {sae.cfg.d_sae}), got [{int(idx.min())}, {int(idx.max())}]")
    return idx


# ------------------------------------------------------------------------------ direct logit effect

def direct_logit_effect(
    model: HookedTransformer, sae: SAE, features: Sequence[int] | Tensor | None = None, *,
    scale: float | Tensor = 1.0, allow_mismatch: bool = False,
) -> Float[Tensor, "feature d_vocab"]:
    """Each feature's decoder direction through the final norm (linearised) and the unembedding.

    LayerNorm centres the direction and multiplies it by the norm's weight; RMSNorm only
    multiplies. `scale` is the final norm's scale (the divisor it applies), as the logit lens
    freezes it; pass the mean ``ln_final.hook_scale`` of a dataset for logit units.
    """
    return _direct_logit_effect(model, sae, check_sae(model, sae, allow_mismatch=allow_mismatch), features,
                                scale=scale)


def _direct_logit_effect(model: HookedTransformer, sae: SAE, name: str, features: Sequence[int] | Tensor | None,
                         *, scale: float | Tensor) -> Tensor:
    if not _writes_residual(name):
        raise ValueError(f"direct logit effect of an SAE at {name}: expected a hook that writes to the residual "
                         f"stream (sites {', '.join(s.value for s in RESIDUAL_WRITERS)}), got {name}")
    idx = _features_index(sae, features)
    d = sae.W_dec.detach()[idx.to(sae.W_dec.device)].to(model.W_U.device, model.W_U.dtype)
    norm = model.cfg.normalization_type
    if norm in ("LN", "LNPre"):
        d = d - d.mean(-1, keepdim=True)
    w = getattr(getattr(model, "ln_final", None), "w", None)
    if w is not None and norm is not None:
        d = d * w.detach()
    return (d @ model.W_U.detach()) / torch.as_tensor(scale, device=d.device, dtype=d.dtype)


def final_norm_scale(model: HookedTransformer, prompts: Tensor | Batch | Prompts, *, batch_size: int = 64) -> float:
    """Mean scale of the final norm over the real tokens of `prompts` (1.0 without a final norm)."""
    if FINAL_NORM_SCALE not in model.hook_dict:
        return 1.0
    batch = as_batch(prompts, model.cfg.d_vocab)
    total, count = 0.0, 0
    for sl, part in chunks(batch, batch_size):
        s = run(model, part, captures=[FINAL_NORM_SCALE], logits=False).acts[FINAL_NORM_SCALE][..., 0]
        m = batch.mask[sl].to(s.device)
        total += float(s[m].double().sum())
        count += int(m.sum())
    return total / count


# ------------------------------------------------------------------------------------- trace

@dataclass(frozen=True)
class Context:
    """One top-activating context of a feature."""

    feature: int
    rank: int
    activation: float
    example: int
    pos: int
    tokens: tuple[str, ...]
    highlight: int  # index into `tokens` of the firing token

    def text(self, marker: tuple[str, str] = ("[[", "]]")) -> str:
        return " ".join(f"{marker[0]}{t}{marker[1]}" if i == self.highlight else t for i, t in enumerate(self.tokens))

    def html(self) -> str:
        return " ".join(f"<b><span style='color:#c0392b'>{html.escape(t)}</span></b>" if i == self.highlight
                        else html.escape(t)
                        for i, t in enumerate(self.tokens))


@dataclass(frozen=True)
class FeatureTrace:
    """Where features fire over a dataset and what they write to the logits."""

    hook_name: str
    features: Int[Tensor, "feature"]
    frequency: Float[Tensor, "feature"]
    mean_activation: Float[Tensor, "feature"]
    top_values: Float[Tensor, "feature k"]
    top_examples: Int[Tensor, "feature k"]
    top_positions: Int[Tensor, "feature k"]
    logit_effect: Float[Tensor, "feature d_vocab"]
    contexts: tuple[tuple[Context, ...], ...]
    activation_samples: tuple[Tensor, ...]
    vocab: tuple[str, ...] | None = None
    n_tokens: int = 0
    scale: float = 1.0

    @property
    def values(self) -> Tensor:
        return self.top_values

    def index(self, feature: int) -> int:
        hits = (self.features == feature).nonzero()
        if not hits.numel():
            raise KeyError(f"feature {feature}: expected one of the traced features {self.features.tolist()[:10]}..., "
                           f"got one not traced")
        return int(hits[0, 0])

    def to_frame(self) -> pd.DataFrame:
        """One row per (feature, top context)."""
        rows = []
        for i, f in enumerate(self.features.tolist()):
            for c in self.contexts[i]:
                rows.append({"feature": f, "rank": c.rank, "activation": c.activation, "example": c.example,
                             "pos": c.pos, "context": c.text(), "context_html": c.html(), "frequency": float(self.frequency[i])})
        return pd.DataFrame(rows)

    def top_logits(self, feature: int, k: int = 10) -> pd.DataFrame:
        """The tokens a feature most promotes and suppresses (direct logit effect)."""
        eff = self.logit_effect[self.index(feature)]
        k = min(k, eff.numel())
        rows = []
        for sign, (vals, ids) in (("promoted", eff.topk(k)), ("suppressed", (-eff).topk(k))):
            for v, t in zip(vals.tolist(), ids.tolist(), strict=True):
                rows.append({"feature": feature, "direction": sign, "token": self._tok(t),
                             "effect": v if sign == "promoted" else -v})
        return pd.DataFrame(rows)

    def _tok(self, t: int) -> str:
        return self.vocab[t] if self.vocab is not None and t < len(self.vocab) else str(t)

    def plot(self, feature: int | None = None) -> go.Figure:
        """A dashboard for one feature (default: the most frequent traced feature)."""
        if feature is None:
            feature = int(self.features[int(self.frequency.argmax())])
        return feature_dashboard(self, feature)


def feature_dashboard(trace: FeatureTrace, feature: int, *, n_logits: int = 8) -> go.Figure:
    """One feature's dashboard (after Bricken et al. 2023's feature browser): activation
    histogram, the tokens it promotes and suppresses, its top contexts (built from the frames)."""
    i = trace.index(feature)
    contexts = trace.to_frame()
    contexts = contexts[contexts["feature"] == feature]
    logits = trace.top_logits(feature, n_logits)
    fig = make_subplots(rows=2, cols=2, specs=[[{"type": "xy"}, {"type": "xy"}], [{"type": "table", "colspan": 2}, None]],
                        subplot_titles=("activation density (non-zero)", "direct logit effect",
                                        "top-activating contexts"), vertical_spacing=0.12, row_heights=[0.45, 0.55])
    fig.add_trace(go.Histogram(x=trace.activation_samples[i].tolist(), nbinsx=40, name="activation"), row=1, col=1)
    for direction, colour in (("promoted", "#2166ac"), ("suppressed", "#b2182b")):
        sub = logits[logits["direction"] == direction]
        fig.add_trace(go.Bar(x=sub["effect"], y=sub["token"], orientation="h", marker_color=colour, name=direction),
                      row=1, col=2)
    texts = list(contexts["context_html"])
    fig.add_trace(go.Table(header=dict(values=["activation", "example", "pos", "context"]),
                           cells=dict(values=[[f"{a:.3f}" for a in contexts["activation"]], list(contexts["example"]),
                                              list(contexts["pos"]), texts], align="left"),
                           columnwidth=[1, 1, 1, 8]), row=2, col=1)
    fig.update_layout(title=f"feature {feature} at {trace.hook_name}: fires on {float(trace.frequency[i]):.2%} of "
                            f"tokens, max {float(trace.top_values[i, 0]):.3f}", template="plotly_white",
                      height=650, showlegend=False)
    return fig


def _decode_tokens(tokenizer: Tokenizer | None, ids: list[int]) -> tuple[str, ...]:
    if tokenizer is None:
        return tuple(str(i) for i in ids)
    return tuple(tokenizer.decode([i]) for i in ids)


def trace(
    model: HookedTransformer,
    sae: SAE,
    prompts: Tensor | Batch | Prompts,
    features: Sequence[int] | Tensor | None = None,
    *,
    k: int = 10,
    tokenizer: Tokenizer | None = None,
    window: tuple[int, int] = (10, 3),
    positions: Positions = "all",
    batch_size: int = 64,
    n_samples: int = 2000,
    progress: bool = False,
    allow_mismatch: bool = False,
) -> FeatureTrace:
    """Feature activations over `prompts`: frequency, mean, top-`k` contexts and direct logit effect.

    `window` is how many tokens before and after the firing token a context shows.
    `n_samples` non-zero activations per feature are kept for the histogram of the dashboard.
    The SAE's recorded hook and model are checked (`check_sae`; `allow_mismatch` skips that).
    """
    name = check_sae(model, sae, allow_mismatch=allow_mismatch)
    batch = as_batch(prompts, model.cfg.d_vocab)
    mask = position_mask(batch, positions)
    idx = _features_index(sae, features)
    nf = idx.numel()
    width = batch.tokens.shape[1]
    top_v = torch.full((nf, k), -float("inf"))
    top_flat = torch.full((nf, k), -1, dtype=torch.long)
    fire = torch.zeros(nf, dtype=torch.float64)
    total = torch.zeros(nf, dtype=torch.float64)
    samples: list[list[Tensor]] = [[] for _ in range(nf)]
    n_tok = 0
    scale_sum, scale_n = 0.0, 0
    want_scale = FINAL_NORM_SCALE in model.hook_dict and _writes_residual(name)
    for sl, part in tqdm(list(chunks(batch, batch_size)), desc=f"tracing features at {name}", disable=not progress):
        start = sl.start
        m = mask[sl]
        names = [name] + ([FINAL_NORM_SCALE] if want_scale else [])
        cache = run(model, part, captures=names, logits=False).acts
        with torch.no_grad():
            acts = sae.encode(cache[name].to(sae.dtype).to(sae.device))[..., idx.to(sae.device)].float().cpu()
        if want_scale:
            s = cache[FINAL_NORM_SCALE][..., 0].cpu()
            scale_sum += float(s[batch.mask[sl]].double().sum())
            scale_n += int(batch.mask[sl].sum())
        acts = torch.where(m[..., None], acts, torch.zeros_like(acts))  # [b, pos, nf]
        n_tok += int(m.sum())
        fire += (acts != 0).sum((0, 1)).double()
        total += acts.sum((0, 1)).double()
        flat = acts.reshape(-1, nf).T  # [nf, b*pos]
        cand_v = torch.cat([top_v, flat], dim=1)
        cand_i = torch.cat([top_flat, torch.arange(flat.shape[1]).expand(nf, -1) + start * width], dim=1)
        kk = min(k, cand_v.shape[1])
        v, j = cand_v.topk(kk, dim=1)
        top_v[:, :kk], top_flat[:, :kk] = v, cand_i.gather(1, j)
        for i in range(nf):
            have = sum(t.numel() for t in samples[i])
            if have < n_samples:
                nz = flat[i][flat[i] != 0]
                samples[i].append(nz[: n_samples - have])
    contexts = []
    for i in range(nf):
        row = []
        for r in range(k):
            v, fl = float(top_v[i, r]), int(top_flat[i, r])
            if fl < 0 or not v > 0:
                continue
            ex, pos = divmod(fl, width)
            lo = max(0, pos - window[0])
            hi = min(int(batch.lengths[ex]), pos + window[1] + 1)
            ids = batch.tokens[ex, lo:hi].tolist()
            row.append(Context(int(idx[i]), r, v, ex, pos, _decode_tokens(tokenizer, ids), pos - lo))
        contexts.append(tuple(row))
    scale = scale_sum / scale_n if scale_n else 1.0
    effect = (_direct_logit_effect(model, sae, name, idx, scale=scale).float().cpu()
              if _writes_residual(name) else torch.zeros(nf, model.cfg.d_vocab))
    vocab = getattr(tokenizer, "vocab", None)
    if vocab is None and tokenizer is not None:
        vocab = tuple(tokenizer.decode([t]) for t in range(model.cfg.d_vocab))
    top_ex = torch.where(top_flat >= 0, top_flat // width, -1)
    top_pos = torch.where(top_flat >= 0, top_flat % width, -1)
    return FeatureTrace(
        hook_name=name, features=idx, frequency=(fire / max(n_tok, 1)).float(),
        mean_activation=(total / max(n_tok, 1)).float(), top_values=top_v, top_examples=top_ex,
        top_positions=top_pos, logit_effect=effect, contexts=tuple(contexts),
        activation_samples=tuple(torch.cat(s) if s else torch.zeros(0) for s in samples),
        vocab=tuple(vocab) if vocab is not None else None, n_tokens=n_tok, scale=scale)


def feature_activations(
    model: HookedTransformer, sae: SAE, prompts: Tensor | Batch | Prompts, *,
    positions: Positions = "last", batch_size: int = 64, allow_mismatch: bool = False,
) -> Float[Tensor, "n_act d_sae"]:
    """All feature activations at the selected positions (one row per selected token, in prompt
    order then position order; "last" and other names read each prompt's own positions)."""
    name = check_sae(model, sae, allow_mismatch=allow_mismatch)
    batch = as_batch(prompts, model.cfg.d_vocab)
    mask = position_mask(batch, positions)
    out = []
    for sl, part in chunks(batch, batch_size):
        act = run(model, part, captures=[name], logits=False).acts[name]
        with torch.no_grad():
            x = act[mask[sl].to(act.device)]
            out.append(sae.encode(x.to(sae.dtype).to(sae.device)).float().cpu())
    return torch.cat(out)


# ------------------------------------------------------------------------------ ablation & steering

def zero_features(features: Tensor) -> Callable[[Tensor], Tensor]:
    """A feature edit (for `splice`): the activations of `features` set to 0."""
    def edit(f: Tensor) -> Tensor:
        f = f.clone()
        f[..., features.to(f.device)] = 0
        return f

    return edit


def ablate(
    model: HookedTransformer, sae: SAE, prompts: Tensor | Batch | Prompts, features: Sequence[int] | Tensor,
    metric: Metric | Callable[[Tensor], Tensor] | None = None, *, positions: Positions = "all", batch_size: int = 64,
    allow_mismatch: bool = False,
) -> Tensor:
    """Run with `features` zeroed at `positions` (error term kept); return the metric per example
    [batch] (`metric(logits, prompts)`), or the logits [batch, pos, d_vocab] (right-padded
    layout) without a metric."""
    name = check_sae(model, sae, allow_mismatch=allow_mismatch)
    idx = _features_index(sae, features)
    batch = as_batch(prompts, model.cfg.d_vocab)
    mask = position_mask(batch, positions)
    fn = as_metric(metric) if metric is not None else None
    outs = []
    for sl, part in chunks(batch, batch_size):
        edit = splice_edit(sae, name, error_term=True, edit=zero_features(idx), mask=mask[sl])
        logits = run(model, part, edits=[edit]).logits
        outs.append(fn(logits, part) if fn is not None else logits)
    return torch.cat(outs)


def steering_edit(sae: SAE, name: str, feature: int, coefficient: float, mask: Tensor | None = None) -> Map:
    """`coefficient` x the feature's decoder row added at hook `name` (at `mask`'s positions) as an
    intervention for `interp.hooks.run`."""
    idx = _features_index(sae, [feature])
    direction = sae.W_dec.detach()[int(idx[0])]

    def add(act: Tensor) -> Tensor:
        d = (coefficient * direction).to(act.device, act.dtype)
        if mask is None:
            return act + d
        return act + mask.to(act.device)[..., None].to(act.dtype) * d

    return Map(name, fn=add)


@contextlib.contextmanager
def steer(
    model: HookedTransformer, sae: SAE, feature: int, coefficient: float, *,
    mask: Tensor | None = None, hook: str | Node | None = None, allow_mismatch: bool = False,
) -> Iterator[HookedTransformer]:
    """Within the block, `coefficient` x the feature's decoder row is added at the SAE's hook.

    The decoder row is used as stored (sae-lens inference SAEs usually have unit-norm rows), so
    `coefficient` is in units of the feature's activation. `mask` (bool [batch, pos]) limits the
    positions; by default every position is steered. The SAE's recorded hook and model are
    checked (`check_sae`; `allow_mismatch` skips that).
    """
    name = check_sae(model, sae, hook, allow_mismatch=allow_mismatch)
    with intervene(model, [steering_edit(sae, name, feature, coefficient, mask)], strict=False):
        yield model


# ----------------------------------------------------------------------------------- attribution

@dataclass(frozen=True)
class FeatureAttribution:
    """Activation x gradient attribution of a metric to features, per example (positions summed).

    ``scores[b, i]`` estimates metric(clean) - metric(feature i ablated) for example b.
    """

    hook_name: str
    scores: Float[Tensor, "batch d_sae"]
    activations: Float[Tensor, "batch d_sae"]
    metric: Float[Tensor, "batch"]

    @property
    def values(self) -> Tensor:
        return self.scores

    def top(self, n: int = 10, by: str = "abs") -> Tensor:
        """Feature indices with the largest mean attribution (by absolute value, or signed)."""
        m = self.scores.mean(0)
        return (m.abs() if by == "abs" else m).topk(min(n, m.numel())).indices

    def to_frame(self) -> pd.DataFrame:
        """One row per feature that is active somewhere: its mean attribution and activation."""
        m, a = self.scores.mean(0), self.activations.mean(0)
        active = (self.activations != 0).any(0).nonzero()[:, 0]
        return pd.DataFrame({"feature": active.tolist(), "attribution": m[active].tolist(),
                             "activation": a[active].tolist()}).sort_values("attribution", key=abs, ascending=False)

    def plot(self, n: int = 20) -> go.Figure:
        frame = self.to_frame().head(n)
        fig = go.Figure(go.Bar(x=[str(f) for f in frame["feature"]], y=frame["attribution"]))
        fig.update_layout(title=f"Feature attribution at {self.hook_name} (activation x gradient)",
                          xaxis_title="feature", yaxis_title="mean attribution", template="plotly_white")
        return fig


def feature_attribution(
    model: HookedTransformer, sae: SAE, prompts: Tensor | Batch | Prompts, metric: Metric | Callable[[Tensor], Tensor], *,
    positions: Positions = "all", batch_size: int = 32, allow_mismatch: bool = False,
) -> FeatureAttribution:
    """Attribute `metric` (per example, ``metric(logits, prompts)``) to the SAE's features:
    activation x d metric / d activation, summed over the selected positions.

    The SAE is spliced in with its error term at the selected positions (so the forward pass is
    the model's own); feature activations are leaves of the gradient computation.
    """
    name = check_sae(model, sae, allow_mismatch=allow_mismatch)
    batch = as_batch(prompts, model.cfg.d_vocab)
    mask = position_mask(batch, positions)
    fn_metric = as_metric(metric)
    scores, acts, metrics = [], [], []
    for sl, part in chunks(batch, batch_size):
        m = mask[sl]
        leaf: dict[str, Tensor] = {}

        def leaf_fn(act: Tensor, leaf: dict[str, Tensor] = leaf, m: Tensor = m) -> Tensor:
            x = act.to(sae.dtype).to(sae.device)
            f = sae.encode(x).detach().requires_grad_(True)
            leaf["f"] = f
            new = sae.decode(f)
            new = new + (x - new).detach()  # error term: the forward pass is unchanged
            return torch.where(m.to(act.device)[..., None], new.to(act.dtype).to(act.device), act)

        out = run(model, part, edits=[Map(name, fn=leaf_fn)], grad=True)
        with torch.enable_grad():
            values = fn_metric(out.logits, part)
            (grad,) = torch.autograd.grad(values.sum(), leaf["f"])
        f = leaf["f"].detach()
        mm = m.to(f.device)[..., None]
        scores.append((f * grad * mm).sum(1).float().cpu())
        acts.append((f * mm).sum(1).float().cpu())
        metrics.append(values.detach().float().cpu())
    return FeatureAttribution(name, torch.cat(scores), torch.cat(acts), torch.cat(metrics))


@dataclass(frozen=True)
class AttributionCheck:
    """Attribution versus exact ablation for a set of features."""

    features: Int[Tensor, "feature"]
    estimated: Float[Tensor, "batch feature"]
    exact: Float[Tensor, "batch feature"]
    correlation: float
    correlation_mean: float

    @property
    def values(self) -> dict[str, float]:
        return {"correlation": self.correlation, "correlation_mean": self.correlation_mean}

    def to_frame(self) -> pd.DataFrame:
        b, n = self.estimated.shape
        return pd.DataFrame({"example": torch.arange(b).repeat_interleave(n).tolist(),
                             "feature": self.features.repeat(b).tolist(),
                             "estimated": self.estimated.flatten().tolist(),
                             "exact": self.exact.flatten().tolist()})

    def plot(self) -> go.Figure:
        frame = self.to_frame()
        fig = go.Figure(go.Scatter(x=frame["exact"], y=frame["estimated"], mode="markers",
                                   text=[f"feature {f}" for f in frame["feature"]]))
        fig.update_layout(title=f"Attribution vs exact ablation: r = {self.correlation:.3f}",
                          xaxis_title="exact: metric(clean) - metric(ablated)",
                          yaxis_title="activation x gradient", template="plotly_white")
        return fig


def check_attribution(
    model: HookedTransformer, sae: SAE, prompts: Tensor | Batch | Prompts, metric: Metric | Callable[[Tensor], Tensor],
    attribution: FeatureAttribution, features: Sequence[int] | Tensor | None = None, *, n: int = 20,
    positions: Positions = "all", batch_size: int = 64, allow_mismatch: bool = False,
) -> AttributionCheck:
    """Exact single-feature ablations for `features` (default: the top `n` by |attribution|),
    compared with the attribution estimates: Pearson r over (example, feature) pairs and over
    per-feature means."""
    idx = attribution.top(n) if features is None else _features_index(sae, features)
    exact = torch.stack([attribution.metric - ablate(model, sae, prompts, [int(i)], metric, positions=positions,
                                                     batch_size=batch_size,
                                                     allow_mismatch=allow_mismatch).float().cpu()
                         for i in idx.tolist()], dim=1)
    est = attribution.scores[:, idx]
    return AttributionCheck(idx, est, exact, pearson(est, exact), pearson(est.mean(0), exact.mean(0)))


@dataclass(frozen=True)
class Steering:
    """Metric under steering by several coefficients of one feature's decoder direction."""

    feature: int
    coefficients: Float[Tensor, "coef"]
    metric: Float[Tensor, "coef batch"]

    @property
    def values(self) -> Tensor:
        return self.metric

    def to_frame(self) -> pd.DataFrame:
        c, b = self.metric.shape
        return pd.DataFrame({"coefficient": self.coefficients.repeat_interleave(b).tolist(),
                             "example": torch.arange(b).repeat(c).tolist(),
                             "metric": self.metric.flatten().tolist()})

    def plot(self) -> go.Figure:
        from interp.viz import curves

        frame = self.to_frame().groupby("coefficient", as_index=False)["metric"].mean()
        return curves(frame, x="coefficient", y="metric", title=f"Steering feature {self.feature}")


def steering_curve(
    model: HookedTransformer, sae: SAE, prompts: Tensor | Batch | Prompts, feature: int, coefficients: Sequence[float],
    metric: Metric | Callable[[Tensor], Tensor], *, mask: Tensor | None = None, allow_mismatch: bool = False,
) -> Steering:
    """The metric (per example) when steering `feature` by each coefficient (`mask`: bool
    [batch, pos] positions to steer, right-padded layout; default every position)."""
    name = check_sae(model, sae, allow_mismatch=allow_mismatch)
    batch = as_batch(prompts, model.cfg.d_vocab)
    fn = as_metric(metric)
    rows = []
    for c in coefficients:
        out = run(model, batch, edits=[steering_edit(sae, name, feature, float(c), mask)])
        rows.append(fn(out.logits, batch).float().cpu())
    return Steering(feature, torch.tensor(list(coefficients), dtype=torch.float32), torch.stack(rows))


__all__ = ["AttributionCheck", "Context", "FeatureAttribution", "FeatureTrace", "Metric", "Steering",
           "ablate", "check_attribution", "direct_logit_effect", "feature_activations", "feature_attribution",
           "feature_dashboard", "final_norm_scale", "steer", "steering_curve", "steering_edit", "trace",
           "zero_features"]
