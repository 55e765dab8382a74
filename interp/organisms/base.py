"""What every organism shares: acceptance criteria and the per-example scoring helpers.

An organism module provides `config()`, `tokenizer()`, `dataset(n, seed)`, `train(steps, seed,
progress)`, `evaluate(model, n, seed)` and `ACCEPTANCE` (a tuple of `Criterion`); `check` turns
measured metrics into a pass/fail table that goes into the checkpoint's manifest.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


@dataclass(frozen=True, kw_only=True)
class Criterion:
    """One acceptance threshold: ``metrics[metric] <op> threshold``."""

    metric: str
    op: Literal[">", ">=", "<", "<="]
    threshold: float
    what: str

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"Criterion.op: expected one of {sorted(_OPS)}, got {self.op!r}")

    def passed(self, metrics: dict[str, Any]) -> bool:
        if self.metric not in metrics:
            raise KeyError(f"acceptance metric {self.metric!r}: expected it among the evaluated "
                           f"metrics, got {sorted(metrics)}")
        return bool(_OPS[self.op](float(metrics[self.metric]), self.threshold))


def check(criteria: tuple[Criterion, ...], metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per criterion: measured value, threshold, and whether it passed (JSON-safe)."""
    return {c.metric: {"value": float(metrics[c.metric]), "op": c.op, "threshold": c.threshold,
                       "what": c.what, "passed": c.passed(metrics)} for c in criteria}


def failures(criteria: tuple[Criterion, ...], metrics: dict[str, Any]) -> list[str]:
    """Human-readable descriptions of the criteria that failed (empty when all pass)."""
    return [f"{c.what}: expected {c.metric} {c.op} {c.threshold}, got {float(metrics[c.metric]):.4f}"
            for c in criteria if not c.passed(metrics)]


def token_loss(logits: Float[Tensor, "n pos d_vocab"], tokens: Int[Tensor, "n pos"]
               ) -> Float[Tensor, "n pos"]:
    """Next-token cross-entropy (nats) at each position; the last position gets NaN (no target)."""
    logp = logits.float().log_softmax(-1)
    out = torch.full(tokens.shape, float("nan"), device=logits.device)
    out[:, :-1] = -logp[:, :-1].gather(-1, tokens[:, 1:, None].to(logits.device))[..., 0]
    return out


def masked_mean(values: Float[Tensor, "n pos"], mask: Bool[Tensor, "n pos"]) -> float:
    if not bool(mask.any()):
        raise ValueError("masked_mean: expected at least one selected position, got an empty mask")
    return float(values.detach()[mask.to(values.device)].mean())
