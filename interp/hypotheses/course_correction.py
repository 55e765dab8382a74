"""Course-correction: what a model does after a surprising token, and which route carries recovery.

Protocol (METHODS.md, "Decoding dynamics"). For each prompt (a context after which the model
decodes its planned continuation), decode greedily `steps + 1` tokens: the *unforced* run u_0..u_k,
the model's own plan. Then force a surprise x~ != u_0 at step 0 (the position t+1 after the
prompt's last token t) and decode the following k steps greedily: the *forced* run c_1..c_k.
Measured against the unforced run, per example:

- divergence: KL(p_unforced,s || p_forced,s) of the next-token distributions at steps s = 1..k;
- outcome category (first that matches): ``finish`` (c_1..c_{W-1} = u_1..u_{W-1}: the planned
  continuation goes on as if the surprise had been u_0), ``restart`` (c_1..c_W = u_0..u_{W-1}: the
  plan is emitted again from its start), ``backoff`` (only with a `backoff` marker token: c_1 is
  the marker and c_2..c_W = u_0..u_{W-2}: the surprise is retracted and the plan resumes, the
  repair of Ye et al. 2024, Physics of LMs 2.2), ``replan`` (c_1..c_{W-1} continues one of the
  given `alternatives` whose first token is x~), ``drift`` (none of these); W = `steps`;
- notice: the lens (logit lens at every layer) at the surprise position (step 1): the log-prob of
  the recovery token (the plan's next token u_1, or the `backoff` marker when one is given),
  forced minus unforced; the first layer where the drop's CI excludes 0
  is where the model's internal prediction registers the surprise;
- route: the recovery measure m = log p(recovery token) at the surprise position of the forced
  sequence (u_1, or the `backoff` marker).
  Cutting the K/V route = blocking attention from the surprise position to every pre-surprise
  position at every layer (`interp.hooks.block_attention`); cutting the residual route = replacing
  the surprise token's embedding by the mean embedding of the candidate tokens (the residual at
  the surprise position keeps only its position). Each cut's effect is the drop in m (a negative
  drop: the cut *helps* the plan, i.e. that route carries the derailment); the K/V share is
  drop_kv / (|drop_kv| + |drop_resid|) (ratio of means, bootstrap CI over examples). A route is
  named only when the outcome is a recovery (finish, restart or backoff) and its drop clears the
  baseline.
- route interchanges (when the inputs carry `kv_source`: contexts of the same lengths whose plan
  starts with the surprise): the drop in m with the K/V of every pre-surprise position, at every
  layer, taken from the source context (`patch_kv`), and with the planned token u_0's embedding at
  the surprise position (`patch_resid`); their K/V share as above. A cut asks whether a route is
  needed, an interchange whether it carries the decision: a model that backs off by default and
  is stopped by a match of expectation and token shows no cut effect but a full interchange effect.

Every aggregate carries a percentile-bootstrap CI over examples and is repeated on a
random-initialised model of the same shape (`interp.baseline`: ``baseline="auto"`` builds it only
for a model of at most 1 GiB, after the model's own measurement, and releases it); a verdict is
stated only when the effect clears that baseline. When the prompts carry a ground-truth plan (`plan`,
padded with -1), `on_plan` is the share whose unforced run follows it (the clean run shows the
behaviour).

Inputs: an organism's builder (`planning_inputs`, `retry_inputs`), or any prompts with any
tokenizer (`prompt_inputs`: `Prompts` whose answers, if any, are the plan; `read_course_inputs`:
a JSONL prompt set whose ``meta.surprise`` names the token to force), with a surprise chosen per
prompt (``"lowest"``, ``"random"``, or given tokens).

Caveat: the residual cut keeps the positional signal (learned or rotary) of the surprise position;
a model that reads "which step am I at" from its position alone needs no K/V for that part.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.arch import Arch, Model
from interp.baseline import BaselineSpec, baseline_for, unbaselined
from interp.decoding import generate
from interp.graph import HOOK_EMBED, Node, Site
from interp.hooks import Map, SetAt, block_attention, run
from interp.hypotheses.base import Verdict, estimate_n, prompts_of
from interp.probing import ProbeResult
from interp.prompts import Prompts, as_prompts
from interp.stats import bootstrap
from interp.tokens import Batch
from interp.viz import curves

Surprise = Literal["lowest", "random"]
CATEGORIES = ("finish", "restart", "backoff", "replan", "drift")
RECOVERY = ("finish", "restart", "backoff")


@dataclass(frozen=True)
class CourseInputs:
    """Contexts to decode after, the ground-truth plan [batch, W] (-1 padded; or None), the tokens
    a surprise may be drawn from, alternative plans [m, W] (for ``replan``), the surprise to force
    per prompt (None: chosen by `course_correction`'s `surprise`) and the back-off marker token."""

    prompts: Prompts
    plan: Int[Tensor, "batch w"] | None
    candidates: Int[Tensor, "c"] | None
    alternatives: Int[Tensor, "m a"] | None
    surprise: Int[Tensor, "batch"] | None = None
    backoff: int | None = None
    kv_source: Prompts | None = None  # contexts (same lengths) whose plan starts with `surprise`


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


def retry_inputs(n: int = 200, seed: int = 0, context: int = 5) -> CourseInputs:
    """`organism:retry` / `retry-clean`: error-free chains cut after `context` numbers (a step is
    due next), the chain's next steps as the plan, the numbers as surprise candidates, every chain
    (any start, any stride) as alternatives (``replan`` = continue the chain from the wrong step)
    and ``<back>`` as the back-off marker."""
    from interp.organisms import retry

    if not 2 <= context <= retry.N_STEPS - 4:
        raise ValueError(f"retry_inputs: context expected in [2, {retry.N_STEPS - 4}] numbers, got {context}")
    d = retry.dataset(n, seed)
    cut = retry.FIRST + context
    numbers = torch.arange(retry.NUM0, retry.NUM0 + retry.N_NUMBERS)
    starts = torch.arange(retry.N_NUMBERS).repeat_interleave(len(retry.STRIDES))
    strides = torch.tensor(retry.STRIDES).repeat(retry.N_NUMBERS)
    alt = retry.chains(starts, strides, 4)
    # the surprise: a uniformly drawn wrong step (the training errors' distribution); the K/V source:
    # the same stride, started so that the surprise is the chain's next step
    g = torch.Generator().manual_seed(seed + 5)
    due = d.tokens[:, cut] - retry.NUM0
    wrong = (due + torch.randint(1, retry.N_NUMBERS, (n,), generator=g)) % retry.N_NUMBERS
    src = d.tokens[:, :cut].clone()
    src[:, retry.FIRST:] = retry.chains((wrong - context * d.stride) % retry.N_NUMBERS, d.stride, context)
    return CourseInputs(Prompts.from_tokens(d.tokens[:, :cut]), d.tokens[:, cut:], numbers, alt,
                        surprise=retry.NUM0 + wrong, backoff=retry.BACK, kv_source=Prompts.from_tokens(src))


def retry_probe_inputs(n: int = 400, seed: int = 0) -> tuple[Prompts, Int[Tensor, "batch"]]:
    """`organism:retry`'s balanced probe set for "the last step was wrong": chains with a wrong step
    (label 1) or without (label 0), the span ``error`` at the position read (the wrong step, before
    ``<back>`` is emitted; the same position in an error-free chain)."""
    from interp.organisms import retry

    d = retry.probe_data(n, seed)
    return Prompts.from_tokens(d.tokens, spans={"error": d.pos}), d.label


def error_probe(model: Model, prompts: Prompts, labels: Int[Tensor, "batch"], *, at: str = "error",
                seed: int = 0, n_boot: int = 1000) -> ProbeResult:
    """Is "the last step was wrong" linearly decodable at `at`, layer by layer? A logistic probe
    (`interp.probing.fit`) on the residual before each layer and after the last (the lens layers,
    `interp.lens.residual.layer_labels`) at each prompt's `at` position; test accuracy on held-out
    examples with its bootstrap CI, and a shuffled-label baseline."""
    from interp import probing
    from interp.cache import collect
    from interp.lens.residual import lens_nodes

    names = [n.hook_name for n in lens_nodes(Arch.of(model).n_layers)]
    cache = collect(model, prompts, hooks=names, positions=at, progress=False)
    features = torch.stack([cache[n][:, -1].float() for n in names])  # [layer, batch, d_model]
    name = getattr(model.cfg, "model_name", "") or "model"
    return probing.fit(features, labels.long().to(features.device), seed=seed, n_boot=n_boot,
                       meta={"model": name, "position": at, "target": "last step wrong"})


def prompt_inputs(prompts: Prompts | Batch | Tensor, *, surprise: Int[Tensor, "batch"] | int | None = None,
                  candidates: Int[Tensor, "c"] | None = None, backoff: int | None = None) -> CourseInputs:
    """Course-correction inputs from any prompts (any tokenizer): each prompt's text is the
    context; its answer tokens, when the prompts carry answers, are the plan (the teacher-forced
    answer tokens are dropped from the context). `surprise`: a token (or one per prompt) to force
    instead of choosing one."""
    p = as_prompts(prompts)
    r = p.right()
    plen = r.prompt_lengths
    ctx = Prompts.from_tokens([r.tokens[i, : int(plen[i])].cpu() for i in range(len(r))])
    plan = r.answers if r.answers is not None else None
    s = None
    if surprise is not None:
        s = torch.as_tensor(surprise, dtype=torch.long).cpu()
        s = s.expand(len(r)).clone() if s.ndim == 0 else s
        if s.shape != (len(r),):
            raise ValueError(f"prompt_inputs: surprise expected a token or one per prompt ({len(r)},), got "
                             f"shape {tuple(s.shape)}")
    return CourseInputs(ctx, plan, candidates, None, s, backoff)


def read_course_inputs(path: str, tokenizer: object, *, surprise: str | None = None, limit: int | None = None
                       ) -> CourseInputs:
    """A JSONL prompt set (data/prompts/README.md) for course-correction: `prompt` is the context,
    `answer` (optional) the planned continuation, ``meta.surprise`` (optional; or `surprise` for
    every line) the text of the token to force, tokenized as the continuation of the prompt; it
    must be one token."""
    import json
    from pathlib import Path

    from interp.prompts import read_prompts

    p = read_prompts(path, tokenizer, limit=limit)
    texts = [json.loads(raw) for raw in Path(path).read_text().splitlines() if raw.strip()][: len(p)]
    given = [surprise if surprise is not None else t.get("meta", {}).get("surprise") for t in texts]
    tok = None
    if any(g is not None for g in given):
        if not all(isinstance(g, str) and g for g in given):
            i = next(i for i, g in enumerate(given) if not (isinstance(g, str) and g))
            raise ValueError(f"{path}: line {i}: expected meta.surprise (a non-empty str) on every line once one "
                             f"line has it, got {given[i]!r}")
        ids = []
        for i, (t, g) in enumerate(zip(texts, given, strict=True)):
            one = Prompts.from_text([t["prompt"]], tokenizer, answers=[g])
            a = one.answers[0, : int(one.answer_lengths[0])].tolist()
            if len(a) != 1:
                raise ValueError(f"{path}: prompt {i}: surprise {g!r} expected to be one token after the prompt, "
                                 f"got {len(a)} tokens {a}; choose a one-token surprise")
            ids.append(a[0])
        tok = torch.tensor(ids)
    return prompt_inputs(p, surprise=tok)


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
    target: Int[Tensor, "batch"] | None = None  # the recovery token m and notice read (u_1 or the marker)
    patch_kv: Float[Tensor, "batch"] | None = None  # drop in m with the pre-surprise K/V from `kv_source`
    patch_resid: Float[Tensor, "batch"] | None = None  # drop in m with the planned token's embedding

    def rate(self, cat: str) -> Float[Tensor, "batch"]:
        """1 where the outcome is `cat`, else 0; NaN where no surprise was forced (a given surprise
        that is the baseline model's own next token)."""
        hit = (self.category == CATEGORIES.index(cat)).double()
        return torch.where(self.category < 0, math.nan, hit)


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
    backoff: int | None = None
    baseline_note: str | None = None  # the baseline compared with, or why there is none (interp.baseline)

    @property
    def categories(self) -> tuple[str, ...]:
        """The outcome categories measured (``backoff`` only with a back-off marker)."""
        return CATEGORIES if self.backoff is not None else tuple(c for c in CATEGORIES if c != "backoff")

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
        for c in self.categories:
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
        if m.patch_kv is not None and m.patch_resid is not None:
            for name, v in (("patch_kv", m.patch_kv), ("patch_resid", m.patch_resid)):
                e, n = estimate_n(v, **kw)
                rows.append(dict(model=which, measure=name, step=1, layer=None, category=None, value=e.value,
                                 ci_low=e.low, ci_high=e.high, n=n))
            s, lo, hi = _share(m.patch_kv, m.patch_resid, self.alpha, self.n_boot, seed=0)
            rows.append(dict(model=which, measure="patch_kv_share", step=1, layer=None, category=None, value=s,
                             ci_low=lo, ci_high=hi, n=int(torch.isfinite(m.patch_kv).sum())))
        return rows

    def to_frame(self) -> pd.DataFrame:
        """Tidy rows (model, measure, step, layer, category, value, ci_low, ci_high, n); measures:
        divergence (nats, per step), rate (per category), notice (nats, per lens layer), m_forced,
        drop_kv, drop_resid (nats), on_plan, kv_share; with a `kv_source`: patch_kv, patch_resid
        (nats) and patch_kv_share."""
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
        the baseline's CI -- with a back-off marker: whose log p(marker) lies above 0 and above the
        baseline's CI; None when no layer clears it."""
        f = self.to_frame()
        for layer in range(self.model.notice.shape[0]):
            m = self._get(f, "model", "notice", layer=layer)
            b = self._get(f, "baseline", "notice", layer=layer) if self.baseline is not None else None
            if self.backoff is None:
                ok = m.ci_high < 0 and (b is None or m.ci_high < b.ci_low)
            else:
                ok = m.ci_low > 0 and (b is None or m.ci_low > b.ci_high)
            if ok:
                return layer
        return None

    @property
    def verdict(self) -> Verdict:
        """The outcome categories that clear the random baseline, and the route of a recovery."""
        f = self.to_frame()
        cats = self.categories
        best = max(cats, key=lambda c: self._get(f, "model", "rate", category=c).value)
        if self.baseline is None:
            r = self._get(f, "model", "rate", category=best)
            return Verdict(False, unbaselined(self.baseline_note or "none was run", (
                f"after a forced surprise the commonest outcome is '{best}' {r.value:.1%} "
                f"[{r.ci_low:.1%}, {r.ci_high:.1%}]")))

        def rate(c: str) -> str:
            m, b = self._get(f, "model", "rate", category=c), self._get(f, "baseline", "rate", category=c)
            return (f"'{c}' {m.value:.1%} [{m.ci_low:.1%}, {m.ci_high:.1%}] (random-initialised {b.value:.1%} "
                    f"[{b.ci_low:.1%}, {b.ci_high:.1%}])")

        above = [c for c in cats if self._get(f, "model", "rate", category=c).ci_low
                 > self._get(f, "baseline", "rate", category=c).ci_high]
        behaviour = f"after a forced surprise the commonest outcome is {rate(best)}"
        if not above:
            return Verdict(False, behaviour + "; no outcome's rate clears the random baseline")
        behaviour += "; above the baseline: " + ", ".join(rate(c) for c in above)
        best = max(above, key=lambda c: self._get(f, "model", "rate", category=c).value)
        kv, kv_b = self._get(f, "model", "drop_kv"), self._get(f, "baseline", "drop_kv")
        rs, rs_b = self._get(f, "model", "drop_resid"), self._get(f, "baseline", "drop_resid")
        what = "log p(<back-off marker>)" if self.backoff is not None else "log p(u_1)"
        cuts = (f"cutting the pre-surprise K/V changes {what} by {-kv.value:+.2f} nats "
                f"[{-kv.ci_high:+.2f}, {-kv.ci_low:+.2f}] (random init {-kv_b.value:+.2f}); replacing the "
                f"surprise's embedding by the mean candidate embedding by {-rs.value:+.2f} "
                f"[{-rs.ci_high:+.2f}, {-rs.ci_low:+.2f}] (random init {-rs_b.value:+.2f})")
        if best not in RECOVERY:
            return Verdict(True, behaviour + f"; no recovery to attribute to a route ({cuts})")
        if self.model.patch_kv is not None:
            pk, pk_b = self._get(f, "model", "patch_kv"), self._get(f, "baseline", "patch_kv")
            pr, pr_b = self._get(f, "model", "patch_resid"), self._get(f, "baseline", "patch_resid")
            ps = self._get(f, "model", "patch_kv_share")
            patches = (f"making the pre-surprise K/V agree with the surprise (taken from a context whose plan starts "
                       f"with it) changes {what} by {-pk.value:+.2f} [{-pk.ci_high:+.2f}, {-pk.ci_low:+.2f}] (random "
                       f"init {-pk_b.value:+.2f}); giving the surprise position the planned token's embedding by "
                       f"{-pr.value:+.2f} [{-pr.ci_high:+.2f}, {-pr.ci_low:+.2f}] (random init {-pr_b.value:+.2f})")
            ok = {"K/V of the pre-surprise positions": pk.ci_low > max(pk_b.ci_high, 0),
                  "residual stream at the surprise position": pr.ci_low > max(pr_b.ci_high, 0)}
            named = [k for k, v in ok.items() if v]
            share = f"K/V share {ps.value:.2f} [{ps.ci_low:.2f}, {ps.ci_high:.2f}]"
            if len(named) == 2:
                return Verdict(True, behaviour + f"; the recovery compares both routes: the expectation carried by "
                                                 f"the K/V of the pre-surprise positions and the token in the residual "
                                                 f"stream at the surprise position, each one alone flips it ({share}; "
                                                 f"{patches}; cuts: {cuts})")
            if named:
                return Verdict(True, behaviour + f"; recovery is carried by the {named[0]} ({share}; {patches}; "
                                                 f"cuts: {cuts})")
            return Verdict(True, behaviour + f"; neither route patch clears the random baseline ({patches}; cuts: "
                                             f"{cuts})")
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

    def summary(self) -> pd.DataFrame:
        """The key numbers, model next to its random-initialised baseline (value [95% CI]): each
        outcome's rate, the divergence one step after the surprise, and the route measures (nats:
        the drop in the recovery token's log-prob under each cut or interchange; the K/V share)."""
        f = self.to_frame()

        def cell(which: str, measure: str, pct: bool = False, **kw: object) -> str:
            sel = (f.model == which) & (f.measure == measure)
            for k, v in kw.items():
                sel &= f[k] == v
            if not sel.any():
                return "—"
            r = f[sel].iloc[0]
            if pct:
                return f"{100 * r.value:.1f}% [{100 * r.ci_low:.1f}, {100 * r.ci_high:.1f}]"
            return f"{r.value:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]"

        rows = [(f"outcome: {c}", dict(measure="rate", pct=True, category=c)) for c in self.categories]
        rows += [("clean run on the given plan", dict(measure="on_plan", pct=True)),
                 ("KL(unforced || forced), step 1 (nats)", dict(measure="divergence", step=1)),
                 ("drop, cut pre-surprise K/V (nats)", dict(measure="drop_kv")),
                 ("drop, surprise embedding -> mean (nats)", dict(measure="drop_resid")),
                 ("K/V share of the cuts", dict(measure="kv_share"))]
        if self.model.patch_kv is not None:
            rows += [("drop, K/V from a context planning the surprise (nats)", dict(measure="patch_kv")),
                     ("drop, planned token's embedding at the surprise (nats)", dict(measure="patch_resid")),
                     ("K/V share of the interchanges", dict(measure="patch_kv_share"))]
        out = []
        for label, kw in rows:
            if kw["measure"] == "on_plan" and not f[(f.measure == "on_plan")].value.notna().any():
                continue
            row = {"measure": label, "model": cell("model", **kw)}  # type: ignore[arg-type]
            if self.baseline is not None:
                row["random init"] = cell("baseline", **kw)  # type: ignore[arg-type]
            out.append(row)
        return pd.DataFrame(out)

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
                      title="Lens at the surprise position: log p(recovery token), forced - unforced",
                      y_title="nats")


def _choose_surprise(logits0: Tensor, unforced0: Tensor, surprise: Surprise | Tensor, candidates: Tensor | None,
                     seed: int) -> Tensor:
    b, v = logits0.shape
    if isinstance(surprise, Tensor):
        s = surprise.long().cpu().expand(b) if surprise.ndim == 0 else surprise.long().cpu()
        if s.shape != (b,) or bool(((s < 0) | (s >= v)).any()):
            raise ValueError(f"course_correction: surprise tokens expected one per prompt ({b},) in [0, {v}), got "
                             f"{s.tolist()}")
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


def _categorise(unforced: Tensor, forced: Tensor, surprise: Tensor, alternatives: Tensor | None, w: int,
                backoff: int | None = None) -> Tensor:
    c = forced[:, 1:]
    u = unforced
    finish = (c[:, : w - 1] == u[:, 1:w]).all(1)
    restart = (c[:, :w] == u[:, :w]).all(1)
    back = torch.zeros_like(finish)
    if backoff is not None:
        back = (c[:, 0] == backoff) & (c[:, 1:w] == u[:, : w - 1]).all(1)
    replan = torch.zeros_like(finish)
    if alternatives is not None:
        alt = alternatives.long().cpu()
        aw = min(w, alt.shape[1])
        starts = alt[None, :, 0] == surprise[:, None]  # [b, m]
        cont = (alt[None, :, 1:aw] == c[:, None, : aw - 1]).all(-1)
        replan = (starts & cont).any(1)
    cat = torch.full((len(u),), CATEGORIES.index("drift"))
    cat = torch.where(replan, CATEGORIES.index("replan"), cat)
    cat = torch.where(back, CATEGORIES.index("backoff"), cat)
    cat = torch.where(restart, CATEGORIES.index("restart"), cat)
    return torch.where(finish, CATEGORIES.index("finish"), cat)


def measure(model: Model, prompts: Prompts | Batch | Tensor, *, steps: int, surprise: Surprise | Tensor,
            candidates: Tensor | None, alternatives: Tensor | None, plan: Tensor | None, seed: int,
            backoff: int | None = None, strict: bool = True, kv_source: Prompts | None = None) -> Measured:
    """The per-example measurements of one model (module doc). A given surprise that equals the
    model's own next token is refused (`strict`) or leaves that row NaN (the baseline)."""
    p = prompts_of(prompts, model)
    b = len(p)
    un = generate(model, p, steps + 1, lens=True)
    s_tok = _choose_surprise(un.logits[:, 0].cpu(), un.tokens[:, 0], surprise, candidates, seed)
    same = s_tok == un.tokens[:, 0]
    if strict and bool(same.any()):
        rows_ = torch.nonzero(same)[:, 0].tolist()
        raise ValueError(f"course_correction: surprise expected to differ from the model's own next token, got the "
                         f"same token in rows {rows_[:10]}; choose another surprise for those prompts")
    fo = generate(model, p, steps + 1, force={0: s_tok}, lens=True)
    lp_u = torch.log_softmax(un.logits[:, 1:].double(), -1)
    lp_f = torch.log_softmax(fo.logits[:, 1:].double(), -1)
    divergence = (lp_u.exp() * (lp_u - lp_f)).sum(-1).clamp_min(0)
    category = _categorise(un.tokens, fo.tokens, s_tok, alternatives, steps, backoff)
    u1 = un.tokens[:, 1] if backoff is None else torch.full((b,), int(backoff))
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
    w_e = model.W_E.detach()  # [d_vocab, d_model] on TL models and TransformerBridge alike
    cand = candidates if candidates is not None else torch.arange(arch.d_vocab)
    mean_e = w_e[cand.to(w_e.device)].mean(0)
    resid_cut = [SetAt(HOOK_EMBED, index=lengths, values=mean_e.expand(b, -1))]

    def m_of(edits: list) -> Tensor:
        lg = run(model, seqs, edits=edits).logits
        lp = torch.log_softmax(lg[rows.to(lg.device), lengths.to(lg.device)].double(), -1)
        return lp[rows, u1.to(lp.device)].cpu()

    m_forced = m_of([])
    patch_kv = patch_resid = None
    if kv_source is not None:
        src = prompts_of(kv_source, model)
        if not torch.equal(src.lengths, lengths):
            raise ValueError(f"course_correction kv_source: expected the prompts' lengths {lengths.tolist()[:8]}, got "
                             f"{src.lengths.tolist()[:8]}")
        src_seqs = Prompts.from_tokens([torch.cat([src.tokens[i, : int(lengths[i])].cpu(), s_tok[i: i + 1]])
                                        for i in range(b)])
        kv_nodes = [Node(layer, site) for layer in range(arch.n_layers) for site in (Site.K, Site.V)]
        got = run(model, src_seqs, captures=kv_nodes, logits=False).acts
        mask = pre.to(w_e.device)

        def from_source(act: Tensor, src_act: Tensor) -> Tensor:
            keep = mask.reshape(*mask.shape, *([1] * (act.ndim - 2)))
            return torch.where(keep, src_act.to(act.device, act.dtype), act)

        edits = [Map(node, fn=functools.partial(from_source, src_act=got[node.hook_name])) for node in kv_nodes]
        patch_kv = m_forced - m_of(edits)
    planned = un.tokens[:, 0]
    patch_resid = m_forced - m_of([SetAt(HOOK_EMBED, index=lengths, values=w_e[planned.to(w_e.device)])])
    on_plan = torch.full((b,), math.nan, dtype=torch.float64)
    if plan is not None:
        pl = plan.long().cpu()[:, : steps + 1]
        w = pl.shape[1]
        on_plan = ((un.tokens[:, :w] == pl) | (pl < 0)).all(1).double()
    drop_kv, drop_resid = m_forced - m_of(kv_cut), m_forced - m_of(resid_cut)
    if bool(same.any()):  # no surprise in those rows: nothing to measure
        category = torch.where(same, -1, category)
        divergence[same] = math.nan
        notice[:, same] = math.nan
        for v in (m_forced, drop_kv, drop_resid, patch_kv, patch_resid):
            if v is not None:
                v[same] = math.nan
    return Measured(s_tok, un.tokens, fo.tokens, divergence, category, notice, m_forced, drop_kv, drop_resid,
                    on_plan, u1, patch_kv if kv_source is not None else None,
                    patch_resid if kv_source is not None else None)


def course_correction(
    model: Model,
    prompts: Prompts | Batch | Tensor | CourseInputs,
    *,
    steps: int = 4,
    surprise: Surprise | Tensor | int = "lowest",
    candidates: Int[Tensor, "c"] | None = None,
    alternatives: Int[Tensor, "m a"] | None = None,
    plan: Int[Tensor, "batch w"] | None = None,
    backoff: int | None = None,
    baseline: Model | BaselineSpec | bool | None = "auto",
    seed: int = 0,
    alpha: float = 0.05,
    n_boot: int = 1000,
) -> CourseCorrectionResult:
    """Force a surprise after each prompt and measure divergence, outcome, notice and route (module
    doc), for `model` and its `baseline`: a comparison model, "random", "none" or "auto"
    (`interp.baseline`: a random-initialised model of the same shape only for a model of at most
    1 GiB; None and True mean "auto", False "none"). `prompts` may be a
    `CourseInputs` (`planning_inputs`, `retry_inputs`, `prompt_inputs`, `read_course_inputs`),
    which supplies plan, candidates, alternatives, the back-off marker and (if it names one) the
    surprise of each prompt. `surprise` may be a token id (int) forced after every prompt."""
    kv_source = None
    if isinstance(prompts, CourseInputs):
        plan = prompts.plan if plan is None else plan
        candidates = prompts.candidates if candidates is None else candidates
        alternatives = prompts.alternatives if alternatives is None else alternatives
        backoff = prompts.backoff if backoff is None else backoff
        if prompts.surprise is not None and isinstance(surprise, str) and surprise == "lowest":
            surprise = prompts.surprise
            kv_source = prompts.kv_source
        prompts = prompts.prompts
    if isinstance(surprise, int):
        surprise = torch.tensor(surprise)
    kw = dict(steps=steps, surprise=surprise, candidates=candidates, alternatives=alternatives, plan=plan, seed=seed,
              backoff=backoff, kv_source=kv_source)
    m = measure(model, prompts, **kw)  # type: ignore[arg-type]
    plan = baseline_for(model, baseline, seed=seed)
    base = plan.run(model, lambda b: measure(b, prompts, strict=False, **kw))  # type: ignore[arg-type]
    labels = tuple([f"{i}_pre" for i in range(Arch.of(model).n_layers)] + ["final_post"])
    name = getattr(model.cfg, "model_name", "") or "model"
    return CourseCorrectionResult(name, steps, labels, m, base, alpha, n_boot, backoff, plan.note)
