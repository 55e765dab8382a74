"""The toolkit's one figure style: every result's `.plot()` builds its plotly figure through here.

Conventions (so a figure reads the same in every report and notebook):

- every axis has a title with its unit (`accuracy (fraction of prompts)`, `nats`, `tokens`);
- layer axes are categorical and labelled like the tables: ``0_pre`` … ``{L-1}_pre`` for the
  residual stream entering block l and ``final_post`` after the last block
  (`interp.lens.layer_labels`, TransformerLens's ``accumulated_resid`` labels);
- colour encodes the quantity (`color(name)`), line style the model: solid for the trained
  model, dashed for the random-initialised baseline of the same shape, dotted for a reference
  predictor; one legend explains both;
- a CI band is the 95% percentile-bootstrap interval over examples (`CI_TEXT`), stated in the
  hover of every point and in the figure's caption;
- a reference line (training length, clean accuracy, chance) is drawn where a verdict refers to it;
- accuracy axes run from 0 to 1 (never cut at 0.5); subplot titles are wrapped to their panel's
  width (`fit_subplot_titles`); `figure_problems` lists what breaks these rules (the tests call it).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

CI_TEXT = "95% percentile-bootstrap CI over examples"
ACCURACY = "accuracy (fraction of prompts)"
TRAINED, BASELINE, REFERENCE = "trained", "random-init", "reference"
DASH = {TRAINED: "solid", BASELINE: "dash", REFERENCE: "dot"}
WIDTH = 1000  # px: the nominal width figures are laid out for (a report's column)
FONT = 13

# one colour per quantity, the same in every figure
_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
_NAMED = {"bridge": "#1f77b4", "answer": "#d62728", "knockout": "#d62728", "transplant": "#1f77b4",
          "kv_replaced": "#2ca02c", "share_in_residual": "#1f77b4", "share_via_kv": "#ff7f0e",
          "learned": "#1f77b4", "rotary": "#d62728", "nope": "#2ca02c", "residual": "#1f77b4", "kv": "#d62728"}


def color(name: str, i: int = 0) -> str:
    """The colour of a quantity: fixed for the toolkit's named ones, else the i-th palette entry."""
    return _NAMED.get(name, _PALETTE[i % len(_PALETTE)])


def layer_ticks(labels: Sequence[str], short: bool = False) -> dict:
    """Axis settings that show integer layer indices 0..len-1 as their table labels."""
    title = "layer (l_pre: into block l)" if short else "layer (l_pre: entering block l; final_post: output)"
    return dict(tickmode="array", tickvals=list(range(len(labels))), ticktext=list(labels), title_text=title)


def band(fig: go.Figure, x: Iterable, low: Iterable, high: Iterable, *, color_: str, name: str,
         row: int | None = None, col: int | None = None, legendgroup: str | None = None) -> None:
    """A shaded CI band (not in the legend; its line's legend entry toggles it)."""
    xs, lo, hi = list(x), list(low), list(high)
    ok = [i for i in range(len(xs)) if pd.notna(lo[i]) and pd.notna(hi[i])]
    if not ok:
        return
    xs, lo, hi = [xs[i] for i in ok], [lo[i] for i in ok], [hi[i] for i in ok]
    fig.add_trace(go.Scatter(x=xs + xs[::-1], y=hi + lo[::-1], mode="lines", fill="toself", fillcolor=_rgba(color_, 0.15),
                             line=dict(width=0), hoverinfo="skip", showlegend=False,
                             name=f"{name}: {CI_TEXT}", legendgroup=legendgroup or name), row=row, col=col)


def line(fig: go.Figure, x: Iterable, y: Iterable, *, name: str, color_: str, model: str = TRAINED,
         low: Iterable | None = None, high: Iterable | None = None, unit: str = "",
         row: int | None = None, col: int | None = None, showlegend: bool = True,
         legendgroup: str | None = None, hover_x: Iterable | None = None) -> None:
    """One measured curve: line style from `model`, a CI band when `low`/`high` are given, and
    the value with its CI (defined) in the hover."""
    group = legendgroup or name
    if low is not None and high is not None:
        band(fig, x, low, high, color_=color_, name=name, row=row, col=col, legendgroup=group)
        custom = list(zip(list(low), list(high), strict=True))
        hover = (f"{name}<br>%{{customdata[2]}}: %{{y:.3f}} {unit}<br>{CI_TEXT}: "
                 "[%{customdata[0]:.3f}, %{customdata[1]:.3f}]<extra></extra>")
    else:
        custom = [(None, None)] * len(list(x))
        hover = f"{name}<br>%{{customdata[2]}}: %{{y:.3f}} {unit}<extra></extra>"
    hx = list(hover_x) if hover_x is not None else list(x)
    custom = [(a, b, str(h)) for (a, b), h in zip(custom, hx, strict=True)]
    fig.add_trace(go.Scatter(x=list(x), y=np.asarray(list(y), dtype=float), mode="lines+markers", name=name,
                             legendgroup=group,
                             showlegend=showlegend, customdata=custom, hovertemplate=hover,
                             line=dict(color=color_, dash=DASH.get(model, "solid"), width=2),
                             marker=dict(size=6)), row=row, col=col)


def reference(fig: go.Figure, *, y: float | int | None = None, x: float | int | None = None, text: str,
              row: int | str | None = None, col: int | str | None = None, dash: str = "dot",
              position: str | None = None) -> None:
    """A labelled reference line (chance, clean accuracy, training length …)."""
    kw = dict(line_dash=dash, line_color="#555", line_width=1, opacity=0.8, annotation_text=text,
              annotation_font_size=11)
    if row is not None:
        kw.update(row=row, col=col)
    if y is not None:
        fig.add_hline(y=y, annotation_position=position or "top left", **kw)
    else:
        fig.add_vline(x=x, annotation_position=position or "top right", **kw)


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _chars_for(width_px: float | int, size: float | int = FONT + 1) -> int:
    return max(12, int(width_px / (0.6 * size)))


def fit_subplot_titles(fig: go.Figure, width: int = WIDTH) -> go.Figure:
    """Wrap each subplot title to its panel's width (a panel of domain [a, b] gets (b - a) x width
    px) so neighbouring titles never run into each other; the top margin grows to fit."""
    lines = 1
    for a in fig.layout.annotations:
        if a.xref != "paper" or a.yref != "paper" or not a.text or a.yanchor != "bottom":
            continue
        dom = _panel_width(fig, a.x)
        wrapped = textwrap.wrap(a.text.replace("<br>", " "), _chars_for(dom * (width - 100)))
        a.text = "<br>".join(wrapped)
        a.font = dict(size=FONT + 1)
        lines = max(lines, len(wrapped))
    return fig


def _panel_width(fig: go.Figure, x: float) -> float:
    """The width (fraction of the plot area) of the x-axis domain centred nearest to `x`."""
    best = 1.0
    dist = 2.0
    for key in fig.layout:
        if key.startswith("xaxis") and fig.layout[key].domain is not None:
            a, b = fig.layout[key].domain
            if abs((a + b) / 2 - x) < dist:
                dist, best = abs((a + b) / 2 - x), b - a
    return best


def _legend_rows(fig: go.Figure, width: int = WIDTH) -> int:
    """How many rows a horizontal legend of this figure's entries takes at `width` px."""
    names = [t.name for t in fig.data if t.showlegend is not False and t.name]
    rows, used = (1 if names else 0), 0.0
    for name in dict.fromkeys(names):
        w = 45 + 0.55 * 12 * len(name)
        if used and used + w > width - 100:
            rows, used = rows + 1, 0.0
        used += w
    return rows


def finish(fig: go.Figure, *, title: str, caption: str, height: int = 420) -> go.Figure:
    """The common layout: title, white template, one legend below the plot area, the caption
    (what is measured, the CI's definition, the line styles) under the legend, wrapped subplot
    titles. `height`: of the plot area, px; the margins for the legend and caption are added."""
    fit_subplot_titles(fig)
    cap = "<br>".join(textwrap.wrap(caption, _chars_for(WIDTH - 100, 12)))
    n_cap = cap.count("<br>") + 1
    axis_px, row_px, cap_px = 64, 21, 16
    rows = _legend_rows(fig)
    bottom = axis_px + row_px * rows + cap_px * n_cap + 24
    fig.update_layout(
        title=dict(text=title, x=0.0, xanchor="left", font=dict(size=16)), template="plotly_white",
        height=height + bottom + 100, margin=dict(t=100, b=bottom, l=70, r=30), font=dict(size=FONT),
        legend=dict(orientation="h", yanchor="top", y=-axis_px / height, xanchor="left", x=0.0,
                    font=dict(size=12), tracegroupgap=4),
        hoverlabel=dict(font_size=12), meta={"caption": caption})
    fig.add_annotation(text=cap, xref="paper", yref="paper", x=0.0, y=0.0, xanchor="left", yanchor="top",
                       yshift=-(axis_px + row_px * rows + 10), showarrow=False, align="left",
                       font=dict(size=12, color="#444"), name="caption")
    return fig


def accuracy_axis(fig: go.Figure, row: int | None = None, col: int | None = None,
                  title: str = ACCURACY) -> None:
    kw = {} if row is None else dict(row=row, col=col)
    fig.update_yaxes(range=[-0.02, 1.05], title_text=title, **kw)


# ------------------------------------------------------------------------------ checks

def figure_problems(fig: go.Figure | dict, width: int = WIDTH) -> list[str]:
    """What breaks the conventions above, in words (empty: none): an axis of a drawn panel
    without a title, an unnamed trace, subplot titles on one row that overlap at `width` px, an
    accuracy axis whose range does not reach down to 0, a figure without a title or caption."""
    d = fig.to_plotly_json() if isinstance(fig, go.Figure) else fig
    layout, data = d.get("layout", {}), d.get("data", [])
    problems = []
    if not (layout.get("title") or {}).get("text"):
        problems.append("figure without a title")
    if not (layout.get("meta") or {}).get("caption"):
        problems.append("figure without a caption")
    used = set()
    for i, t in enumerate(data):
        if not t.get("name"):
            problems.append(f"trace {i} ({t.get('type', 'scatter')}) has no name")
        used.add(("x", t.get("xaxis", "x")))
        used.add(("y", t.get("yaxis", "y")))
    for kind, ref in sorted(used):
        key = f"{kind}axis{ref[1:]}"
        ax = layout.get(key, {})
        text = (ax.get("title") or {}).get("text")
        if not text:
            problems.append(f"{key} has no title")
            continue
        dom = ax.get("domain") or [0.0, 1.0]
        if kind == "x" and 0.55 * FONT * len(text) > (dom[1] - dom[0]) * (width - 100) + 20:
            problems.append(f"{key} title {text!r} is wider than its panel")
        rng = ax.get("range")
        if kind == "y" and "accuracy" in text.lower() and rng is not None and rng[0] > 0:
            problems.append(f"{key} ({text}) starts at {rng[0]}, not 0")
    titles = [a for a in layout.get("annotations", []) if a.get("yanchor") == "bottom"
              and a.get("xref") == "paper" and a.get("yref") == "paper" and a.get("text")]
    spans = []
    for a in titles:
        longest = max(len(s) for s in a["text"].split("<br>"))
        size = (a.get("font") or {}).get("size", 16)
        half = 0.55 * size * longest / 2 / width
        spans.append((round(a["y"], 3), a["x"] - half, a["x"] + half, a["text"]))
    for i, (y1, lo1, hi1, t1) in enumerate(spans):
        for y2, lo2, hi2, t2 in spans[i + 1:]:
            if y1 == y2 and lo1 < hi2 and lo2 < hi1:
                problems.append(f"subplot titles overlap: {t1!r} and {t2!r}")
    return problems


# ------------------------------------------------------------------------------ generic figures

def heatmap(frame: pd.DataFrame, *, x: str, y: str, value: str, title: str = "",
            diverging: bool = True, x_title: str | None = None, y_title: str | None = None,
            value_title: str | None = None, caption: str = "") -> go.Figure:
    """A heatmap of `value` over the `x` and `y` columns of a tidy frame."""
    table = frame.pivot_table(index=y, columns=x, values=value, aggfunc="mean")
    z = table.to_numpy()
    kwargs = {}
    if diverging:
        bound = float(abs(pd.DataFrame(z).stack()).max() or 1.0)
        kwargs = dict(colorscale="RdBu", zmid=0, zmin=-bound, zmax=bound)
    fig = go.Figure(go.Heatmap(z=z, x=[str(c) for c in table.columns], y=[str(i) for i in table.index],
                               colorbar=dict(title=value_title or value), name=value_title or value, **kwargs))
    fig.update_xaxes(title_text=x_title or x)
    fig.update_yaxes(title_text=y_title or y)
    return finish(fig, title=title or f"{value} by {x} and {y}", caption=caption or f"mean {value} per cell")


def curves(frame: pd.DataFrame, *, x: str, y: str, group: str | None = None, low: str | None = None,
           high: str | None = None, title: str = "", y_title: str | None = None, x_title: str | None = None,
           caption: str = "", model: str | None = None, x_labels: Sequence[str] | None = None) -> go.Figure:
    """Line curves of `y` against `x`, one per `group` (colour), with a CI band from `low`/`high`;
    `model`: a column whose value sets the line style (trained / random-init / reference);
    `x_labels`: labels of integer x values (layer axes)."""
    fig = go.Figure()
    keys = [group] if group else []
    if model:
        keys.append(model)
    groups = [((None,), frame)] if not keys else list(frame.groupby(keys, sort=False))
    colours: dict[str, str] = {}
    for name, sub in groups:
        name = name if isinstance(name, tuple) else (name,)
        sub = sub.sort_values(x)
        series = str(name[0]) if group else y
        kind = str(name[-1]) if model else TRAINED
        c = colours.setdefault(series, color(series, len(colours)))
        label = series if not model else f"{series} ({kind})"
        line(fig, sub[x], sub[y], name=label, color_=c, model=kind,
             low=sub[low] if low else None, high=sub[high] if high else None,
             hover_x=[x_labels[int(v)] for v in sub[x]] if x_labels is not None else None)
    fig.update_yaxes(title_text=y_title or y)
    if x_labels is not None:
        fig.update_xaxes(**layer_ticks(x_labels))
    else:
        fig.update_xaxes(title_text=x_title or x)
    if "accuracy" in (y_title or y).lower():
        accuracy_axis(fig, title=y_title or y)
    return finish(fig, title=title or f"{y} by {x}",
                  caption=caption or (f"Bands: {CI_TEXT}." if low else f"{y} by {x}."))
