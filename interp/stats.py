"""Uncertainty: percentile-bootstrap confidence intervals and the normalised effect.

Every accuracy, R^2 or effect the toolkit reports carries a percentile bootstrap interval over
*examples* (Efron & Tibshirani 1993), resampled with an explicit seed so results reproduce.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

Statistic = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a (1 - alpha) confidence interval."""

    value: float
    low: float
    high: float

    def excludes(self, x: float) -> bool:
        """True when the interval lies strictly above or below `x`."""
        return self.low > x or self.high < x

    def above(self, other: Estimate) -> bool:
        """True when this interval lies strictly above `other`'s."""
        return self.low > other.high

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _mean(x: Tensor) -> Tensor:
    return x.mean(dim=-1)


def bootstrap(
    values: Float[Tensor, "n"] | Float[Tensor, "n k"],
    statistic: Statistic = _mean,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> Estimate:
    """Percentile bootstrap CI of `statistic` over the examples (first axis) of `values`.

    `statistic` maps a resampled tensor with the example axis LAST (shape [..., n]) to one
    number per resample; the default is the mean.
    """
    v = torch.as_tensor(values).detach().to("cpu", torch.float64)
    if v.ndim not in (1, 2) or v.shape[0] < 2:
        raise ValueError(f"bootstrap: expected at least 2 examples along axis 0, got shape {tuple(v.shape)}")
    if not 0 < alpha < 1:
        raise ValueError(f"bootstrap: expected 0 < alpha < 1, got {alpha}")
    g = torch.Generator().manual_seed(seed)
    n = v.shape[0]
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    vt = v.mT if v.ndim == 2 else v  # [..., n]
    point = float(statistic(vt))
    boots = statistic(vt[..., idx].movedim(-2, 0) if v.ndim == 2 else v[idx])
    lo, hi = torch.quantile(boots.double(), torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)).tolist()
    return Estimate(point, lo, hi)


def bootstrap_many(
    values: Float[Tensor, "n m"], *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[Float[Tensor, "m"], Float[Tensor, "m"], Float[Tensor, "m"]]:
    """Mean and percentile CI of each of `m` columns over `n` examples (same resamples for all)."""
    v = torch.as_tensor(values).detach().to("cpu", torch.float64)
    if v.ndim != 2 or v.shape[0] < 2:
        raise ValueError(f"bootstrap_many: expected shape (n >= 2, m), got {tuple(v.shape)}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, v.shape[0], (n_boot, v.shape[0]), generator=g)
    boots = v[idx].mean(dim=1)  # [n_boot, m]
    q = torch.quantile(boots, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64), dim=0)
    return v.mean(dim=0), q[0], q[1]


def normalised_effect(patched: Tensor, corrupted: Tensor | float, clean: Tensor | float,
                      eps: float = 1e-6) -> Tensor:
    """Recovery R = (patched - corrupted) / (clean - corrupted); raises when clean ~ corrupted."""
    denom = torch.as_tensor(clean) - torch.as_tensor(corrupted)
    if bool((denom.abs() < eps).any()):
        raise ValueError(
            f"normalised effect: expected clean and corrupted metrics to differ, got a difference of "
            f"{float(denom.abs().min()):.3g} (< {eps}); pick prompts where the corruption changes the metric"
        )
    return (patched - torch.as_tensor(corrupted)) / denom


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two tensors with the same number of cells (flattened), in float64;
    NaN when it is undefined (fewer than 2 cells, or a constant side)."""
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    if x.shape != y.shape:
        raise ValueError(f"correlation: expected two tensors with the same number of cells, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if x.numel() < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    return float((x @ y) / denom) if denom > 0 else float("nan")
