"""Patching: activation patching sweeps, K/V patching, path patching, attention knockout and
attribution patching — batched over examples and copies, exact (see `interp.patching.engine`).

Every function takes `interp.prompts.Prompts` (padded, any lengths; the corrupted run is
`prompts.partner` or `corrupt=`), a metric in the `interp.metrics` contract (one value per
example; TransformerLens-style scalar metrics through `interp.metrics.as_metric`), and positions
in prompt coordinates: ints, span names, or `At` nodes at named / per-example positions. Results
keep per-example values (`.per_example`), their means (`.values`), counts (`.n`) and bootstrap
CIs (`.ci()`, `.to_frame()`).

Entry points: `sweep`, `patch`, `patched_logits`, `kv_patch`, `path_patch` (`path_patch_many` for
many requests on the same prompts), `knockout`,
`attribute`; results `PatchResult`, `KnockoutResult`, `AttributionResult`; deprecated metrics
`logit_diff`, `logprob`, `PositionMetric` (use `interp.metrics`).
"""

from interp.patching.attribution import attribute
from interp.patching.engine import At
from interp.patching.knockout import knockout
from interp.patching.kv import kv_patch
from interp.patching.metrics import Metric, PositionMetric, logit_diff, logprob
from interp.patching.path import Path, path_patch, path_patch_many
from interp.patching.results import AttributionResult, KnockoutResult, PatchResult
from interp.patching.sweep import patch, patched_logits, sweep

__all__ = [
    "At", "AttributionResult", "KnockoutResult", "Metric", "PatchResult", "Path", "PositionMetric", "attribute",
    "knockout", "kv_patch", "logit_diff", "logprob", "patch", "patched_logits", "path_patch", "path_patch_many",
    "sweep",
]
