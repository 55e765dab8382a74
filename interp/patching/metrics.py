"""Patching metrics: functions of logits that return one number for a batch.

The TransformerLens convention (`transformer_lens.patching`): a metric maps the logits of one
batch, [batch pos d_vocab], to a scalar. Any such callable works everywhere in
`interp.patching`. A `PositionMetric` additionally declares which positions it reads, so the
engine unembeds only those positions (the unembedding is often the largest matmul of a patched
run); its `__call__` still takes full logits, so it is a plain TransformerLens metric too.

Prefer logit differences and log-probabilities over probabilities or accuracy (Zhang & Nanda
2024; Heimersheim & Nanda 2024): they keep the sign of negative contributions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor


@runtime_checkable
class Metric(Protocol):
    """logits [batch pos d_vocab] -> a scalar tensor (one number for the whole batch)."""

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Tensor: ...


@dataclass(frozen=True)
class PositionMetric:
    """A metric that reads only the logits at `positions` (ints, negative counts from the end).

    `fn` receives the logits at those positions, in order: [batch len(positions) d_vocab].
    """

    fn: Callable[[Tensor], Tensor]
    positions: tuple[int, ...] = (-1,)

    def __post_init__(self) -> None:
        pos = tuple(self.positions)
        if not pos or not all(isinstance(p, int) and not isinstance(p, bool) for p in pos):
            raise ValueError(f"PositionMetric.positions: expected a non-empty tuple of ints, got {self.positions!r}")
        object.__setattr__(self, "positions", pos)

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Tensor:
        return self.fn(logits[:, list(self.positions)])

    def read(self, logits_at: Float[Tensor, "batch k d_vocab"]) -> Tensor:
        """The metric from the logits at `positions` only (what the engine computes)."""
        return self.fn(logits_at)


def _as_index(x: Tensor | Sequence[int] | int, name: str) -> Tensor:
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name}: expected an int or a [batch] integer tensor, got {type(x).__name__}") from e
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.ndim > 1:
        raise ValueError(f"{name}: expected an int or a [batch] integer tensor, got {t.dtype} of shape {tuple(t.shape)}")
    return t.long()


def _rows(ids: Tensor, logits: Tensor, name: str) -> Tensor:
    """`ids` (a scalar or one per example) checked against the batch and vocabulary of `logits`."""
    b, d_vocab = logits.shape[0], logits.shape[-1]
    if ids.ndim == 1 and ids.shape[0] not in (1, b):
        raise ValueError(f"{name}: expected one token id per example ({b}) or a single id, got {ids.shape[0]}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= d_vocab):
        raise ValueError(f"{name}: expected token ids in [0, {d_vocab}), got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    return ids.to(logits.device).expand(b)


def logit_diff(right: Int[Tensor, "batch"] | int, wrong: Int[Tensor, "batch"] | int,
               pos: int = -1) -> PositionMetric:
    """Mean over the batch of logit[right] - logit[wrong] at position `pos` (in logits, nats)."""
    r, w = _as_index(right, "logit_diff right"), _as_index(wrong, "logit_diff wrong")

    def fn(logits: Tensor) -> Tensor:
        last = logits[:, 0]
        idx = torch.arange(last.shape[0], device=last.device)
        rr, ww = _rows(r, last, "logit_diff right"), _rows(w, last, "logit_diff wrong")
        return (last[idx, rr] - last[idx, ww]).mean()

    return PositionMetric(fn, (pos,))


def logprob(target: Int[Tensor, "batch"] | int, pos: int = -1) -> PositionMetric:
    """Mean over the batch of log p(target) at position `pos` (nats)."""
    t = _as_index(target, "logprob target")

    def fn(logits: Tensor) -> Tensor:
        lp = logits[:, 0].float().log_softmax(-1)
        idx = torch.arange(lp.shape[0], device=lp.device)
        return lp[idx, _rows(t, lp, "logprob target")].mean().to(logits.dtype)

    return PositionMetric(fn, (pos,))


def metric_positions(metric: Metric, seq_len: int) -> list[int] | None:
    """The (non-negative) positions a metric reads, or None when it reads the full logits."""
    pos = getattr(metric, "positions", None)
    if pos is None or not callable(getattr(metric, "read", None)):
        return None
    out = []
    for p in pos:
        if not -seq_len <= p < seq_len:
            raise ValueError(f"metric position: expected in [-{seq_len}, {seq_len}), got {p}")
        out.append(p % seq_len)
    return out


def check_scalar(value: object, what: str = "metric") -> Tensor:
    """The metric's value as a 0-d tensor; a clear error when it is not one number."""
    try:
        t = value if isinstance(value, Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{what}: expected a scalar tensor or number, got {type(value).__name__}") from e
    if t.numel() != 1:
        raise ValueError(
            f"{what}: expected a scalar (one number for the whole batch, the TransformerLens "
            f"convention), got a tensor of shape {tuple(t.shape)}; reduce over the batch, e.g. "
            f"return per_example.mean()"
        )
    if not (t.dtype.is_floating_point or t.dtype in (torch.int32, torch.int64, torch.bool)):
        raise ValueError(f"{what}: expected a real number, got dtype {t.dtype}")
    return t.reshape(())


def evaluate(metric: Metric, logits_at: Tensor, positions: list[int] | None) -> Tensor:
    """Apply `metric` to logits that cover `positions` only (or the full logits when None)."""
    if positions is None:
        return check_scalar(metric(logits_at))
    return check_scalar(metric.read(logits_at))  # type: ignore[attr-defined]
