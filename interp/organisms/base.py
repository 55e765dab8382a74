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


@dataclass(frozen=True)
class CircuitPrompts:
    """Clean / corrupted prompts of one fixed layout, for circuit discovery and its ground truth.

    `corrupt` differs from `clean` only where the organism's task input is replaced (symmetric
    token replacement, same length). The metric is the mean log-probability (nats) of
    `answer[:, j]` at position `answer_pos[j]` of the clean run's answers. `roles` names the
    positions the declared circuit refers to (e.g. ``{"A": 9, "B": 10, "last": 17}``);
    `candidates` are the positions whose attention edges and head outputs are scored.
    """

    clean: Int[Tensor, "n pos"]
    corrupt: Int[Tensor, "n pos"]
    answer: Int[Tensor, "n k"]
    answer_pos: tuple[int, ...]
    roles: dict[str, int]
    candidates: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.clean.shape != self.corrupt.shape:
            raise ValueError(f"CircuitPrompts.corrupt: expected the clean shape {tuple(self.clean.shape)}, "
                             f"got {tuple(self.corrupt.shape)}")
        if self.answer.shape != (self.clean.shape[0], len(self.answer_pos)):
            raise ValueError(f"CircuitPrompts.answer: expected shape {(self.clean.shape[0], len(self.answer_pos))}, "
                             f"got {tuple(self.answer.shape)}")
        n = self.clean.shape[1]
        bad = [p for p in (*self.candidates, *self.roles.values(), *self.answer_pos) if not 0 <= p < n]
        if bad:
            raise ValueError(f"CircuitPrompts positions: expected values in [0, {n}), got {bad}")

    def rows(self, index: Int[Tensor, "m"]) -> CircuitPrompts:
        """The prompts at `index` (e.g. a bootstrap resample)."""
        return CircuitPrompts(clean=self.clean[index], corrupt=self.corrupt[index], answer=self.answer[index],
                              answer_pos=self.answer_pos, roles=self.roles, candidates=self.candidates)

    def position(self, role: str) -> int:
        if role not in self.roles:
            raise KeyError(f"position role {role!r}: expected one of {sorted(self.roles)}")
        return self.roles[role]

    def role_of(self, pos: int) -> str:
        """The role name of a position, or ``"p{pos}"`` when it has none."""
        return next((r for r, p in self.roles.items() if p == pos), f"p{pos}")
