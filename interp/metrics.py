"""Metrics: one contract for every method — ``metric(logits, prompts) -> Tensor[batch]``.

A metric reads each prompt's logits at that prompt's own named positions and returns one value
per example, so every method keeps per-example values and can give bootstrap CIs. `logits` are
in the layout of `prompts` (the toolkit passes right-padded logits with ``prompts.right()``).

A `ReadMetric` also declares the positions it reads (``positions(prompts) -> [batch, k]``), so a
patching run normalises and unembeds only those rows (the unembedding is often the largest
matmul of a patched run).

Built-ins (all in nats or plain counts):
- `answer_logprob`: log p(answer) at ``last``; a multi-token answer sums its tokens' log-probs,
  teacher-forced (``Prompts`` appends the answer's tokens but the last);
- `logit_diff`: logit(answer) - logit(partner's answer), at ``last`` (first answer tokens);
- `rank`: how many tokens outscore the answer's first token (0 = top-1);
- `top1`: 1.0 when every answer token is the argmax of its teacher-forced position;
- `kl_to`: KL(reference || this run) of the next-token distribution at ``last``.

Precision: log-probabilities, logit differences and KLs are computed in at least float32 (bf16 and
fp16 logits are promoted to float32; float64 logits stay float64, `torch.promote_types`).

A TransformerLens-style metric ``logits -> scalar`` works through `from_scalar` (applied to each
example on its own; `as_metric` does this for any one-argument callable). Prefer logit
differences and log-probabilities over probabilities or accuracy (Zhang & Nanda 2024;
Heimersheim & Nanda 2024): they keep the sign of negative contributions.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.prompts import LAST, Prompts


@runtime_checkable
class Metric(Protocol):
    """logits [batch pos d_vocab] (in the prompts' layout) and the prompts -> one value per example."""

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"], prompts: Prompts) -> Float[Tensor, "batch"]: ...


def _at(name: str) -> Callable[[Prompts], Tensor]:
    def positions(prompts: Prompts) -> Tensor:
        return prompts.index(name)[:, None] + _shift(prompts)[:, None]

    return positions


def _shift(prompts: Prompts) -> Tensor:
    """From prompt coordinates to the prompts' own layout (non-zero under left padding)."""
    return prompts.shift() if prompts.side == "left" else torch.zeros(len(prompts), dtype=torch.long)


@dataclass(frozen=True)
class ReadMetric:
    """A metric that reads the logits at `positions(prompts)` only ([batch, k] indices in the
    prompts' layout); `fn(logits_at [batch, k, d_vocab], prompts) -> [batch]`."""

    name: str
    positions: Callable[[Prompts], Int[Tensor, "batch k"]]
    fn: Callable[[Tensor, Prompts], Tensor]

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"], prompts: Prompts) -> Float[Tensor, "batch"]:
        idx = self.positions(prompts).to(logits.device)
        if logits.ndim != 3 or logits.shape[0] != len(prompts):
            raise ValueError(f"metric {self.name}: expected logits of shape ({len(prompts)}, pos, d_vocab), "
                             f"got {tuple(logits.shape)}")
        if int(idx.max()) >= logits.shape[1]:
            raise ValueError(f"metric {self.name}: expected logits covering position {int(idx.max())}, got "
                             f"{logits.shape[1]} positions")
        at = logits.gather(1, idx[..., None].expand(-1, -1, logits.shape[-1]))
        return self.read(at, prompts)

    def read(self, logits_at: Float[Tensor, "batch k d_vocab"], prompts: Prompts) -> Float[Tensor, "batch"]:
        """The metric from the logits at `positions(prompts)` only (what the engine computes)."""
        return check_per_example(self.fn(logits_at, prompts), len(prompts), self.name)


def check_per_example(value: object, batch: int, what: str = "metric") -> Float[Tensor, "batch"]:
    """A metric's value as a [batch] float tensor; a clear error otherwise."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{what}: expected a [batch] tensor (one value per example), got {type(value).__name__}")
    if value.shape != (batch,):
        hint = ("; a TransformerLens-style metric (one number per batch) goes through interp.metrics.from_scalar"
                if value.numel() == 1 else "")
        raise ValueError(f"{what}: expected one value per example, shape ({batch},), got {tuple(value.shape)}{hint}")
    if value.is_complex() or not (value.dtype.is_floating_point or value.dtype in (torch.bool, torch.int32, torch.int64)):
        raise ValueError(f"{what}: expected real values, got dtype {value.dtype}")
    return value if value.dtype.is_floating_point else value.float()


# --------------------------------------------------------------------------------- built-ins

def _stat(x: Tensor, *others: Tensor) -> torch.dtype:
    """The dtype statistics are computed in: at least float32, float64 when any input is."""
    dt = torch.promote_types(x.dtype, torch.float32)
    for o in others:
        dt = torch.promote_types(dt, o.dtype)
    return dt


def _answers(prompts: Prompts, what: str) -> tuple[Tensor, Tensor]:
    if prompts.answers is None or prompts.answer_lengths is None:
        raise ValueError(f"{what}: expected prompts with answers, got none; build them with answers=...")
    return prompts.answers, prompts.answer_lengths


def _answer_positions(prompts: Prompts) -> Tensor:
    ans, alen = _answers(prompts, "answer_logprob")
    j = torch.arange(ans.shape[1])[None]
    last = prompts.index(LAST)[:, None]
    # beyond an answer's own length, read its last position again (masked out below)
    return torch.minimum(last + j, last + alen[:, None] - 1) + _shift(prompts)[:, None]


def _token_logprobs(logits_at: Tensor, prompts: Prompts) -> Tensor:
    ans, alen = _answers(prompts, "answer_logprob")
    lp = logits_at.to(_stat(logits_at)).log_softmax(-1)
    a = ans.to(lp.device).clamp_min(0)
    got = lp.gather(-1, a[..., None])[..., 0]  # [batch, k]
    keep = torch.arange(ans.shape[1], device=lp.device)[None] < alen.to(lp.device)[:, None]
    return torch.where(keep, got, torch.zeros_like(got))


def answer_logprob() -> ReadMetric:
    """log p(answer | prompt), nats; multi-token answers: the sum over their tokens, teacher-forced."""
    return ReadMetric("answer_logprob", _answer_positions, lambda at, p: _token_logprobs(at, p).sum(-1))


def top1() -> ReadMetric:
    """1.0 when each answer token is the argmax at its teacher-forced position, else 0.0."""

    def fn(at: Tensor, p: Prompts) -> Tensor:
        ans, alen = _answers(p, "top1")
        hit = at.argmax(-1) == ans.to(at.device).clamp_min(0)
        keep = torch.arange(ans.shape[1], device=at.device)[None] < alen.to(at.device)[:, None]
        return (hit | ~keep).all(-1).float()

    return ReadMetric("top1", _answer_positions, fn)


def rank(at: str = LAST) -> ReadMetric:
    """How many tokens have a larger logit than the answer's first token at `at` (0 = top-1)."""

    def fn(logits_at: Tensor, p: Prompts) -> Tensor:
        x = logits_at[:, 0]
        a = p.first_answer.to(x.device)
        mine = x.gather(-1, a[:, None])
        return (x > mine).sum(-1).float()

    return ReadMetric("rank", _at(at), fn)


def logit_diff(wrong: Int[Tensor, "batch"] | None = None, at: str = LAST) -> ReadMetric:
    """logit(answer) - logit(wrong) at `at`, first answer tokens; `wrong` defaults to each partner
    prompt's answer (the counterfactual answer)."""

    def fn(logits_at: Tensor, p: Prompts) -> Tensor:
        x = logits_at[:, 0]
        if wrong is None:
            if p.partner is None:
                raise ValueError("logit_diff: expected prompts with a partner (whose answer is the wrong one) or "
                                 "wrong=..., got neither")
            w = p.partner.first_answer
        else:
            w = torch.as_tensor(wrong).long().reshape(-1).expand(len(p))
        a, w = p.first_answer.to(x.device), w.to(x.device)
        if int(w.min()) < 0 or int(w.max()) >= x.shape[-1]:
            raise ValueError(f"logit_diff wrong: expected token ids in [0, {x.shape[-1]}), got [{int(w.min())}, {int(w.max())}]")
        x = x.to(_stat(x))
        return (x.gather(-1, a[:, None]) - x.gather(-1, w[:, None]))[:, 0]

    return ReadMetric("logit_diff", _at(at), fn)


def kl_to(reference: Float[Tensor, "batch d_vocab"], at: str = LAST) -> ReadMetric:
    """KL(reference || this run) of the next-token distribution at `at`, nats (reference: logits)."""
    ref = reference.detach()

    def fn(logits_at: Tensor, p: Prompts) -> Tensor:
        if ref.shape != (len(p), logits_at.shape[-1]):
            raise ValueError(f"kl_to reference: expected logits of shape ({len(p)}, {logits_at.shape[-1]}), "
                             f"got {tuple(ref.shape)}")
        dt = _stat(logits_at, ref)
        lq = logits_at[:, 0].to(dt).log_softmax(-1)
        lr = ref.to(lq.device, dt).log_softmax(-1)
        return (lr.exp() * (lr - lq)).sum(-1).clamp_min(0)

    return ReadMetric("kl", _at(at), fn)


# --------------------------------------------------------------------------- other callables

@dataclass(frozen=True)
class ScalarMetric:
    """A TransformerLens-style metric (logits of a batch -> one number), applied to each example
    alone: one value per example, whose mean is the batch metric when it averages over the batch."""

    fn: Callable[[Tensor], Tensor]

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"], prompts: Prompts) -> Float[Tensor, "batch"]:
        out = []
        lengths = prompts.lengths.tolist()
        width = logits.shape[1]
        for i in range(logits.shape[0]):
            # each example alone: its own positions only (a pad position's logits are never read)
            own = slice(0, lengths[i]) if prompts.side == "right" else slice(width - lengths[i], width)
            v = self.fn(logits[i: i + 1, own])
            if not isinstance(v, (Tensor, int, float, bool)):
                raise TypeError(f"scalar metric: expected a scalar tensor or number, got {type(v).__name__}")
            t = v if isinstance(v, Tensor) else torch.as_tensor(v)
            if t.numel() != 1:
                raise ValueError(f"scalar metric: expected one number per batch, got shape {tuple(t.shape)}")
            out.append(t.reshape(()).to(_stat(t) if t.dtype.is_floating_point else torch.float32))
        return torch.stack(out)


def from_scalar(fn: Callable[[Tensor], Tensor]) -> ScalarMetric:
    """Wrap a TransformerLens-style metric ``logits -> scalar`` into the per-example contract."""
    return ScalarMetric(fn)


def as_metric(metric: object) -> Metric:
    """Any accepted metric as the per-example contract: a `ReadMetric`/`ScalarMetric` as it is, a
    callable of (logits, prompts) as it is, a one-argument (TransformerLens-style) callable wrapped."""
    if isinstance(metric, (ReadMetric, ScalarMetric)):
        return metric
    if not callable(metric):
        raise TypeError(f"metric: expected a callable (logits, prompts) -> [batch], got {type(metric).__name__}")
    try:
        params = [p for p in inspect.signature(metric).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
        two = len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in inspect.signature(metric).parameters.values())
    except (TypeError, ValueError):
        two = False
    return metric if two else from_scalar(metric)  # type: ignore[return-value,arg-type]
