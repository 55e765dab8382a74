"""Patching: activation patching sweeps, K/V patching, path patching, attention knockout and
attribution patching — batched and exact (see `interp.patching.engine` for how).

Entry points: `sweep`, `patch`, `patched_logits`, `kv_patch`, `path_patch`, `knockout`,
`attribute`; metrics `logit_diff`, `logprob`, `PositionMetric`; results `PatchResult`,
`KnockoutResult`, `AttributionResult`.
"""

from interp.patching.attribution import attribute
from interp.patching.knockout import knockout
from interp.patching.kv import kv_patch
from interp.patching.metrics import Metric, PositionMetric, logit_diff, logprob
from interp.patching.path import path_patch
from interp.patching.results import AttributionResult, KnockoutResult, PatchResult
from interp.patching.sweep import patch, patched_logits, sweep

__all__ = [
    "AttributionResult", "KnockoutResult", "Metric", "PatchResult", "PositionMetric", "attribute",
    "knockout", "kv_patch", "logit_diff", "logprob", "patch", "patched_logits", "path_patch", "sweep",
]
