"""Deprecated TransformerLens-era patching metrics, kept as thin wrappers over `interp.metrics`.

The one metric contract is `interp.metrics`: ``metric(logits, prompts) -> [batch]``, read at
each prompt's own named position (`answer_logprob`, `logit_diff`, `rank`, `top1`, `kl_to`;
`from_scalar` wraps any ``logits -> scalar`` metric). What is left here:

- `PositionMetric`: an `interp.metrics.ReadMetric` at fixed int positions (negative counts from
  each prompt's own end); called TransformerLens-style with logits alone, it returns the mean
  over the batch;
- `logit_diff(right, wrong, pos)` and `logprob(answer, pos)` with explicit token ids (an int or
  one per example): use `interp.metrics.logit_diff` / `answer_logprob` with `Prompts` answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.metrics import Metric, ReadMetric
from interp.prompts import Prompts

__all__ = ["Metric", "PositionMetric", "logit_diff", "logprob"]


def _fixed(at: tuple[int, ...]) -> Callable[[Prompts], Tensor]:
    """positions(prompts) for fixed ints: p >= 0 from each prompt's start, p < 0 from its end."""

    def positions(prompts: Prompts) -> Tensor:
        lengths = prompts.lengths.cpu()
        cols = []
        for p in at:
            idx = torch.full_like(lengths, p) + (lengths if p < 0 else 0)
            bad = (idx < 0) | (idx >= lengths)
            if bool(bad.any()):
                i = int(torch.nonzero(bad)[0, 0])
                raise ValueError(f"metric position {p}: expected a position inside every prompt, got prompt "
                                 f"{i} of length {int(lengths[i])}")
            cols.append(idx)
        idx = torch.stack(cols, dim=1)
        shift = prompts.shift().cpu() if prompts.side == "left" else torch.zeros_like(lengths)
        return idx + shift[:, None]

    return positions


@dataclass(frozen=True)
class PositionMetric(ReadMetric):
    """Deprecated (use `interp.metrics`): a `ReadMetric` at fixed int positions `at` (negative:
    from each prompt's end). ``metric(logits, prompts)`` gives one value per example;
    ``metric(logits)`` (TransformerLens style, prompts of one length) their mean."""

    at: tuple[int, ...] = (-1,)

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"], prompts: Prompts | None = None) -> Tensor:
        if prompts is None:
            lengths = torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long)
            prompts = Prompts(torch.zeros(logits.shape[:2], dtype=torch.long), lengths)
            return super().__call__(logits, prompts).mean()
        return super().__call__(logits, prompts)


def position_metric(name: str, fn: Callable[[Tensor, Prompts], Tensor], at: Sequence[int]) -> PositionMetric:
    at = tuple(at)
    if not at or not all(isinstance(p, int) and not isinstance(p, bool) for p in at):
        raise ValueError(f"PositionMetric positions: expected a non-empty tuple of ints, got {at!r}")
    return PositionMetric(name, _fixed(at), fn, at)


def _wide(x: Tensor) -> Tensor:
    """At least float32 (bf16/fp16 logits are widened; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


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
    """Deprecated (use `interp.metrics.logit_diff`): logit[right] - logit[wrong] at position `pos`
    of each prompt (nats), one value per example."""
    r, w = _as_index(right, "logit_diff right"), _as_index(wrong, "logit_diff wrong")

    def fn(logits_at: Tensor, prompts: Prompts) -> Tensor:
        x = logits_at[:, 0]
        idx = torch.arange(x.shape[0], device=x.device)
        rr, ww = _rows(r, x, "logit_diff right"), _rows(w, x, "logit_diff wrong")
        return _wide(x[idx, rr] - x[idx, ww])

    return position_metric("logit_diff", fn, (pos,))


def logprob(answer: Int[Tensor, "batch"] | int, pos: int = -1) -> PositionMetric:
    """Deprecated (use `interp.metrics.answer_logprob`): log p(answer) at position `pos` of each
    prompt (nats), one value per example."""
    t = _as_index(answer, "logprob answer")

    def fn(logits_at: Tensor, prompts: Prompts) -> Tensor:
        lp = _wide(logits_at[:, 0]).log_softmax(-1)
        idx = torch.arange(lp.shape[0], device=lp.device)
        return lp[idx, _rows(t, lp, "logprob answer")]

    return position_metric("logprob", fn, (pos,))
