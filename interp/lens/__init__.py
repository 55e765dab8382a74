"""Lenses: read what the residual stream at each layer predicts.

- `logit_lens` (nostalgebraist 2020): each layer's residual through the final norm and unembedding.
- `TunedLens` (Belrose et al. 2023): per-layer affine translators trained to match the final
  distribution; resumable training, saved with the model name and hooks.
- `future_lens` (Pal et al. 2023, simplified): does h_t encode x_{t+k} for k >= 2? Linear maps
  per layer and offset against bigram and unigram baselines.

Lens layers are resid_pre of each block plus the final resid_post (`interp.lens.residual`).
"""

from interp.lens.future import FutureLensConfig, FutureLensResult, future_lens, softmax_regression
from interp.lens.logit import LensResult, logit_lens
from interp.lens.residual import Decoder, kl_from_final, layer_labels, lens_hooks, lens_nodes, residual_stack
from interp.lens.tuned import LensComparison, TunedLens, TunedLensConfig

__all__ = [
    "Decoder",
    "FutureLensConfig",
    "FutureLensResult",
    "LensComparison",
    "LensResult",
    "TunedLens",
    "TunedLensConfig",
    "future_lens",
    "kl_from_final",
    "layer_labels",
    "lens_hooks",
    "lens_nodes",
    "logit_lens",
    "residual_stack",
    "softmax_regression",
]
