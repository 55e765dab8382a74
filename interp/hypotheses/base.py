"""Shared pieces of the hypothesis investigations: outcomes per example, per-example edits,
baselines, verdicts.

Every investigation takes `interp.prompts.Prompts` (padded left or right, prompts of any
lengths, named positions per prompt, answers of one or several tokens) and computes on the
right-padded layout, where a causal model's every real position sees exactly what it sees when
its prompt runs alone (positions count from the prompt's first token; the pads come after).
Edits that name a position per example (patch the partner's ``p'_i`` into prompt ``i``'s
``p_i``, block prompt ``i``'s read-out span from keys ``k_i``) are the patching engine's
(`interp.patching`: `sweep`, `patch`, `kv_patch`, `knockout`, `path_patch_many` at span names);
plain forwards go through the one hook path (`interp.hooks.intervene`).

Every investigation reports per-example outcomes (top-1 correct, log-prob of the answer, KL to
the unmodified run), aggregates them with bootstrap CIs over examples (`interp.stats`), compares
them with a baseline (a random-initialised model of the same shape, shuffled labels, or a
control) and states a one-sentence verdict only when the effect clears that baseline.

Which model baseline, and when it is built, is one policy for every investigation
(`interp.baseline`): ``baseline=`` a model, "random", "none" or "auto" (the default: the random
baseline only for a model of at most `interp.baseline.AUTO_MAX_BYTES`, otherwise none, said in
the result's `baseline_note` and verdict). A random baseline is built after the main measurement,
only for the statistic that needs it, and released right after.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.arch import Arch, Model, device_of
from interp.baseline import Baseline as Baseline
from interp.baseline import baseline_for as baseline_for
from interp.baseline import random_like as random_like
from interp.baseline import unbaselined as unbaselined
from interp.hooks import Intervention, intervene
from interp.metrics import answer_logprob, top1
from interp.prompts import LAST, Prompts, as_prompts
from interp.stats import Estimate, bootstrap_many
from interp.tokens import Batch, check_tokens


@dataclass(frozen=True)
class Verdict:
    """A claim stated only when the evidence clears its baseline; otherwise why not."""

    supported: bool
    sentence: str

    def __str__(self) -> str:
        return self.sentence if self.supported else f"No verdict: {self.sentence}"


@dataclass(frozen=True)
class Outcome:
    """Per-example outcomes of one run: top-1 correct (every answer token, teacher-forced),
    log p(answer) (nats; summed over a multi-token answer's tokens) and KL(reference || run) of
    the next-token distribution at the read-out position (0 without a reference)."""

    correct: Float[Tensor, "n"]
    logprob: Float[Tensor, "n"]
    kl: Float[Tensor, "n"]

    @staticmethod
    def of(logits: Float[Tensor, "n d_vocab"], answer: Int[Tensor, "n"],
           reference: Float[Tensor, "n d_vocab"] | None = None) -> Outcome:
        """From the logits at one read-out position and single-token answers."""
        lp = logits.float().log_softmax(-1)
        ans = answer.to(lp.device)
        correct = (lp.argmax(-1) == ans).double()
        logprob = lp.gather(-1, ans[:, None])[:, 0].double()
        return Outcome(correct.cpu(), logprob.cpu(), _kl(lp, reference))

    @staticmethod
    def cat(parts: Sequence[Outcome]) -> Outcome:
        return Outcome(*(torch.cat([getattr(o, f) for o in parts]) for f in ("correct", "logprob", "kl")))


def _kl(lp: Tensor, reference: Tensor | None) -> Tensor:
    if reference is None:
        return torch.zeros(lp.shape[0], dtype=torch.float64)
    lr = reference.to(lp.device).float().log_softmax(-1)
    return (lr.exp() * (lr - lp)).sum(-1).double().clamp_min(0).cpu()


# ------------------------------------------------------------------------------------- running

def prompts_of(data: Prompts | Batch | Tensor, model: Model, name: str = "prompts") -> Prompts:
    """Validated prompts (a tensor or Batch converted), right-padded, tokens checked against the model."""
    p = as_prompts(data, name)
    arch = Arch.of(model)
    check_tokens(p.tokens, arch.d_vocab, name=name, n_ctx=arch.n_ctx)
    if p.partner is not None:
        check_tokens(p.partner.tokens, arch.d_vocab, name=f"{name}.partner", n_ctx=arch.n_ctx)
    return p.right()


def chunks(n: int, batch_size: int) -> Iterator[Tensor]:
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size}")
    for lo in range(0, n, batch_size):
        yield torch.arange(lo, min(n, lo + batch_size))


def positions_of(prompts: Prompts, at: str | int, what: str = "position") -> Float[Tensor, "batch"]:
    """Each prompt's index of a named position (its last token), or an int in prompt coordinates
    (negative: from each prompt's end); NaN where a prompt has no such position."""
    if isinstance(at, str):
        return prompts.index(at).double()
    if isinstance(at, bool) or not isinstance(at, int):
        raise TypeError(f"{what}: expected a span name or an int, got {at!r}")
    lengths = prompts.prompt_lengths.double()
    p = lengths + at if at < 0 else torch.full_like(lengths, float(at))
    return torch.where((p >= 0) & (p < lengths), p, torch.full_like(p, float("nan")))


def forward(model: Model, prompts: Prompts, interventions: Sequence[Intervention] = ()
            ) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits of right-padded `prompts` with `interventions` (hooks removed on exit)."""
    with torch.inference_mode(), intervene(model, interventions):
        return model(prompts.right().tokens.to(device_of(model)))


def outcome(logits: Float[Tensor, "batch pos d_vocab"], prompts: Prompts, at: str = LAST,
            reference: Float[Tensor, "batch d_vocab"] | None = None) -> Outcome:
    """Per-example outcome of right-padded logits: top-1 correct and log p(answer) (teacher-forced
    for multi-token answers), KL to `reference` at `at`."""
    p = prompts.right()
    rows = torch.arange(len(p), device=logits.device)
    at_logits = logits[rows, p.index(at).to(logits.device)]
    lp = answer_logprob()(logits, p).double().cpu()
    correct = top1()(logits, p).double().cpu()
    return Outcome(correct, lp, _kl(at_logits.float().log_softmax(-1), reference))


def last_logits(logits: Tensor, prompts: Prompts, at: str = LAST) -> Tensor:
    p = prompts.right()
    return logits[torch.arange(len(p), device=logits.device), p.index(at).to(logits.device)].detach().cpu()


def run_outcomes(model: Model, prompts: Prompts,
                 edits: Callable[[Prompts, Tensor], Sequence[Intervention]] | None = None, *,
                 at: str = LAST, reference: Tensor | None = None, batch_size: int = 256) -> Outcome:
    """`outcome` of `prompts` run in chunks, each with the interventions `edits(chunk, rows)` builds
    for it (chunk: the selected prompts, right-padded to their widest)."""
    parts = []
    for rows in chunks(len(prompts), batch_size):
        sub = prompts.select(rows).right()
        logits = forward(model, sub, edits(sub, rows) if edits is not None else ())
        parts.append(outcome(logits, sub, at, None if reference is None else reference[rows]))
    return Outcome.cat(parts)


# ------------------------------------------------------------------------------------ statistics

def curve_frame(values: Float[Tensor, "n m"], axis: Sequence[object], axis_name: str, **labels: object
                ) -> pd.DataFrame:
    """Mean and bootstrap CI of each column of per-example `values` (NaN cells left out of that
    column's mean, CI and `n`), as tidy rows."""
    rows = []
    for i, a in enumerate(axis):
        e, n = estimate_n(values[:, i])
        rows.append({axis_name: a, "value": e.value, "ci_low": e.low, "ci_high": e.high, "n": n, **labels})
    return pd.DataFrame(rows)


def estimate_n(values: Float[Tensor, "n"], *, alpha: float = 0.05, n_boot: int = 1000) -> tuple[Estimate, int]:
    """Mean and percentile-bootstrap CI over the finite values, and how many there are."""
    v = torch.as_tensor(values).detach().double().cpu().reshape(-1)
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return Estimate(float("nan"), float("nan"), float("nan")), 0
    if v.numel() == 1:
        return Estimate(float(v[0]), float(v[0]), float(v[0])), 1
    mean, low, high = bootstrap_many(v[:, None], alpha=alpha, n_boot=n_boot)
    return Estimate(float(mean[0]), float(low[0]), float(high[0])), int(v.numel())


def estimate(values: Float[Tensor, "n"], *, alpha: float = 0.05, n_boot: int = 1000) -> Estimate:
    return estimate_n(values, alpha=alpha, n_boot=n_boot)[0]
