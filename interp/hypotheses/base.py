"""Shared pieces of the hypothesis investigations: outcomes per example, baselines, verdicts.

Every investigation reports per-example outcomes (correct, log-prob of the answer, KL to the
unmodified run), aggregates them with bootstrap CIs over examples (`interp.stats`), compares
them with a baseline (a random-initialised model of the same shape, shuffled labels, or a
control) and states a one-sentence verdict only when the effect clears that baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.hooks import Intervention, intervene
from interp.models import new_model
from interp.stats import Estimate, bootstrap_many
from interp.tokens import Batch, check_model_tokens, check_tokens


@dataclass(frozen=True)
class Verdict:
    """A claim stated only when the evidence clears its baseline; otherwise why not."""

    supported: bool
    sentence: str

    def __str__(self) -> str:
        return self.sentence if self.supported else f"No verdict: {self.sentence}"


def random_like(model: HookedTransformer, seed: int = 0) -> HookedTransformer:
    """A random-initialised model of the same shape (the baseline that no effect should survive)."""
    return new_model(replace(model.cfg, seed=10_000 + seed))  # never the seed a model was trained with


@dataclass(frozen=True)
class Outcome:
    """Per-example outcomes of one run at the read-out position."""

    correct: Float[Tensor, "n"]
    logprob: Float[Tensor, "n"]
    kl: Float[Tensor, "n"]  # KL(reference || this run), nats; 0 for the reference itself

    @staticmethod
    def of(logits: Float[Tensor, "n d_vocab"], answer: Int[Tensor, "n"],
           reference: Float[Tensor, "n d_vocab"] | None = None) -> Outcome:
        lp = logits.float().log_softmax(-1)
        ans = answer.to(lp.device)
        correct = (lp.argmax(-1) == ans).double()
        logprob = lp.gather(-1, ans[:, None])[:, 0].double()
        if reference is None:
            kl = torch.zeros_like(logprob)
        else:
            lr = reference.float().log_softmax(-1)
            kl = (lr.exp() * (lr - lp)).sum(-1).double().clamp_min(0)
        return Outcome(correct.cpu(), logprob.cpu(), kl.cpu())


def readout(model: HookedTransformer, tokens: Int[Tensor, "n pos"], interventions: Sequence[Intervention] = (),
            pos: int = -1, batch_size: int = 256) -> Float[Tensor, "n d_vocab"]:
    """Logits at position `pos` of a forward with `interventions` (batched, hooks always removed).

    Interventions holding full-batch source tensors are sliced per batch by the caller; here the
    whole dataset is one batch when it fits `batch_size`.
    """
    tokens = check_model_tokens(model, tokens).to(model.cfg.device)
    if tokens.shape[0] > batch_size and interventions:
        raise ValueError(f"readout: expected at most {batch_size} examples with interventions, got "
                         f"{tokens.shape[0]}; split the dataset")
    outs = []
    with torch.inference_mode():
        for i in range(0, tokens.shape[0], batch_size):
            with intervene(model, interventions):
                outs.append(model(tokens[i: i + batch_size])[:, pos])
    return torch.cat(outs)


def curve_frame(values: Float[Tensor, "n m"], axis: Sequence[object], axis_name: str, **labels: object
                ) -> pd.DataFrame:
    """Mean and bootstrap CI of each column of per-example `values`, as tidy rows."""
    mean, low, high = bootstrap_many(values)
    rows = [{axis_name: a, "value": float(mean[i]), "ci_low": float(low[i]), "ci_high": float(high[i]), **labels}
            for i, a in enumerate(axis)]
    return pd.DataFrame(rows)


def estimate(values: Float[Tensor, "n"]) -> Estimate:
    mean, low, high = bootstrap_many(values[:, None])
    return Estimate(float(mean[0]), float(low[0]), float(high[0]))


def unpadded(tokens: object, d_vocab: int | None, name: str = "tokens", what: str = "this investigation",
             *, n_ctx: int | None = None) -> Tensor:
    """`tokens` as one-length prompts: a token tensor, or a `Batch` without padding.

    Investigations that read fixed positions cannot read each prompt's own position in a padded
    batch yet: they refuse it rather than read pads."""
    if isinstance(tokens, Batch):
        if int(tokens.lengths.min()) != tokens.tokens.shape[1]:
            raise ValueError(f"{name}: expected prompts of one length for {what} (it reads fixed positions), got a "
                             f"padded Batch with lengths {int(tokens.lengths.min())}..{int(tokens.lengths.max())}; "
                             f"group the prompts by length (last_token_sufficiency takes a padded Batch)")
        tokens = tokens.tokens
    return check_tokens(tokens, d_vocab, name=name, n_ctx=n_ctx)
