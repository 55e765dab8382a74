"""Feature dashboards (plotly), after Bricken et al. 2023's feature browser: activation histogram,
the tokens the feature promotes and suppresses through the unembedding, and its top-activating
contexts with the firing token highlighted. The figure is built in `interp.sae.tracing`
(`FeatureTrace.plot`); the offline HTML export of several is `interp.sae.commands.write_dashboards`
(the report layer)."""

from __future__ import annotations

from interp.sae.tracing import FeatureTrace, feature_dashboard

__all__ = ["FeatureTrace", "feature_dashboard"]
