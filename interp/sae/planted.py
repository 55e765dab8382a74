"""Planted ground truth: can an SAE recover known feature directions held in superposition?

sae-lens's synthetic data utilities build a `FeatureDictionary` (n unit feature directions in
d < n dimensions) and an `ActivationGenerator` (sparse, independently firing feature
magnitudes); hidden activations are their product. We train an SAE on them with the same
training path as for model activations and measure recovery as the mean, over true features, of
the maximum cosine similarity with any learned decoder direction (Sharkey et al. 2022,
"Taking features out of superposition with sparse autoencoders"; >= 0.9 is good), alongside L0
and the fraction of variance explained (computed by sae-lens's own synthetic-data evaluation).

Run the full-size check (512 features in 256 dims) with ``python -m interp.sae.planted``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from sae_lens import SAE
from sae_lens.synthetic import ActivationGenerator, FeatureDictionary, eval_sae_on_synthetic_data
from sae_lens.util import cosine_similarities
from torch import Tensor

from interp.sae.training import TrainConfig, train_on_batches


@dataclass(frozen=True, kw_only=True)
class PlantedConfig:
    """A synthetic superposition problem and the SAE trained on it."""

    n_features: int = 512
    d_model: int = 256
    firing_probability: float = 0.01
    magnitude_std: float = 0.0
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        d_sae=512, sae_kwargs={"k": 8}, lr=3e-3, batch_size=1024, training_samples=3_000_000,
        normalize=False, dead_feature_window=50))
    eval_samples: int = 20_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_features < 1 or self.d_model < 1:
            raise ValueError(f"PlantedConfig: expected n_features, d_model >= 1, got {self.n_features}, {self.d_model}")
        if not 0 < self.firing_probability < 1:
            raise ValueError(f"PlantedConfig.firing_probability: expected in (0, 1), got {self.firing_probability}")


@dataclass(frozen=True)
class PlantedResult:
    """Recovery of planted features: per-true-feature max cosine similarity, plus SAE quality."""

    config: PlantedConfig
    max_cosine: Float[Tensor, "n_features"]
    mean_max_cosine: float
    l0: float
    true_l0: float
    variance_explained: float
    mcc: float
    dead_latents: int
    seconds: float
    sae: SAE

    @property
    def values(self) -> dict[str, float]:
        return {"mean_max_cosine": self.mean_max_cosine, "l0": self.l0, "true_l0": self.true_l0,
                "variance_explained": self.variance_explained, "mcc": self.mcc,
                "dead_latents": float(self.dead_latents), "seconds": self.seconds}

    def to_frame(self) -> pd.DataFrame:
        """One row per true feature: its best cosine similarity with a learned decoder direction."""
        return pd.DataFrame({"feature": range(self.max_cosine.numel()), "max_cosine": self.max_cosine.tolist()})

    def plot(self) -> go.Figure:
        frame = self.to_frame()
        fig = go.Figure(go.Histogram(x=frame["max_cosine"], nbinsx=40))
        fig.update_layout(title=f"Planted features recovered: mean max cosine {self.mean_max_cosine:.3f}",
                          xaxis_title="max cosine similarity with a learned direction", yaxis_title="true features",
                          template="plotly_white")
        return fig

    def __str__(self) -> str:
        c = self.config
        return (f"planted {c.n_features} features in {c.d_model} dims: mean max cosine {self.mean_max_cosine:.4f}, "
                f"MCC {self.mcc:.4f}, L0 {self.l0:.2f} (true {self.true_l0:.2f}), variance explained "
                f"{self.variance_explained:.4f}, dead latents {self.dead_latents}, {self.seconds:.1f} s")


def max_cosine(true_dirs: Float[Tensor, "n d"], learned: Float[Tensor, "m d"]) -> Float[Tensor, "n"]:
    """For each true direction, the largest cosine similarity with any learned direction."""
    return cosine_similarities(true_dirs.float(), learned.float()).max(dim=1).values


class _Batches:
    """Endless synthetic hidden-activation batches (sae-lens generator x dictionary), seeded."""

    def __init__(self, fd: FeatureDictionary, gen: ActivationGenerator, batch_size: int, seed: int) -> None:
        self.fd, self.gen, self.batch_size, self.seed = fd, gen, batch_size, seed
        self.rng_state: Tensor | None = None

    def __iter__(self) -> _Batches:
        return self

    @torch.no_grad()
    def __next__(self) -> Tensor:
        # the generator samples from torch's global RNG: run it on a private, seeded stream
        with torch.random.fork_rng(devices=[]):
            if self.rng_state is None:
                torch.manual_seed(self.seed)
            else:
                torch.set_rng_state(self.rng_state)
            out = self.fd(self.gen.sample(self.batch_size))
            self.rng_state = torch.get_rng_state()
        return out


def run(config: PlantedConfig | None = None) -> PlantedResult:
    """Build the planted problem with sae-lens, train an SAE on it, and measure recovery."""
    config = config or PlantedConfig()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        fd = FeatureDictionary(config.n_features, config.d_model, seed=config.seed)
        gen = ActivationGenerator(config.n_features, config.firing_probability,
                                  std_firing_magnitudes=config.magnitude_std)
    fd.eval()
    batches = _Batches(fd, gen, config.train.batch_size, config.seed + 1)
    result = train_on_batches(batches, config.d_model, config.train, hook_name="synthetic")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 2)
        ev = eval_sae_on_synthetic_data(result.sae, fd, gen, num_samples=config.eval_samples)
    mc = max_cosine(fd.feature_vectors.detach(), result.sae.W_dec.detach())
    return PlantedResult(config=config, max_cosine=mc, mean_max_cosine=float(mc.mean()), l0=ev.sae_l0,
                         true_l0=ev.true_l0, variance_explained=ev.explained_variance, mcc=ev.mcc,
                         dead_latents=ev.dead_latents, seconds=time.perf_counter() - start, sae=result.sae)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: run the planted check and print its numbers as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-features", type=int, default=512)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--samples", type=int, default=3_000_000)
    p.add_argument("--p", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = PlantedConfig(n_features=a.n_features, d_model=a.d_model, firing_probability=a.p,
                        train=TrainConfig(d_sae=a.n_features, sae_kwargs={"k": a.k}, lr=3e-3, batch_size=1024,
                                          training_samples=a.samples, normalize=False, dead_feature_window=50))
    res = run(cfg)
    out = res.values
    print(res)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
