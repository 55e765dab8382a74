"""Layer-wise trajectory of the lens distributions: sharpening along the final direction, or turning?

For each lens layer l (logit lens, or a tuned lens) the distribution p_l at a read-out position is
compared with the tempered family of the final logits z: q_beta = softmax(beta z), the replicator
path towards the final answer (`interp.decoding.replicator`). The best temperature

    beta_l = argmin_beta KL(p_l || softmax(beta z))

is a 1-d convex problem (d/dbeta KL = E_{q_beta}[z] - E_{p_l}[z], d^2/dbeta^2 = Var_{q_beta}(z) >= 0):
solved exactly by bisection on the monotone derivative followed by Newton steps, in float64.
The KL that remains, KL(p_l || q_{beta_l}), is the part of the layer's distribution that is not
"time along the final direction"; `time_share = 1 - KL_left / KL(p_l || p_final)` is the share of
the divergence from the final distribution that re-timing removes (undefined, NaN, where p_l is
already the final distribution, e.g. the last lens layer).

Per-example values are kept; aggregates carry bootstrap CIs over examples (`interp.stats`) and are
compared with a random-initialised model of the same shape (`interp.baseline`: ``baseline="auto"``
builds it only for a model of at most 1 GiB, after the model's own measurement, and releases it;
otherwise there is no verdict and `baseline_note` says how to get one). Beta is
clamped to [-beta_max, beta_max] (a p_l concentrated on the final argmax has beta = +inf).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from interp.arch import Model
from interp.baseline import BaselineSpec, baseline_for
from interp.lens.logit import logit_lens
from interp.prompts import Prompts
from interp.stats import bootstrap
from interp.tokens import Batch
from interp.viz import curves


def fit_beta(
    lens_logits: Float[Tensor, "*rest d_vocab"], final_logits: Float[Tensor, "*rest d_vocab"], *,
    beta_max: float = 100.0, iters: int = 80,
) -> tuple[Float[Tensor, "*rest"], Float[Tensor, "*rest"]]:
    """(beta, KL(p || softmax(beta z))) minimising the KL over beta in [-beta_max, beta_max], with
    p = softmax(lens_logits), z = final_logits; float64, nats. A constant z has beta = 0."""
    logp = torch.log_softmax(lens_logits.double(), -1)
    z = final_logits.double()
    z = z - z.mean(-1, keepdim=True)
    p = logp.exp()
    target = (p * z).sum(-1)

    def mean_z(beta: Tensor) -> Tensor:
        return (torch.softmax(beta[..., None] * z, -1) * z).sum(-1)

    lo = torch.full_like(target, -beta_max)
    hi = torch.full_like(target, beta_max)
    for _ in range(iters):  # E_q[z] increases with beta: bisect its crossing of E_p[z]
        mid = (lo + hi) / 2
        up = mean_z(mid) < target
        lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
    beta = (lo + hi) / 2
    for _ in range(3):  # Newton polish inside the bracket
        q = torch.softmax(beta[..., None] * z, -1)
        m = (q * z).sum(-1)
        var = (q * (z - m[..., None]) ** 2).sum(-1)
        step = torch.where(var > 1e-300, (m - target) / var.clamp_min(1e-300), torch.zeros_like(var))
        beta = (beta - step).clamp(-beta_max, beta_max)
    flat = z.abs().amax(-1) < 1e-12
    beta = torch.where(flat, torch.zeros_like(beta), beta)
    return beta, kl_tempered(logp, z, beta)


def kl_tempered(logp: Tensor, z: Tensor, beta: Tensor) -> Tensor:
    """KL(p || softmax(beta z)) in nats, p given by its log-probabilities."""
    logq = torch.log_softmax(beta[..., None] * z.double(), -1)
    return (logp.exp() * (logp.double() - logq)).sum(-1).clamp_min(0.0)  # >= 0 up to rounding


def _estimate(v: Tensor, alpha: float, n_boot: int, seed: int) -> tuple[float, float, float, int]:
    ok = v[torch.isfinite(v)]
    n = int(ok.numel())
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    if n < 2:
        return float(ok.mean()), math.nan, math.nan, n
    e = bootstrap(ok, n_boot=n_boot, alpha=alpha, seed=seed)
    return e.value, e.low, e.high, n


@dataclass(frozen=True)
class TrajectoryResult:
    """beta_l, the KL left after re-timing, KL(p_l || p_final) and the time share, per lens layer
    and example (CPU tensors), for a model and (optionally) its random-initialised baseline."""

    model_name: str
    lens: str
    labels: tuple[str, ...]
    beta: Float[Tensor, "layer batch"]
    kl_left: Float[Tensor, "layer batch"]
    kl_final: Float[Tensor, "layer batch"]
    baseline: TrajectoryResult | None = None
    alpha: float = 0.05
    n_boot: int = 1000
    baseline_note: str | None = None  # the baseline compared with, or why there is none (interp.baseline)

    @property
    def time_share(self) -> Float[Tensor, "layer batch"]:
        share = 1 - self.kl_left / self.kl_final
        return torch.where(self.kl_final > 1e-9, share, torch.full_like(share, math.nan))

    @property
    def values(self) -> Float[Tensor, "layer"]:
        """Mean beta_l over examples."""
        return self.beta.nanmean(1)

    @property
    def per_example(self) -> Float[Tensor, "layer batch"]:
        return self.beta

    def to_frame(self) -> pd.DataFrame:
        """Rows (model, layer, label, quantity) with value, ci_low, ci_high, n; quantity is beta,
        kl_left, kl_final (nats) or time_share."""
        rows = []
        for which, res in (("model", self), ("baseline", self.baseline)):
            if res is None:
                continue
            for q in ("beta", "kl_left", "kl_final", "time_share"):
                t = getattr(res, q)
                for layer, label in enumerate(res.labels):
                    v, lo, hi, n = _estimate(t[layer], self.alpha, self.n_boot, seed=layer)
                    rows.append(dict(model=which, layer=layer, label=label, quantity=q, value=v, ci_low=lo,
                                     ci_high=hi, n=n))
        return pd.DataFrame(rows)

    def verdicts(self) -> pd.DataFrame:
        """Per lens layer (but the last): does re-timing explain more of the layer's divergence than
        in the random baseline? `supported` only when the model's time-share CI lies above the
        baseline's; `reading` then says "sharpening" (share > 0.5) or "turning"."""
        if self.baseline is None:
            raise ValueError(f"trajectory verdicts: expected a result with a baseline, got none "
                             f"({self.baseline_note or 'none was run'})")
        f = self.to_frame()
        f = f[f.quantity == "time_share"]
        rows = []
        for layer, label in enumerate(self.labels[:-1]):
            m = f[(f.model == "model") & (f.layer == layer)].iloc[0]
            b = f[(f.model == "baseline") & (f.layer == layer)].iloc[0]
            ok = bool(m.ci_low > b.ci_high) if not (math.isnan(m.ci_low) or math.isnan(b.ci_high)) else False
            reading = ("sharpening along the final direction" if m.value > 0.5 else "turning (direction changes)")
            rows.append(dict(layer=layer, label=label, time_share=m.value, ci_low=m.ci_low, ci_high=m.ci_high,
                             baseline=b.value, baseline_ci_high=b.ci_high, supported=ok,
                             verdict=reading if ok else "no verdict: does not clear the random baseline"))
        return pd.DataFrame(rows)

    @property
    def verdict(self) -> str:
        """One sentence over the layers whose time share clears the random baseline ("No verdict: ..."
        otherwise, as `str(interp.hypotheses.Verdict)`; this module sits below the hypotheses)."""
        if self.baseline is None:
            return f"No verdict: unbaselined ({self.baseline_note or 'no baseline was run'})"
        v = self.verdicts()
        ok = v[v.supported]
        if ok.empty:
            return "No verdict: no layer's time share clears the random baseline"
        parts = [f"{r.label}: {r.verdict}, time share {r.time_share:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] vs "
                 f"{r.baseline:.3f} at random init" for r in ok.itertuples()]
        return f"{self.lens} lens trajectory: " + "; ".join(parts)

    def plot(self, quantity: str = "time_share") -> go.Figure:
        f = self.to_frame()
        f = f[f.quantity == quantity]
        return curves(f, x="layer", y="value", group="model", low="ci_low", high="ci_high",
                      title=f"{self.lens} lens trajectory: {quantity} ({self.model_name})", y_title=quantity)


def trajectory(
    model: Model,
    prompts: Prompts | Batch | Tensor,
    *,
    at: str = "last",
    lens: object | None = None,
    baseline: Model | BaselineSpec | bool | None = "auto",
    seed: int = 0,
    alpha: float = 0.05,
    n_boot: int = 1000,
    beta_max: float = 100.0,
) -> TrajectoryResult:
    """beta_l and the remaining KL per lens layer, read at each prompt's position `at`.

    `lens`: None for the logit lens, or an `interp.lens.TunedLens` (anything with the same
    ``run(model, prompts, at=..., keep_logits=True)``). `baseline`: a comparison model, "random",
    "none" or "auto" (`interp.baseline`: a random-initialised model of the same shape, seeded by
    `seed`, only for a model of at most 1 GiB; None and True mean "auto", False "none"), measured
    the same way (a tuned lens is model-specific, so the baseline then uses the logit lens and says
    so in its `lens` field)."""
    res = _measure(model, prompts, at, lens, alpha, n_boot, beta_max)
    plan = baseline_for(model, baseline, seed=seed)
    base = plan.run(model, lambda m: _measure(m, prompts, at, None, alpha, n_boot, beta_max))
    return TrajectoryResult(res.model_name, res.lens, res.labels, res.beta, res.kl_left, res.kl_final, base,
                            alpha, n_boot, plan.note)


def _measure(model: Model, prompts: object, at: str, lens: object | None, alpha: float, n_boot: int,
             beta_max: float) -> TrajectoryResult:
    if lens is None:
        lr = logit_lens(model, prompts, at=at, keep_logits=True, progress=False, k=1)  # type: ignore[arg-type]
    else:
        lr = lens.run(model, prompts, at=at, keep_logits=True, progress=False, k=1)  # type: ignore[attr-defined]
    logits = lr.logits[:, :, 0].double()  # [layer, batch, d_vocab]
    final = logits[-1].expand_as(logits)
    beta, kl_left = fit_beta(logits, final, beta_max=beta_max)
    kl_final = kl_tempered(torch.log_softmax(logits, -1), final, torch.ones_like(beta))
    return TrajectoryResult(lr.model_name, lr.lens, lr.labels, beta.float(), kl_left.float(), kl_final.float(),
                            None, alpha, n_boot)
