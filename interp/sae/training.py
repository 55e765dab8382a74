"""Train sparse autoencoders with sae-lens on a model's activations at one hook.

The SAE architectures and the training loop are sae-lens's own (`SAETrainer`, the registry of
training SAE classes: topk, batchtopk, standard, jumprelu, ...). This module only feeds the trainer
an iterator of activation batches (from a model run over tokens, or from a toolkit store), picks
CPU-sized defaults, and returns the *inference* SAE (norm scaling and decoder norms folded in by
sae-lens's own `save_inference_model`), with the hook and model recorded in its metadata: the
model's name and, when trained from a model, its weight fingerprint (``model_weights``, see
`interp.sae.checks`), which every later use of the SAE with a model is checked against.

TopK SAEs (Gao et al. 2024, "Scaling and evaluating sparse autoencoders") are the default: L0 is
set directly by k, so no sparsity coefficient has to be tuned per model.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY, get_sae_training_class
from sae_lens.saes.sae import SAEMetadata, TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer
from torch import Tensor

from interp.configs import from_dict
from interp.graph import Node
from interp.models import weights_fingerprint
from interp.sae.data import ActivationBatches, ChunkSource, collect_activations, hook_name_of, source_of
from interp.tl import HookedTransformer
from interp.tokens import Batch

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train one SAE.

    `sae_kwargs` go to the sae-lens training config of `architecture` (e.g. ``{"k": 8}`` for
    topk, ``{"l1_coefficient": 5.0}`` for standard); unknown keys are rejected.
    `normalize` scales activations to mean norm sqrt(d_in) while training (sae-lens's
    "expected_average_only_in"); the factor is folded back into the weights at the end.
    """

    architecture: str = "topk"
    d_sae: int = 512
    sae_kwargs: dict[str, Any] = field(default_factory=lambda: {"k": 8})
    lr: float = 3e-3
    lr_warm_up_steps: int = 0
    lr_decay_steps: int = 0
    batch_size: int = 1024
    training_samples: int = 1_000_000
    normalize: bool = True
    dead_feature_window: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in SAE_TRAINING_CLASS_REGISTRY:
            raise ValueError(f"TrainConfig.architecture: expected one of "
                             f"{sorted(SAE_TRAINING_CLASS_REGISTRY)}, got {self.architecture!r}")
        cfg_cls = get_sae_training_class(self.architecture)[1]
        valid = {f.name for f in dataclasses.fields(cfg_cls)} - {"d_in", "d_sae", "dtype", "device", "metadata"}
        unknown = sorted(set(self.sae_kwargs) - valid)
        if unknown:
            raise ValueError(f"TrainConfig.sae_kwargs: expected fields of {cfg_cls.__name__} "
                             f"({sorted(valid)}), got unknown keys {unknown}")
        for name in ("d_sae", "batch_size", "training_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}: expected >= 1, got {getattr(self, name)}")
        if self.training_samples < self.batch_size:
            raise ValueError(f"TrainConfig.training_samples: expected >= batch_size ({self.batch_size}), "
                             f"got {self.training_samples}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr: expected > 0, got {self.lr}")

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. YAML), rejecting unknown keys."""
        return from_dict(TrainConfig, d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainResult:
    """A trained (inference) SAE with the facts of its training run.

    `final_losses`: the training losses of the final SAE on one further (unnormalised) batch.
    """

    sae: SAE
    config: TrainConfig
    hook_name: str | None
    seconds: float
    steps: int
    final_losses: dict[str, float]


def train(
    model: HookedTransformer | None,
    data: Tensor | Batch | Any,
    hook: str | Node | None = None,
    config: TrainConfig | None = None,
    *,
    positions: str | list[int] | Tensor = "all",
    model_batch_size: int = 64,
    model_name: str | None = None,
) -> TrainResult:
    """Train an SAE (sae-lens `SAETrainer`) on activations at `hook`.

    With a `model`, `data` is a token tensor or `Batch`; the activations at `hook` (at the
    selected real `positions`) are cached once with `interp.cache.collect` and reshuffled every
    epoch. Without a model, `data` is an activation source: a [n, d_in] tensor, a list of
    tensors, or a toolkit cache/store (streamed through its ``iter_batches(hook, ...)``).
    The SAE follows the model's (or the activations') device and dtype.
    """
    config = config or TrainConfig()
    if model is not None:
        if hook is None:
            raise ValueError("train: expected a hook to read when a model is given, got None")
        name: str | None = hook_name_of(model, hook)
        acts = collect_activations(model, data, name, positions=positions, batch_size=model_batch_size)
        chunk_source: ChunkSource = source_of(acts, batch_size=config.batch_size)
        device, dtype = model.cfg.device, model.cfg.dtype
        model_name = model_name or model.cfg.model_name
        model_weights: str | None = weights_fingerprint(model)
    else:
        name = hook.hook_name if isinstance(hook, Node) else hook
        chunk_source = source_of(data, hook=name, batch_size=config.batch_size)
        device, dtype = None, None
        model_weights = None
    batches = ActivationBatches(chunk_source, config.batch_size, seed=config.seed)
    first = next(batches)
    d_in = int(first.shape[-1])
    device = device or first.device
    dtype = dtype or first.dtype
    return train_on_batches(_prepend(first, batches), d_in, config, hook_name=name, model_name=model_name,
                            model_weights=model_weights, device=device, dtype=dtype)


def _prepend(first: Tensor, rest: Iterator[Tensor]) -> Iterator[Tensor]:
    yield first
    yield from rest


def train_on_batches(
    batches: Iterator[Tensor],
    d_in: int,
    config: TrainConfig,
    *,
    hook_name: str | None = None,
    model_name: str | None = None,
    model_weights: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TrainResult:
    """Train an SAE with sae-lens's `SAETrainer` on an iterator of [batch_size, d_in] batches.

    `model_weights` (`interp.models.weights_fingerprint` of the model the batches come from) is
    recorded in the SAE's metadata, so using the SAE with another model raises."""
    sae_cls, cfg_cls = get_sae_training_class(config.architecture)
    metadata = SAEMetadata(hook_name=hook_name, model_name=model_name)
    if model_weights is not None:
        metadata.model_weights = model_weights
    sae_cfg = cfg_cls(
        d_in=d_in,
        d_sae=config.d_sae,
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        normalize_activations="expected_average_only_in" if config.normalize else "none",
        metadata=metadata,
        **config.sae_kwargs,
    )
    trainer_cfg = SAETrainerConfig(
        total_training_samples=config.training_samples,
        train_batch_size_samples=config.batch_size,
        lr=config.lr,
        lr_end=config.lr / 10 if config.lr_decay_steps else config.lr,
        lr_warm_up_steps=config.lr_warm_up_steps,
        lr_decay_steps=config.lr_decay_steps,
        device=str(device),
        dead_feature_window=config.dead_feature_window,
        feature_sampling_window=max(1, config.training_samples // config.batch_size),
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=min(20, max(1, config.training_samples // config.batch_size)),
    )
    start = time.perf_counter()
    dev = torch.device(device)
    # a private RNG stream: weight init is seeded without touching the caller's global RNG
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [], device_type=dev.type):
        torch.manual_seed(config.seed)
        sae: TrainingSAE = sae_cls(sae_cfg)
        trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches)
        steps = trainer_cfg.total_training_steps
        trainer.fit()
        with torch.no_grad():
            out = trainer.sae.training_forward_pass(_step_input(trainer, next(batches)))
        last = {k: float(v) for k, v in out.losses.items()}
    seconds = time.perf_counter() - start
    inference = to_inference(trainer.sae)
    log.info("trained %s SAE d_sae=%d on %s in %.1f s (%d steps)", config.architecture, config.d_sae,
             hook_name, seconds, steps)
    return TrainResult(inference, config, hook_name, seconds, steps, last)


def _step_input(trainer: SAETrainer, batch: Tensor) -> Any:
    from sae_lens.saes.sae import TrainStepInput

    return TrainStepInput(sae_in=batch.to(trainer.sae.device), coefficients=trainer.get_coefficients(),
                          dead_neuron_mask=None, n_training_steps=trainer.n_training_steps,
                          is_logging_step=False)


def to_inference(sae: TrainingSAE) -> SAE:
    """The inference SAE of a training SAE, via sae-lens's own save/load (norms folded in)."""
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        out = SAE.load_from_disk(tmp, device=str(sae.device))
    return out.eval()
