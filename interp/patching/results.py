"""Result objects of the patching methods: labelled tensors that turn into tables and figures.

Every result holds detached CPU tensors, the axes they run over, and the baselines they were
measured against (the clean and corrupted metrics). `.to_frame()` is tidy (one row per measured
cell); `.plot()` is built from that frame only. The normalised effect is
`interp.stats.normalised_effect`: (patched - corrupted) / (clean - corrupted), i.e. the recovery
for denoising and 1 - (damage) for noising.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from torch import Tensor

from interp.stats import normalised_effect
from interp.viz import curves, heatmap


def _frame(values: Tensor, axes: tuple[str, ...], coords: tuple[tuple, ...], value: str) -> pd.DataFrame:
    flat = values.reshape(-1).tolist()
    rows = [dict(zip(axes, labels, strict=True)) | {value: v}
            for labels, v in zip(itertools.product(*coords), flat, strict=True)]
    return pd.DataFrame(rows, columns=[*axes, value])


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


@dataclass(frozen=True)
class PatchResult:
    """The metric after each patch, over `axes` (e.g. ("layer", "pos") or ("layer", "pos", "head")).

    `direction` says which run was patched: "denoising" (clean values into the corrupted run)
    or "noising" (corrupted values into the clean run).
    """

    values: Tensor
    axes: tuple[str, ...]
    coords: tuple[tuple, ...]
    site: str
    direction: str
    clean_metric: float
    corrupt_metric: float
    method: str = "activation patching"

    def __post_init__(self) -> None:
        shape = tuple(len(c) for c in self.coords)
        if tuple(self.values.shape) != shape or len(self.axes) != len(shape):
            raise ValueError(f"{type(self).__name__}: expected values of shape {shape} over axes "
                             f"{self.axes}, got {tuple(self.values.shape)}")

    @property
    def base_metric(self) -> float:
        """The metric of the run that was patched (corrupted for denoising, clean for noising)."""
        return self.corrupt_metric if self.direction == "denoising" else self.clean_metric

    @property
    def effect(self) -> Tensor:
        """Metric change caused by each patch: values - base_metric."""
        return self.values - self.base_metric

    def normalised(self) -> Tensor:
        """(patched - corrupted) / (clean - corrupted); raises when clean ~ corrupted."""
        return normalised_effect(self.values, self.corrupt_metric, self.clean_metric)

    def to_frame(self) -> pd.DataFrame:
        frame = _frame(self.values, self.axes, self.coords, "value")
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
class KnockoutResult:
    """Attention knockout (Geva et al. 2023) for each start layer l: edges blocked at layers [l, end).

    `values` is the metric, `kl` the mean KL(base || knocked out) of the output distribution at
    the target position (nats), both over `start_layers`.
    """

    values: Tensor
    kl: Tensor
    start_layers: tuple[int, ...]
    end_layer: int
    target: int
    sources: tuple[int, ...]
    heads: tuple[int, ...] | None
    base_metric: float

    @property
    def effect(self) -> Tensor:
        """Metric change caused by each knockout: values - base_metric."""
        return self.values - self.base_metric

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({
            "start_layer": list(self.start_layers), "end_layer": self.end_layer,
            "value": self.values.tolist(), "effect": self.effect.tolist(), "kl": self.kl.tolist(),
            "target": self.target,
        })

    def plot(self) -> go.Figure:
        frame = self.to_frame().melt(id_vars=["start_layer"], value_vars=["effect", "kl"],
                                     var_name="measure", value_name="y")
        return curves(frame, x="start_layer", y="y", group="measure",
                      title=f"attention knockout into position {self.target} from layer l up")


@dataclass(frozen=True)
class AttributionResult:
    """Attribution patching (Syed et al. 2023): first-order estimates of each patch's effect.

    `values` estimates the metric *change* of patching each cell (compare with
    `PatchResult.effect`). `correlation` is the Pearson correlation with an exact sweep over
    the same cells, when one was given (AtP can fail by saturation or cancellation: Kramar
    et al. 2024), else None.
    """

    values: Tensor
    axes: tuple[str, ...]
    coords: tuple[tuple, ...]
    site: str
    direction: str
    base_metric: float
    correlation: float | None = None

    @property
    def estimate(self) -> Tensor:
        """Estimated metric after each patch: base_metric + values."""
        return self.values + self.base_metric

    def to_frame(self) -> pd.DataFrame:
        frame = _frame(self.values, self.axes, self.coords, "value")
        frame["site"], frame["direction"] = self.site, self.direction
        return frame

    def plot(self) -> go.Figure:
        r = "" if self.correlation is None else f", r = {self.correlation:.3f} vs exact"
        return _plot(self.to_frame(), self.axes, "value",
                     f"attribution patching: {self.site} ({self.direction}{r})")


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two equally-shaped tensors (flattened), in float64."""
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    if x.shape != y.shape or x.numel() < 2:
        raise ValueError(f"correlation: expected two tensors with the same >= 2 cells, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    x, y = x - x.mean(), y - y.mean()
    denom = (x.norm() * y.norm()).item()
    return float("nan") if denom == 0 else float((x @ y).item() / denom)


def detach(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float64).clone()
