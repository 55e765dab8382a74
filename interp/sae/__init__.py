"""Sparse-autoencoder feature tracing with sae-lens: train, load, evaluate and trace features.

SAEs decompose activations into sparse, nameable features (Bricken et al. 2023, "Towards
monosemanticity"; Cunningham et al. 2023). The SAE classes and the training loop are sae-lens's;
this package adds what an investigation needs:

- `train`: an SAE on a model's activations at one hook (sae-lens `SAETrainer` fed by the
  toolkit's caches/stores), CPU minutes for the organisms;
- `load` / `save`: sae-lens's on-disk format (+ a manifest with sha256), pretrained releases
  (clear offline error), shipped SAEs (``sae:NAME`` -> data/sae/NAME);
- `evaluate`: variance explained, L0, dead/dense fractions, CE loss recovered when spliced in,
  per named target set (next-token, answer position, ...);
- `check_sae`: every call that uses an SAE with a model first checks the SAE's recorded hook,
  model weights (`interp.models.weights_fingerprint`) and width, and raises `SAEMismatchError` on a mismatch
  (``allow_mismatch=True`` overrides the hook and model checks);
- `trace`: top-activating contexts and direct logit effects; `feature_attribution` (activation x
  gradient, per example) with `check_attribution` (exact ablation); `ablate`; `steer`;
  `feature_graph` (cross-layer
  tracing through upstream features and attention heads); `select_features` (features that carry
  a label, by mutual information); dashboards and an offline HTML export.

Caveat: attribution is a first-order estimate; always look at its correlation with exact
ablation before trusting a ranking.

Every function takes `interp.prompts.Prompts` (a padded `Batch` or a token tensor also works),
selects positions by name (`positions="last"`, a span name, ...) and takes metrics of the one
contract `interp.metrics` (``metric(logits, prompts) -> [batch]``).

The names below are imported on first use (PEP 562): `interp sae --help` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from interp.metrics import Metric
    from interp.sae.checks import SAEMismatchError, check_sae
    from interp.sae.circuit import FeatureGraph, attribute_sources, exact_source_effects, feature_graph
    from interp.sae.commands import write_dashboards
    from interp.sae.evaluation import CELoss, SAEEval, evaluate, reconstruct, splice, splice_edit
    from interp.sae.io import SAELoadError, list_saes, load, read_manifest, save
    from interp.sae.planted import PlantedConfig, PlantedResult
    from interp.sae.selection import (
        FeatureSelection,
        LabelFeatureTest,
        firing_mutual_information,
        label_feature_test,
        select_features,
        steer_label,
    )
    from interp.sae.tracing import (
        AttributionCheck,
        Context,
        FeatureAttribution,
        FeatureTrace,
        Steering,
        ablate,
        check_attribution,
        direct_logit_effect,
        feature_activations,
        feature_attribution,
        feature_dashboard,
        final_norm_scale,
        steer,
        steering_curve,
        steering_edit,
        trace,
        zero_features,
    )
    from interp.sae.training import TrainConfig, TrainResult, train, train_on_batches

_LAZY = {
    "CELoss": "interp.sae.evaluation",
    "SAEMismatchError": "interp.sae.checks",
    "check_sae": "interp.sae.checks",
    "AttributionCheck": "interp.sae.tracing",
    "Context": "interp.sae.tracing",
    "FeatureAttribution": "interp.sae.tracing",
    "FeatureGraph": "interp.sae.circuit",
    "FeatureSelection": "interp.sae.selection",
    "FeatureTrace": "interp.sae.tracing",
    "LabelFeatureTest": "interp.sae.selection",
    "Metric": "interp.metrics",
    "PlantedConfig": "interp.sae.planted",
    "PlantedResult": "interp.sae.planted",
    "SAEEval": "interp.sae.evaluation",
    "SAELoadError": "interp.sae.io",
    "Steering": "interp.sae.tracing",
    "TrainConfig": "interp.sae.training",
    "TrainResult": "interp.sae.training",
    "ablate": "interp.sae.tracing",
    "attribute_sources": "interp.sae.circuit",
    "check_attribution": "interp.sae.tracing",
    "direct_logit_effect": "interp.sae.tracing",
    "evaluate": "interp.sae.evaluation",
    "exact_source_effects": "interp.sae.circuit",
    "feature_activations": "interp.sae.tracing",
    "feature_attribution": "interp.sae.tracing",
    "feature_dashboard": "interp.sae.tracing",
    "feature_graph": "interp.sae.circuit",
    "final_norm_scale": "interp.sae.tracing",
    "firing_mutual_information": "interp.sae.selection",
    "label_feature_test": "interp.sae.selection",
    "list_saes": "interp.sae.io",
    "load": "interp.sae.io",
    "read_manifest": "interp.sae.io",
    "reconstruct": "interp.sae.evaluation",
    "save": "interp.sae.io",
    "select_features": "interp.sae.selection",
    "splice": "interp.sae.evaluation",
    "splice_edit": "interp.sae.evaluation",
    "steer": "interp.sae.tracing",
    "steer_label": "interp.sae.selection",
    "steering_curve": "interp.sae.tracing",
    "steering_edit": "interp.sae.tracing",
    "trace": "interp.sae.tracing",
    "train": "interp.sae.training",
    "train_on_batches": "interp.sae.training",
    "write_dashboards": "interp.sae.commands",
    "zero_features": "interp.sae.tracing",
}

__all__ = [
    "AttributionCheck", "CELoss", "Context", "FeatureAttribution", "FeatureGraph", "FeatureSelection", "FeatureTrace",
    "LabelFeatureTest", "Metric", "PlantedConfig", "PlantedResult", "SAEEval", "SAELoadError", "SAEMismatchError", "Steering", "TrainConfig",
    "TrainResult", "ablate", "attribute_sources", "check_attribution", "check_sae",
    "direct_logit_effect", "evaluate", "exact_source_effects", "feature_activations", "feature_attribution",
    "feature_dashboard", "feature_graph", "final_norm_scale", "firing_mutual_information", "label_feature_test",
    "list_saes", "load", "read_manifest", "reconstruct", "save", "select_features", "splice", "splice_edit", "steer",
    "steer_label", "steering_curve", "steering_edit", "trace", "train", "train_on_batches", "write_dashboards",
    "zero_features",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'interp.sae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
