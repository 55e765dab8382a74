"""Forking tokens (Bigelow et al. 2025, "Forking Paths in Neural Text Generation").

Given a prompt and a base continuation x_1..x_T, resample `n` continuations after each prefix
(prompt + x_1..x_t, t = 0..T), all to the same end position, and map each to an *outcome* (by
default the last token; any function of the generated tokens). o_t is the outcome distribution
after prefix t. A forking token is a position t where o_t changes abruptly from o_{t-1}: the
statistic is the total-variation distance TV(o_{t-1}, o_t), and its null (no change: the 2n
outcomes of the two prefixes are exchangeable) is a permutation test (`n_perm` label shuffles;
p-value (1 + #{TV_perm >= TV}) / (1 + n_perm)). Forking tokens are the t whose p-value stays
below `alpha` after a Bonferroni correction over the T tests. TV also carries a percentile
bootstrap CI (each side resampled).

Cost: (T + 1) x n sampled continuations of up to T + `extra` tokens (one `generate` call per
prefix, KV-cached).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.arch import Model
from interp.decoding.generate import generate
from interp.viz import curves

Outcome = Callable[[Int[Tensor, "n steps"]], Int[Tensor, "n"]]


def _last(tokens: Tensor) -> Tensor:
    return tokens[:, -1]


def _counts(labels: Tensor, k: int) -> Tensor:
    """[..., n] integer labels in [0, k) -> [..., k] counts."""
    return torch.nn.functional.one_hot(labels, k).sum(-2).double()


def tv_distance(a: Int[Tensor, "n"], b: Int[Tensor, "m"]) -> float:
    """Total-variation distance between the empirical distributions of two samples of labels."""
    k = int(torch.cat([a, b]).max()) + 1
    return float(0.5 * (_counts(a, k) / len(a) - _counts(b, k) / len(b)).abs().sum())


def permutation_tv_test(a: Int[Tensor, "n"], b: Int[Tensor, "m"], *, n_perm: int = 1000, seed: int = 0
                        ) -> tuple[float, float]:
    """(TV, permutation p-value) for H0: `a` and `b` come from one outcome distribution."""
    pooled = torch.cat([a, b]).long()
    _, labels = torch.unique(pooled, return_inverse=True)
    k = int(labels.max()) + 1
    n = len(a)
    g = torch.Generator().manual_seed(seed)
    perms = torch.argsort(torch.rand(n_perm, len(pooled), generator=g), dim=1)
    shuffled = labels[perms]
    tv_perm = 0.5 * (_counts(shuffled[:, :n], k) / n - _counts(shuffled[:, n:], k) / len(b)).abs().sum(-1)
    tv = 0.5 * float((_counts(labels[:n], k) / n - _counts(labels[n:], k) / len(b)).abs().sum())
    p = (1 + int((tv_perm >= tv - 1e-12).sum())) / (1 + n_perm)
    return tv, p


def _tv_ci(a: Tensor, b: Tensor, n_boot: int, alpha: float, seed: int) -> tuple[float, float]:
    _, labels = torch.unique(torch.cat([a, b]), return_inverse=True)
    k = int(labels.max()) + 1
    la, lb = labels[: len(a)], labels[len(a):]
    g = torch.Generator().manual_seed(seed)
    ra = la[torch.randint(0, len(a), (n_boot, len(a)), generator=g)]
    rb = lb[torch.randint(0, len(b), (n_boot, len(b)), generator=g)]
    tv = 0.5 * (_counts(ra, k) / len(a) - _counts(rb, k) / len(b)).abs().sum(-1)
    lo, hi = torch.quantile(tv, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)).tolist()
    return lo, hi


@dataclass(frozen=True)
class ForkingResult:
    """Outcomes [T + 1, n] after each prefix, TV(o_{t-1}, o_t) for t = 1..T with bootstrap CI and
    permutation p-value, and the forking positions (Bonferroni over T)."""

    base: Int[Tensor, "t"]
    outcomes: Int[Tensor, "t1 n"]
    tv: Float[Tensor, "t"]
    ci_low: Float[Tensor, "t"]
    ci_high: Float[Tensor, "t"]
    p_value: Float[Tensor, "t"]
    alpha: float

    @property
    def values(self) -> Float[Tensor, "t"]:
        return self.tv

    @property
    def forking(self) -> list[int]:
        """Positions t (1-based: the prefix that first includes x_t) whose change clears the null."""
        T = len(self.tv)
        return [t + 1 for t in range(T) if float(self.p_value[t]) * T < self.alpha]

    def to_frame(self) -> pd.DataFrame:
        n = self.outcomes.shape[1]
        return pd.DataFrame(dict(t=range(1, len(self.tv) + 1), token=self.base.tolist(), value=self.tv.numpy(),
                                 ci_low=self.ci_low.numpy(), ci_high=self.ci_high.numpy(), n=n,
                                 p_value=self.p_value.numpy(),
                                 forking=[t + 1 in self.forking for t in range(len(self.tv))]))

    def plot(self) -> go.Figure:
        return curves(self.to_frame(), x="t", y="value", low="ci_low", high="ci_high",
                      title="Forking tokens: TV(o_{t-1}, o_t) of the outcome distribution", y_title="TV")


def forking_tokens(
    model: Model,
    prompt: Int[Tensor, "pos"],
    continuation: Int[Tensor, "t"],
    *,
    n: int = 32,
    extra: int = 0,
    outcome: Outcome = _last,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    n_perm: int = 1000,
    n_boot: int = 1000,
    alpha: float = 0.05,
) -> ForkingResult:
    """Resample `n` continuations after each prefix of `continuation` (module doc). Every
    resample ends at position len(prompt) + T + `extra`; `outcome` maps the generated tokens
    after the prompt ([n, T + extra]: the prefix's tokens then the sampled ones) to an integer."""
    prompt = torch.as_tensor(prompt).long().cpu()
    base = torch.as_tensor(continuation).long().cpu()
    T = len(base)
    if prompt.ndim != 1 or base.ndim != 1 or T < 1 or n < 2:
        raise ValueError(f"forking_tokens: expected a 1-d prompt, a non-empty 1-d continuation and n >= 2, got "
                         f"{tuple(prompt.shape)}, {tuple(base.shape)}, n={n}")
    outs = []
    for t in range(T + 1):
        prefix = torch.cat([prompt, base[:t]])
        steps = T + extra - t
        if steps == 0:
            gen = base[None].expand(n, -1)
        else:
            g = generate(model, prefix[None].expand(n, -1), steps, mode="sample", temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=seed, sample_rows=torch.arange(n) + t * n)
            gen = torch.cat([base[:t][None].expand(n, -1), g.tokens], 1)
        o = torch.as_tensor(outcome(gen)).long().cpu()
        if o.shape != (n,):
            raise ValueError(f"forking_tokens: outcome expected one integer per continuation ({n},), got {tuple(o.shape)}")
        outs.append(o)
    outcomes = torch.stack(outs)
    tv, lo, hi, pv = [], [], [], []
    for t in range(1, T + 1):
        d, p = permutation_tv_test(outcomes[t - 1], outcomes[t], n_perm=n_perm, seed=seed + t)
        a, b = _tv_ci(outcomes[t - 1], outcomes[t], n_boot, alpha, seed + t)
        tv.append(d), pv.append(p), lo.append(a), hi.append(b)
    f64 = torch.float64
    return ForkingResult(base, outcomes, torch.tensor(tv, dtype=f64), torch.tensor(lo, dtype=f64),
                         torch.tensor(hi, dtype=f64), torch.tensor(pv, dtype=f64), alpha)
