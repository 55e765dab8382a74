"""Feature dashboards (plotly) and an offline HTML export of several (after Bricken et al. 2023's
feature browser): activation histogram, the tokens the feature promotes and suppresses through
the unembedding, and its top-activating contexts with the firing token highlighted."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from interp.report import Report
from interp.sae.tracing import FeatureTrace


def feature_dashboard(trace: FeatureTrace, feature: int, *, n_logits: int = 8) -> go.Figure:
    """One feature's dashboard: histogram, logit effects, top contexts (built from the frames)."""
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


def write_dashboards(trace: FeatureTrace, features: Sequence[int], path: str | Path, *,
                     title: str | None = None) -> Path:
    """Dashboards of several features in one offline HTML file (plotly.js embedded once)."""
    report = Report(title or f"SAE features at {trace.hook_name}")
    for f in features:
        i = trace.index(int(f))
        report.add(f"feature {int(f)}", f"frequency {float(trace.frequency[i]):.4f}, mean activation "
                                        f"{float(trace.mean_activation[i]):.4f}",
                   [feature_dashboard(trace, int(f))])
    return report.write(path)
