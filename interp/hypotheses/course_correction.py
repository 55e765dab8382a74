"""Course-correction: what a model does after a surprising token, and which route carries recovery.

Protocol (METHODS.md, "Decoding dynamics"). For each prompt (a context after which the model
decodes its planned continuation), decode greedily `steps + 1` tokens: the *unforced* run u_0..u_k,
the model's own plan. Then force a surprise x~ != u_0 at step 0 (the position t+1 after the
prompt's last token t) and decode the following k steps greedily: the *forced* run c_1..c_k.
Measured against the unforced run, per example:

- divergence: KL(p_unforced,s || p_forced,s) of the next-token distributions at steps s = 1..k;
- outcome category (first that matches): ``finish`` (c_1..c_{W-1} = u_1..u_{W-1}: the planned
  continuation goes on as if the surprise had been u_0), ``restart`` (c_1..c_W = u_0..u_{W-1}: the
  plan is emitted again from its start), ``replan`` (c_1..c_{W-1} continues one of the given
  `alternatives` whose first token is x~), ``drift`` (none of these); W = `steps`;
- notice: the lens (logit lens at every layer) at the surprise position (step 1): the log-prob of
  the plan's next token u_1, forced minus unforced; the first layer where the drop's CI excludes 0
  is where the model's internal prediction registers the surprise;
- route: the recovery measure m = log p(u_1) at the surprise position of the forced sequence.
  Cutting the K/V route = blocking attention from the surprise position to every pre-surprise
  position at every layer (`interp.hooks.block_attention`); cutting the residual route = replacing
  the surprise token's embedding by the mean embedding of the candidate tokens (the residual at
  the surprise position keeps only its position). Each cut's effect is the drop in m (a negative
  drop: the cut *helps* the plan, i.e. that route carries the derailment); the K/V share is
  drop_kv / (|drop_kv| + |drop_resid|) (ratio of means, bootstrap CI over examples). A route is
  named only when the outcome is a recovery (finish or restart) and its drop clears the baseline.

Every aggregate carries a percentile-bootstrap CI over examples and is repeated on a
random-initialised model of the same shape (`interp.models.random_like`); a verdict is stated
only when the effect clears that baseline. When the prompts carry a ground-truth plan (`plan`),
`on_plan` is the share whose unforced run follows it (the clean run shows the behaviour).

Caveat: the residual cut keeps the positional signal (learned or rotary) of the surprise position;
a model that reads "which step am I at" from its position alone needs no K/V for that part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.arch import Arch
from interp.decoding import generate
from interp.graph import HOOK_EMBED
from interp.hooks import SetAt, block_attention, run
from interp.hypotheses.base import Verdict, estimate_n, prompts_of
from interp.models import random_like
from interp.prompts import Prompts
from interp.stats import bootstrap
from interp.tl import HookedTransformer
from interp.tokens import Batch
from interp.viz import curves

Surprise = Literal["lowest", "random"]
CATEGORIES = ("finish", "restart", "replan", "drift")


@dataclass(frozen=True)
class CourseInputs:
    """Contexts to decode after, the ground-truth plan [batch, W] (or None), the tokens a surprise
    may be drawn from, and alternative plans [m, W] (for ``replan``)."""

    prompts: Prompts
    plan: Int[Tensor, "batch w"] | None
    candidates: Int[Tensor, "c"] | None
    alternatives: Int[Tensor, "m w"] | None


def planning_inputs(n: int = 200, seed: int = 0) -> CourseInputs:
    """`organism:planning`: contexts ending at ``say`` (the word is fixed there), the word as the
    plan, the lexicon's syllables as surprise candidates and the lexicon as alternatives."""
    from interp.organisms import planning

    full = planning.prompts(n, seed)
    say = full.index("plan")
    w0, w1 = full.span("word")[:, 0], full.span("word")[:, 1]
    r = full.right()
    ctx = [r.tokens[i, : int(say[i]) + 1] for i in range(n)]
    plan = torch.stack([r.tokens[i, int(w0[i]): int(w1[i])] for i in range(n)])
    lex = planning.lexicon()
    return CourseInputs(Prompts.from_tokens(ctx), plan, torch.unique(lex), lex)


@dataclass(frozen=True)
class Measured:
    """Per-example measurements of one model (CPU tensors; NaN where undefined)."""

    surprise: Int[Tensor, "batch"]
    unforced: Int[Tensor, "batch k1"]
    forced: Int[Tensor, "batch k1"]
    divergence: Float[Tensor, "batch k"]
    category: Int[Tensor, "batch"]  # index into CATEGORIES
    notice: Float[Tensor, "layer batch"]
    m_forced: Float[Tensor, "batch"]
    drop_kv: Float[Tensor, "batch"]
    drop_resid: Float[Tensor, "batch"]
    on_plan: Float[Tensor, "batch"]

    def rate(self, cat: str) -> Float[Tensor, "batch"]:
        return (self.category == CATEGORIES.index(cat)).double()


def _share(kv: Tensor, resid: Tensor, alpha: float, n_boot: int, seed: int) -> tuple[float, float, float]:
    ok = torch.isfinite(kv) & torch.isfinite(resid)
    v = torch.stack([kv[ok], resid[ok]], 1).double()
    if v.shape[0] < 2:
        return math.nan, math.nan, math.nan

    def stat(x: Tensor) -> Tensor:  # x: [..., 2, n]
        a, b = x[..., 0, :].mean(-1), x[..., 1, :].mean(-1)
        return a / (a.abs() + b.abs()).clamp_min(1e-12)

    e = bootstrap(v, stat, alpha=alpha, n_boot=n_boot, seed=seed)
    return e.value, e.low, e.high


@dataclass(frozen=True)
class CourseCorrectionResult:
    """Per-example course-correction measurements for a model and its random-initialised baseline."""

    model_name: str
    steps: int
    labels: tuple[str, ...]
    model: Measured
    baseline: Measured | None
    alpha: float = 0.05
    n_boot: int = 1000

    @property
    def values(self) -> Float[Tensor, "k"]:
        """Mean divergence (nats) at each step after the surprise."""
        return self.model.divergence.nanmean(0)

    @property
    def per_example(self) -> Float[Tensor, "batch k"]:
        return self.model.divergence

    def _rows(self, which: str, m: Measured) -> list[dict]:
        kw = dict(alpha=self.alpha, n_boot=self.n_boot)
        rows = []
        for s in range(m.divergence.shape[1]):
            e, n = estimate_n(m.divergence[:, s], **kw)
            rows.append(dict(model=which, measure="divergence", step=s + 1, layer=None, category=None,
                             value=e.value, ci_low=e.low, ci_high=e.high, n=n))
        for c in CATEGORIES:
            e, n = estimate_n(m.rate(c), **kw)
            rows.append(dict(model=which, measure="rate", step=None, layer=None, category=c, value=e.value,
                             ci_low=e.low, ci_high=e.high, n=n))
        for layer in range(m.notice.shape[0]):
            e, n = estimate_n(m.notice[layer], **kw)
            rows.append(dict(model=which, measure="notice", step=1, layer=layer, category=None, value=e.value,
                             ci_low=e.low, ci_high=e.high, n=n))
        for name, v in (("m_forced", m.m_forced), ("drop_kv", m.drop_kv), ("drop_resid", m.drop_resid),
                        ("on_plan", m.on_plan)):
            e, n = estimate_n(v, **kw)
            rows.append(dict(model=which, measure=name, step=1, layer=None, category=None, value=e.value,
                             ci_low=e.low, ci_high=e.high, n=n))
        s, lo, hi = _share(m.drop_kv, m.drop_resid, self.alpha, self.n_boot, seed=0)
        rows.append(dict(model=which, measure="kv_share", step=1, layer=None, category=None, value=s, ci_low=lo,
                         ci_high=hi, n=int(torch.isfinite(m.drop_kv).sum())))
        return rows

    def to_frame(self) -> pd.DataFrame:
        """Tidy rows (model, measure, step, layer, category, value, ci_low, ci_high, n); measures:
        divergence (nats, per step), rate (per category), notice (nats, per lens layer), m_forced,
        drop_kv, drop_resid (nats), on_plan, kv_share."""
        rows = self._rows("model", self.model)
        if self.baseline is not None:
            rows += self._rows("baseline", self.baseline)
        return pd.DataFrame(rows)

    def _get(self, f: pd.DataFrame, which: str, measure: str, **kw: object) -> pd.Series:
        sel = (f.model == which) & (f.measure == measure)
        for k, v in kw.items():
            sel &= f[k] == v
        return f[sel].iloc[0]

    def notice_layer(self) -> int | None:
        """The first lens layer whose forced-minus-unforced log p(u_1) lies below 0 (CI) and below
        the baseline's CI; None when no layer clears it."""
        f = self.to_frame()
        for layer in range(self.model.notice.shape[0]):
            m = self._get(f, "model", "notice", layer=layer)
            below = m.ci_high < 0
            if self.baseline is not None:
                b = self._get(f, "baseline", "notice", layer=layer)
                below = below and m.ci_high < b.ci_low
            if below:
                return layer
        return None

    @property
    def verdict(self) -> Verdict:
        """The outcome categories that clear the random baseline, and the route of a recovery."""
        if self.baseline is None:
            return Verdict(False, "no random baseline was run")
        f = self.to_frame()
        best = max(CATEGORIES, key=lambda c: self._get(f, "model", "rate", category=c).value)

        def rate(c: str) -> str:
            m, b = self._get(f, "model", "rate", category=c), self._get(f, "baseline", "rate", category=c)
            return (f"'{c}' {m.value:.1%} [{m.ci_low:.1%}, {m.ci_high:.1%}] (random-initialised {b.value:.1%} "
                    f"[{b.ci_low:.1%}, {b.ci_high:.1%}])")

        above = [c for c in CATEGORIES if self._get(f, "model", "rate", category=c).ci_low
                 > self._get(f, "baseline", "rate", category=c).ci_high]
        behaviour = f"after a forced surprise the commonest outcome is {rate(best)}"
        if not above:
            return Verdict(False, behaviour + "; no outcome's rate clears the random baseline")
        behaviour += "; above the baseline: " + ", ".join(rate(c) for c in above)
        best = max(above, key=lambda c: self._get(f, "model", "rate", category=c).value)
        kv, kv_b = self._get(f, "model", "drop_kv"), self._get(f, "baseline", "drop_kv")
        rs, rs_b = self._get(f, "model", "drop_resid"), self._get(f, "baseline", "drop_resid")
        cuts = (f"cutting the pre-surprise K/V changes log p(u_1) by {-kv.value:+.2f} nats "
                f"[{-kv.ci_high:+.2f}, {-kv.ci_low:+.2f}] (random init {-kv_b.value:+.2f}); replacing the "
                f"surprise's embedding by the mean candidate embedding by {-rs.value:+.2f} "
                f"[{-rs.ci_high:+.2f}, {-rs.ci_low:+.2f}] (random init {-rs_b.value:+.2f})")
        if best not in ("finish", "restart"):
            return Verdict(True, behaviour + f"; no recovery to attribute to a route ({cuts})")
        clears = {"K/V of the pre-surprise positions": kv.ci_low > max(kv_b.ci_high, 0),
                  "residual stream at the surprise position": rs.ci_low > max(rs_b.ci_high, 0)}
        named = [k for k, ok in clears.items() if ok]
        if not named:
            return Verdict(True, behaviour + f"; neither route cut clears the random baseline, so no route is "
                                             f"named ({cuts})")
        share = self._get(f, "model", "kv_share")
        route = named[0] if len(named) == 1 else ("K/V of the pre-surprise positions" if share.value > 0.5
                                                   else "residual stream at the surprise position")
        return Verdict(True, behaviour + f"; recovery is carried by the {route} (K/V share {share.value:.2f} "
                                         f"[{share.ci_low:.2f}, {share.ci_high:.2f}]; {cuts})")

    def plot(self) -> go.Figure:
        f = self.to_frame()
        f = f[f.measure == "divergence"]
        return curves(f, x="step", y="value", group="model", low="ci_low", high="ci_high",
                      title=f"Course-correction: KL(unforced || forced) after the surprise ({self.model_name})",
                      y_title="KL (nats)")

    def plot_notice(self) -> go.Figure:
        f = self.to_frame()
        f = f[f.measure == "notice"]
        return curves(f, x="layer", y="value", group="model", low="ci_low", high="ci_high",
                      title="Lens at the surprise position: log p(plan's next token), forced - unforced",
                      y_title="nats")


def _choose_surprise(logits0: Tensor, unforced0: Tensor, surprise: Surprise | Tensor, candidates: Tensor | None,
                     seed: int) -> Tensor:
    b, v = logits0.shape
    if isinstance(surprise, Tensor):
        s = surprise.long().cpu().expand(b) if surprise.ndim == 0 else surprise.long().cpu()
        if s.shape != (b,) or bool((s == unforced0).any()):
            raise ValueError(f"course_correction: surprise tokens expected one per prompt ({b},), each != the "
                             f"unforced first token, got {s.tolist()}")
        return s
    allowed = torch.zeros(b, v, dtype=torch.bool)
    allowed[:, candidates if candidates is not None else slice(None)] = True
    allowed[torch.arange(b), unforced0] = False
    if not bool(allowed.any(1).all()):
        raise ValueError("course_correction: expected at least one candidate surprise other than the plan's token")
    if surprise == "lowest":
        return logits0.masked_fill(~allowed, float("inf")).argmin(-1)
    if surprise == "random":
        g = torch.Generator().manual_seed(seed)
        w = allowed.double()
        return torch.multinomial(w, 1, generator=g)[:, 0]
    raise ValueError(f"course_correction: surprise expected 'lowest', 'random' or a tensor, got {surprise!r}")


def _categorise(unforced: Tensor, forced: Tensor, surprise: Tensor, alternatives: Tensor | None, w: int) -> Tensor:
    c = forced[:, 1:]
    u = unforced
    finish = (c[:, : w - 1] == u[:, 1:w]).all(1)
    restart = (c[:, :w] == u[:, :w]).all(1)
    replan = torch.zeros_like(finish)
    if alternatives is not None:
        alt = alternatives.long().cpu()
        aw = min(w, alt.shape[1])
        starts = alt[None, :, 0] == surprise[:, None]  # [b, m]
        cont = (alt[None, :, 1:aw] == c[:, None, : aw - 1]).all(-1)
        replan = (starts & cont).any(1)
    cat = torch.full((len(u),), CATEGORIES.index("drift"))
    cat = torch.where(replan, CATEGORIES.index("replan"), cat)
    cat = torch.where(restart, CATEGORIES.index("restart"), cat)
    return torch.where(finish, CATEGORIES.index("finish"), cat)


def measure(model: HookedTransformer, prompts: Prompts | Batch | Tensor, *, steps: int, surprise: Surprise | Tensor,
            candidates: Tensor | None, alternatives: Tensor | None, plan: Tensor | None, seed: int) -> Measured:
    """The per-example measurements of one model (module doc)."""
    p = prompts_of(prompts, model)
    b = len(p)
    un = generate(model, p, steps + 1, lens=True)
    s_tok = _choose_surprise(un.logits[:, 0].cpu(), un.tokens[:, 0], surprise, candidates, seed)
    fo = generate(model, p, steps + 1, force={0: s_tok}, lens=True)
    lp_u = torch.log_softmax(un.logits[:, 1:].double(), -1)
    lp_f = torch.log_softmax(fo.logits[:, 1:].double(), -1)
    divergence = (lp_u.exp() * (lp_u - lp_f)).sum(-1).clamp_min(0)
    category = _categorise(un.tokens, fo.tokens, s_tok, alternatives, steps)
    u1 = un.tokens[:, 1]
    rows = torch.arange(b)
    lens_f = torch.log_softmax(fo.lens_logits[:, 1].double(), -1)[rows, :, u1]  # [b, layer]
    lens_u = torch.log_softmax(un.lens_logits[:, 1].double(), -1)[rows, :, u1]
    notice = (lens_f - lens_u).T.contiguous()
    # routes: one forward of the forced sequences (context + surprise), read at the surprise position
    lengths = p.lengths
    seqs = Prompts.from_tokens([torch.cat([p.tokens[i, : int(lengths[i])].cpu(), s_tok[i: i + 1]]) for i in range(b)])
    width = seqs.tokens.shape[1]
    pre = torch.arange(width)[None] < lengths[:, None]  # every pre-surprise position
    arch = Arch.of(model)
    kv_cut = [block_attention(layer, lengths, pre) for layer in range(arch.n_layers)]
    w_e = model.W_E.detach()
    cand = candidates if candidates is not None else torch.arange(arch.d_vocab)
    mean_e = w_e[cand.to(w_e.device)].mean(0)
    resid_cut = [SetAt(HOOK_EMBED, index=lengths, values=mean_e.expand(b, -1))]

    def m_of(edits: list) -> Tensor:
        lg = run(model, seqs, edits=edits).logits
        lp = torch.log_softmax(lg[rows.to(lg.device), lengths.to(lg.device)].double(), -1)
        return lp[rows, u1.to(lp.device)].cpu()

    m_forced = m_of([])
    on_plan = (un.tokens[:, : plan.shape[1]] == plan.cpu()).all(1).double() if plan is not None \
        else torch.full((b,), math.nan, dtype=torch.float64)
    return Measured(s_tok, un.tokens, fo.tokens, divergence, category, notice, m_forced,
                    m_forced - m_of(kv_cut), m_forced - m_of(resid_cut), on_plan)


def course_correction(
    model: HookedTransformer,
    prompts: Prompts | Batch | Tensor | CourseInputs,
    *,
    steps: int = 4,
    surprise: Surprise | Tensor = "lowest",
    candidates: Int[Tensor, "c"] | None = None,
    alternatives: Int[Tensor, "m w"] | None = None,
    plan: Int[Tensor, "batch w"] | None = None,
    baseline: bool = True,
    seed: int = 0,
    alpha: float = 0.05,
    n_boot: int = 1000,
) -> CourseCorrectionResult:
    """Force a surprise after each prompt and measure divergence, outcome, notice and route (module
    doc), for `model` and (with `baseline`) `random_like(model, seed)`. `prompts` may be a
    `CourseInputs` (e.g. `planning_inputs`), which supplies plan, candidates and alternatives."""
    if isinstance(prompts, CourseInputs):
        plan = prompts.plan if plan is None else plan
        candidates = prompts.candidates if candidates is None else candidates
        alternatives = prompts.alternatives if alternatives is None else alternatives
        prompts = prompts.prompts
    kw = dict(steps=steps, surprise=surprise, candidates=candidates, alternatives=alternatives, plan=plan, seed=seed)
    m = measure(model, prompts, **kw)  # type: ignore[arg-type]
    base = measure(random_like(model, seed), prompts, **kw) if baseline else None  # type: ignore[arg-type]
    labels = tuple([f"{i}_pre" for i in range(model.cfg.n_layers)] + ["final_post"])
    name = getattr(model.cfg, "model_name", "") or "model"
    return CourseCorrectionResult(name, steps, labels, m, base, alpha, n_boot)
