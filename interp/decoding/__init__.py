"""Decoding dynamics: generation with interventions (KV-cached, padded prompts), the replicator
view of softmax decoding, and the layer-wise trajectory of lens distributions (METHODS.md,
"Decoding dynamics")."""

from interp.decoding.forking import ForkingResult, forking_tokens, permutation_tv_test, tv_distance
from interp.decoding.generate import GenerateConfig, Generation, generate, restrict, sample_from
from interp.decoding.replicator import (
    euler_path,
    multiplicative_weights,
    replicator_field,
    replicator_path,
    time_of_temperature,
)
from interp.decoding.trajectory import TrajectoryResult, fit_beta, kl_tempered, trajectory

__all__ = ["ForkingResult", "GenerateConfig", "Generation", "TrajectoryResult", "euler_path", "fit_beta", "forking_tokens", "generate", "kl_tempered",
           "multiplicative_weights", "permutation_tv_test", "replicator_field", "replicator_path", "restrict", "sample_from",
           "time_of_temperature", "trajectory", "tv_distance"]
