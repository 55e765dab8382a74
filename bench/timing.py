"""Shared by the benchmarks: a small GPT-2-shaped config and best-of-N wall-clock timing."""

from __future__ import annotations

import time
from collections.abc import Callable

from interp.tl import HookedTransformerConfig


def gpt2_shaped(n_ctx: int) -> HookedTransformerConfig:
    """6 layers, d_model 256, 8 heads, d_mlp 1024, 2000-token vocabulary."""
    return HookedTransformerConfig(n_layers=6, d_model=256, n_heads=8, d_head=32, d_mlp=1024, n_ctx=n_ctx,
                                   d_vocab=2000, act_fn="gelu_new", normalization_type="LN", seed=0)


def best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of `repeats` runs of `fn`, in seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
