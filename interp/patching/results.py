"""Result objects of the patching methods: per-example values that turn into tables and figures.

Every result keeps one value per (cell, example) in `per_example` ([..., n], float64, CPU; NaN
where an example does not have the cell's position), the axes they run over, and the per-example
baselines they were measured against (the clean and corrupted metrics). `.values` is the mean
over the examples that have the cell (what the TransformerLens-style batch metric gave for mean
metrics), `.n` how many those are, `.ci()` a percentile-bootstrap interval over them
(`interp.stats.bootstrap_many`, parameters `alpha` and `n_boot`). `.to_frame()` is tidy (one row
per measured cell: the axes, ``value, ci_low, ci_high, n`` and more); `.plot()` is built from that
frame only. The normalised effect is `interp.stats.normalised_effect`:
(patched - corrupted) / (clean - corrupted), i.e. the recovery for denoising and 1 - (damage) for
noising, on the means over each cell's examples.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from torch import Tensor

from interp.stats import bootstrap_many, normalised_effect
from interp.viz import curves, heatmap


def detach(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float64).clone()


def cell_mean(per_example: Tensor) -> Tensor:
    """Mean over the last (example) axis, ignoring NaN (examples without the cell); NaN when none."""
    ok = ~torch.isnan(per_example)
    n = ok.sum(-1)
    total = torch.where(ok, per_example, torch.zeros_like(per_example)).sum(-1)
    return torch.where(n > 0, total / n.clamp_min(1), torch.full_like(total, float("nan")))


def cell_ci(per_example: Tensor, *, alpha: float = 0.05, n_boot: int = 1000) -> tuple[Tensor, Tensor]:
    """Percentile-bootstrap CI of each cell's mean over its examples (the non-NaN ones): cells with
    the same examples share resamples (`bootstrap_many`, seed 0); fewer than 2 examples: NaN."""
    shape = per_example.shape[:-1]
    flat = per_example.reshape(-1, per_example.shape[-1])
    low = torch.full((flat.shape[0],), float("nan"), dtype=torch.float64)
    high = low.clone()
    ok = ~torch.isnan(flat)
    patterns: dict[tuple[bool, ...], list[int]] = {}
    for c, row in enumerate(ok.tolist()):
        patterns.setdefault(tuple(row), []).append(c)
    for pattern, cells in patterns.items():
        keep = torch.tensor(pattern)
        if int(keep.sum()) < 2:
            continue
        _, lo, hi = bootstrap_many(flat[cells][:, keep].T, n_boot=n_boot, alpha=alpha)
        low[cells], high[cells] = lo, hi
    return low.reshape(shape), high.reshape(shape)


def _mean_where(values: Tensor, per_example: Tensor) -> Tensor:
    """Per cell, the mean of per-example `values` [n] over the examples the cell has."""
    ok = ~torch.isnan(per_example)
    n = ok.sum(-1).clamp_min(1)
    return torch.where(ok, values.expand_as(per_example), torch.zeros_like(per_example)).sum(-1) / n


def _frame(values: Tensor, axes: tuple[str, ...], coords: tuple[tuple, ...], value: str) -> pd.DataFrame:
    flat = values.reshape(-1).tolist()
    rows = [dict(zip(axes, labels, strict=True)) | {value: v}
            for labels, v in zip(itertools.product(*coords), flat, strict=True)]
    return pd.DataFrame(rows, columns=[*axes, value])


def _stats_frame(per_example: Tensor, axes: tuple[str, ...], coords: tuple[tuple, ...],
                 alpha: float, n_boot: int) -> pd.DataFrame:
    frame = _frame(cell_mean(per_example), axes, coords, "value")
    low, high = cell_ci(per_example, alpha=alpha, n_boot=n_boot)
    frame["ci_low"], frame["ci_high"] = low.reshape(-1).tolist(), high.reshape(-1).tolist()
    frame["n"] = (~torch.isnan(per_example)).sum(-1).reshape(-1).tolist()
    return frame


def _plot(frame: pd.DataFrame, axes: tuple[str, ...], value: str, title: str) -> go.Figure:
    if len(axes) == 1:
        fig = go.Figure(go.Bar(x=[str(x) for x in frame[axes[0]]], y=frame[value]))
        fig.update_layout(title=title, xaxis_title=axes[0], yaxis_title=value, template="plotly_white")
        return fig
    if len(axes) == 2:
        return heatmap(frame, x=axes[1], y=axes[0], value=value, title=title)
    # [layer, pos, head]: one row per (layer, head), positions across
    f = frame.copy()
    f["layer.head"] = [f"L{a}.{b}" for a, b in zip(f[axes[0]], f[axes[2]], strict=True)]
    return heatmap(f, x=axes[1], y="layer.head", value=value, title=title)


def _check_cells(name: str, per_example: Tensor, coords: tuple[tuple, ...], axes: tuple[str, ...], n: int,
                 alpha: float = 0.05, n_boot: int = 1000) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"{name}.alpha: expected 0 < alpha < 1 (a (1 - alpha) interval), got {alpha}")
    if not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"{name}.n_boot: expected a positive int (bootstrap resamples), got {n_boot!r}")
    shape = (*(len(c) for c in coords), n)
    if tuple(per_example.shape) != shape or len(axes) != len(coords):
        raise ValueError(f"{name}: expected per-example values of shape {shape} (cells x examples) over axes "
                         f"{axes}, got {tuple(per_example.shape)}")


class Cells:
    """Per-example values over cells (`per_example` [..., n], NaN where an example lacks a cell)
    against the unpatched run's `base_values` [n]: the statistics every patching result shares."""

    per_example: Tensor
    base_values: Tensor
    alpha: float
    n_boot: int

    @property
    def values(self) -> Tensor:
        """Mean over the examples that have each cell (NaN where none has it)."""
        return cell_mean(self.per_example)

    @property
    def n(self) -> Tensor:
        """How many examples each cell's mean and CI are over."""
        return (~torch.isnan(self.per_example)).sum(-1)

    def ci(self, alpha: float | None = None, n_boot: int | None = None) -> tuple[Tensor, Tensor]:
        """Percentile-bootstrap (1 - alpha) interval of each cell's mean over its examples."""
        return cell_ci(self.per_example, alpha=self.alpha if alpha is None else alpha,
                       n_boot=self.n_boot if n_boot is None else n_boot)

    @property
    def base_metric(self) -> float:
        """The mean metric of the run that was intervened on."""
        return float(self.base_values.mean())


class PairedCells(Cells):
    """`Cells` whose values are metrics of intervened runs: effects are paired per example."""

    @property
    def per_example_effect(self) -> Tensor:
        """Metric change caused in each example: per_example - base_values."""
        return self.per_example - self.base_values

    @property
    def effect(self) -> Tensor:
        """Mean metric change over each cell's examples (paired)."""
        return cell_mean(self.per_example_effect)


@dataclass(frozen=True)
class PatchResult(PairedCells):
    """The metric after each patch, per example, over `axes` (e.g. ("layer", "pos") or
    ("layer", "pos", "head"); a "pos" axis holds ints in prompt coordinates or span names).

    `direction` says which run was patched: "denoising" (clean values into the corrupted run)
    or "noising" (corrupted values into the clean run). `clean_values` / `corrupt_values` [n] are
    the unpatched runs' metrics per example.
    """

    per_example: Tensor
    axes: tuple[str, ...]
    coords: tuple[tuple, ...]
    site: str
    direction: str
    clean_values: Tensor
    corrupt_values: Tensor
    method: str = "activation patching"
    alpha: float = 0.05
    n_boot: int = 1000
    # how the patched copies ran: "partial" (from the patched layer on) or "hooks" (a Bridge whose
    # HF model acts between its blocks: each copy's whole forward under hooks; the same values)
    path: str = "partial"

    def __post_init__(self) -> None:
        _check_cells(type(self).__name__, self.per_example, self.coords, self.axes, self.clean_values.shape[0],
                     self.alpha, self.n_boot)

    @property
    def clean_metric(self) -> float:
        return float(self.clean_values.mean())

    @property
    def corrupt_metric(self) -> float:
        return float(self.corrupt_values.mean())

    @property
    def base_values(self) -> Tensor:
        """Per example, the metric of the run that was patched (corrupted for denoising)."""
        return self.corrupt_values if self.direction == "denoising" else self.clean_values

    def normalised(self) -> Tensor:
        """(patched - corrupted) / (clean - corrupted) of the means over each cell's examples;
        raises when clean ~ corrupted."""
        return normalised_effect(self.values, _mean_where(self.corrupt_values, self.per_example),
                                 _mean_where(self.clean_values, self.per_example))

    def to_frame(self) -> pd.DataFrame:
        frame = _stats_frame(self.per_example, self.axes, self.coords, self.alpha, self.n_boot)
        try:
            frame["normalised"] = self.normalised().reshape(-1).tolist()
        except ValueError:
            frame["normalised"] = float("nan")
        frame["site"], frame["direction"], frame["method"] = self.site, self.direction, self.method
        return frame

    def plot(self, normalised: bool = False) -> go.Figure:
        frame = self.to_frame()
        col = "normalised" if normalised else "value"
        frame = frame.drop(columns=["value" if normalised else "normalised"]).rename(columns={col: "value"})
        return _plot(frame, self.axes, "value", f"{self.method}: {self.site} ({self.direction})")


@dataclass(frozen=True)
class KnockoutResult(PairedCells):
    """Attention knockout (Geva et al. 2023) for each start layer l: edges blocked at layers [l, end).

    `per_example` [start_layer, n] is the metric, `kl_per_example` the KL(base || knocked out) of
    the output distribution at each prompt's `at` position (nats); `.values` / `.kl` their means.
    """

    per_example: Tensor
    kl_per_example: Tensor
    start_layers: tuple[int, ...]
    end_layer: int
    at: str
    sources: str
    heads: tuple[int, ...] | None
    base_values: Tensor
    alpha: float = 0.05
    n_boot: int = 1000
    path: str = "partial"  # as PatchResult.path

    def __post_init__(self) -> None:
        _check_cells("KnockoutResult", self.per_example, (self.start_layers,), ("start_layer",),
                     self.base_values.shape[0], self.alpha, self.n_boot)

    @property
    def kl(self) -> Tensor:
        return cell_mean(self.kl_per_example)

    def to_frame(self) -> pd.DataFrame:
        frame = _stats_frame(self.per_example, ("start_layer",), (self.start_layers,), self.alpha, self.n_boot)
        frame["end_layer"] = self.end_layer
        frame["effect"] = self.effect.tolist()
        frame["kl"] = self.kl.tolist()
        frame["at"] = self.at
        return frame

    def plot(self) -> go.Figure:
        frame = self.to_frame().melt(id_vars=["start_layer"], value_vars=["effect", "kl"],
                                     var_name="measure", value_name="y")
        return curves(frame, x="start_layer", y="y", group="measure",
                      title=f"attention knockout into {self.at} from layer l up")


@dataclass(frozen=True)
class AttributionResult(Cells):
    """Attribution patching (Syed et al. 2023): first-order estimates of each patch's effect.

    `per_example` [..., n] estimates each example's metric *change* of patching each cell
    (compare with `PatchResult.per_example_effect`); `.values` is their mean. `correlation` is the
    Pearson correlation of the means with an exact sweep over the same cells, when one was given
    (AtP can fail by saturation or cancellation: Kramar et al. 2024), else None.
    """

    per_example: Tensor
    axes: tuple[str, ...]
    coords: tuple[tuple, ...]
    site: str
    direction: str
    base_values: Tensor
    correlation: float | None = None
    alpha: float = 0.05
    n_boot: int = 1000

    def __post_init__(self) -> None:
        _check_cells("AttributionResult", self.per_example, self.coords, self.axes, self.base_values.shape[0],
                     self.alpha, self.n_boot)

    @property
    def estimate(self) -> Tensor:
        """Estimated mean metric after each patch: values + mean base metric over the cell's examples."""
        return self.values + _mean_where(self.base_values, self.per_example)

    def to_frame(self) -> pd.DataFrame:
        frame = _stats_frame(self.per_example, self.axes, self.coords, self.alpha, self.n_boot)
        frame["site"], frame["direction"] = self.site, self.direction
        return frame

    def plot(self) -> go.Figure:
        r = "" if self.correlation is None else f", r = {self.correlation:.3f} vs exact"
        return _plot(self.to_frame(), self.axes, "value",
                     f"attribution patching: {self.site} ({self.direction}{r})")


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two equally-shaped tensors (flattened), in float64, over the cells
    where both are defined."""
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    if x.shape != y.shape or x.numel() < 2:
        raise ValueError(f"correlation: expected two tensors with the same >= 2 cells, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    ok = ~(torch.isnan(x) | torch.isnan(y))
    x, y = x[ok], y[ok]
    x, y = x - x.mean(), y - y.mean()
    denom = (x.norm() * y.norm()).item()
    return float("nan") if denom == 0 else float((x @ y).item() / denom)
