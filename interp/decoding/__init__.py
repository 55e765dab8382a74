"""Decoding dynamics: generation with interventions (KV-cached, padded prompts), the replicator
view of softmax decoding, and the layer-wise trajectory of lens distributions."""

from interp.decoding.generate import GenerateConfig, Generation, generate, restrict, sample_from

__all__ = ["GenerateConfig", "Generation", "generate", "restrict", "sample_from"]
