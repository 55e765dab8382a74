"""Plotly figures shared by the toolkit's result objects (built from tidy DataFrames only)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go


def heatmap(frame: pd.DataFrame, *, x: str, y: str, value: str, title: str = "",
            diverging: bool = True) -> go.Figure:
    """A heatmap of `value` over the `x` and `y` columns of a tidy frame."""
    table = frame.pivot_table(index=y, columns=x, values=value, aggfunc="mean")
    z = table.to_numpy()
    kwargs = {}
    if diverging:
        bound = float(abs(pd.DataFrame(z).stack()).max() or 1.0)
        kwargs = dict(colorscale="RdBu", zmid=0, zmin=-bound, zmax=bound)
    fig = go.Figure(go.Heatmap(z=z, x=[str(c) for c in table.columns], y=[str(i) for i in table.index],
                               colorbar=dict(title=value), **kwargs))
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, template="plotly_white")
    return fig


def curves(frame: pd.DataFrame, *, x: str, y: str, group: str | None = None, low: str | None = None,
           high: str | None = None, title: str = "", y_title: str | None = None) -> go.Figure:
    """Line curves of `y` against `x`, one per `group`, with a shaded CI band from `low`/`high`."""
    fig = go.Figure()
    groups = [(None, frame)] if group is None else list(frame.groupby(group, sort=False))
    for name, sub in groups:
        sub = sub.sort_values(x)
        label = str(name) if name is not None else y
        if low is not None and high is not None:
            fig.add_trace(go.Scatter(
                x=list(sub[x]) + list(sub[x])[::-1], y=list(sub[high]) + list(sub[low])[::-1],
                fill="toself", opacity=0.2, line=dict(width=0), showlegend=False, hoverinfo="skip",
                name=f"{label} CI"))
        fig.add_trace(go.Scatter(x=sub[x], y=sub[y], mode="lines+markers", name=label))
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y_title or y, template="plotly_white")
    return fig
