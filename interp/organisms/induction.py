"""`induction`: a 2-layer attention-only transformer that learns induction heads.

Task (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"; Olsson et al.
2022, "In-context Learning and Induction Heads"): sequences of uniform random tokens in which a
span A of random length T (5-16) starting at a random position s is immediately repeated:
``<bos> ... A A ...``. Tokens in the second copy are predictable only by finding the earlier
occurrence of the current token and copying the token after it. The length and start vary per
example, because with a fixed period learned positions let a layer-0 head fake an induction score
through a position shortcut.

Outside the repeated span, with probability 0.3 a token follows a fixed skip-trigram rule
x_t = pi(x_{t-2}). This gives a layer-0 previous-token head a direct, first-order training signal,
so the induction circuit (which needs that head as its K-composition partner) forms within a few
minutes on a CPU instead of after a long plateau on in-context bag-of-tokens statistics. The
first half therefore has loss a little below ln(64); the repeated half far below it.

Known mechanism: a previous-token head in layer 0 writes "my previous token was x" at each
position; an induction head in layer 1 reads it through K-composition (the key at the source
position i - T + 1 carries the previous-token information) and copies the attended token through
its OV circuit.

Scores (as in /work/shared/METHODS.md): for query positions i in the second copy (excluding its
last token), induction score = mean attention from i to i - T + 1, previous-token score = mean
attention from i to i - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from interp.organisms.base import Criterion, masked_mean, token_loss
from interp.organisms.training import IGNORE, TrainConfig, TrainLog, fit, init_model, logits_in_batches
from interp.tokens import VocabTokenizer

NAME = "induction"
TASK = "next-token prediction on random tokens with one repeated span (random length 5-16, random start)"
MECHANISM = ("layer-0 previous-token head + layer-1 induction head via K-composition "
             "(attend to the token after the earlier occurrence, copy it)")
N_RANDOM = 64
SEQ_LEN = 48
MIN_REPEAT, MAX_REPEAT = 5, 16
BATCH = 64
DEFAULT_STEPS = 4000
SKIP_P = 0.3
SKIP_SEED = 99

ACCEPTANCE = (
    Criterion(metric="loss_ratio", op="<", threshold=0.25,
              what="repeated-half loss / first-half loss"),
    Criterion(metric="best_induction_score_layer1", op=">", threshold=0.5,
              what="best layer-1 induction score"),
    Criterion(metric="best_prev_token_score_layer0", op=">", threshold=0.5,
              what="best layer-0 previous-token score"),
)


def tokenizer() -> VocabTokenizer:
    """``<bos>`` (id 0) then ``t0`` ... ``t63`` (ids 1-64)."""
    return VocabTokenizer(("<bos>",) + tuple(f"t{i}" for i in range(N_RANDOM)))


BOS = 0


def config() -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=2, d_model=64, n_heads=4, d_head=16, n_ctx=SEQ_LEN, d_vocab=N_RANDOM + 1,
        attn_only=True, normalization_type="LN", positional_embedding_type="standard",
        act_fn=None, original_architecture="interp-organism-induction", seed=None,
        dtype=torch.float32, device="cpu")


@dataclass(frozen=True)
class InductionData:
    """Token sequences with one repeated span and its ground truth.

    `start[i]` is the first position of the first copy, `length[i]` the repeat length T, and
    `second[i] = start[i] + length[i]` the first position of the second copy.
    """

    tokens: Int[Tensor, "n pos"]
    start: Int[Tensor, "n"]
    length: Int[Tensor, "n"]

    @property
    def second(self) -> Int[Tensor, "n"]:
        return self.start + self.length

    def _span(self, lo: Tensor, hi: Tensor) -> Bool[Tensor, "n pos"]:
        ar = torch.arange(self.tokens.shape[1])
        return (ar[None] >= lo[:, None]) & (ar[None] < hi[:, None])

    @property
    def second_copy(self) -> Bool[Tensor, "n pos"]:
        """True at the positions of the second copy."""
        return self._span(self.second, self.second + self.length)

    @property
    def scored(self) -> Bool[Tensor, "n pos"]:
        """Query positions i of the second copy whose next token is predictable (all but the last):
        the positions over which induction and previous-token scores are averaged."""
        return self._span(self.second, self.second + self.length - 1)

    @property
    def first_scored(self) -> Bool[Tensor, "n pos"]:
        """The matching positions in the first copy (their next token is not yet predictable)."""
        return self._span(self.start, self.start + self.length - 1)


def skip_permutation() -> Int[Tensor, "d_vocab"]:
    """The fixed map of the skip-trigram rule (token id -> token id; `<bos>` -> `<bos>`)."""
    g = torch.Generator().manual_seed(SKIP_SEED)
    return torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(N_RANDOM, generator=g)])


def dataset(n: int, seed: int, skip_p: float | None = None) -> InductionData:
    """`n` sequences, deterministic in `seed` (`skip_p` defaults to SKIP_P)."""
    skip_p = SKIP_P if skip_p is None else skip_p
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, N_RANDOM + 1, (n, SEQ_LEN), generator=g)
    tokens[:, 0] = BOS
    length = torch.randint(MIN_REPEAT, MAX_REPEAT + 1, (n,), generator=g)
    # start uniform in [1, SEQ_LEN - 2T]
    start = 1 + (torch.rand(n, generator=g) * (SEQ_LEN - 2 * length)).long()
    use = torch.rand(n, SEQ_LEN, generator=g) < skip_p
    ar = torch.arange(SEQ_LEN)
    offset = ar[None] - start[:, None] - length[:, None]  # index into the first copy
    in_second = (offset >= 0) & (offset < length[:, None])
    in_span = in_second | ((ar[None] >= start[:, None]) & (ar[None] < (start + length)[:, None]))
    src = (start[:, None] + offset).clamp(0, SEQ_LEN - 1)
    tokens = torch.where(in_second, tokens.gather(1, src), tokens)
    if skip_p > 0:
        # outside the repeated span, a weak skip-trigram rule x_t = pi(x_{t-2}) (see module doc)
        pi = skip_permutation()
        apply = use & ~in_span
        for t in range(3, SEQ_LEN):
            tokens[:, t] = torch.where(apply[:, t], pi[tokens[:, t - 2]], tokens[:, t])
    return InductionData(tokens=tokens, start=start, length=length)


def _sampler(step: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    data = dataset(BATCH, int(torch.randint(0, 2**62, (1,), generator=g)))
    targets = torch.full_like(data.tokens, IGNORE)
    targets[:, :-1] = data.tokens[:, 1:]
    return data.tokens, targets


def train(steps: int = DEFAULT_STEPS, seed: int = 0, progress: bool = True,
          threads: int | None = 1) -> tuple[HookedTransformer, TrainLog]:
    """Train from scratch (AdamW 1e-3, batch 64, loss on every next token)."""
    model = init_model(config(), seed)
    tc = TrainConfig(steps=steps, lr=1e-3, warmup=100, seed=seed, threads=threads)
    log = fit(model, _sampler, tc, progress=progress, desc=NAME)
    return model, log


@torch.inference_mode()
def head_scores(model: HookedTransformer, data: InductionData
                ) -> tuple[Float[Tensor, "layer head"], Float[Tensor, "layer head"]]:
    """(induction, previous-token) score of every head, averaged over `data.scored` positions."""
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(data.tokens.to(model.cfg.device), names_filter=names)
    mask = data.scored  # [n, q]
    n_idx, q_idx = mask.nonzero(as_tuple=True)
    ind_k = q_idx - data.length[n_idx] + 1
    prev_k = q_idx - 1
    ind, prev = [], []
    for name in names:
        pat = cache[name].float().cpu()  # [n, head, q, k]
        ind.append(pat[n_idx, :, q_idx, ind_k].mean(0))
        prev.append(pat[n_idx, :, q_idx, prev_k].mean(0))
    return torch.stack(ind), torch.stack(prev)


@torch.inference_mode()
def evaluate(model: HookedTransformer, n: int = 512, seed: int = 1) -> dict[str, object]:
    """Losses on the first vs repeated copy and per-head induction / previous-token scores."""
    data = dataset(n, seed)
    loss = token_loss(logits_in_batches(model, data.tokens), data.tokens.to(model.cfg.device)).cpu()
    first = masked_mean(loss, data.first_scored)
    repeated = masked_mean(loss, data.scored)
    ind, prev = head_scores(model, data)
    return {
        "loss_first_half": first,
        "loss_repeated_half": repeated,
        "loss_ratio": repeated / first,
        "best_induction_score_layer1": float(ind[1].max()),
        "best_prev_token_score_layer0": float(prev[0].max()),
        "induction_head": [1, int(ind[1].argmax())],
        "prev_token_head": [0, int(prev[0].argmax())],
        "induction_scores": [[round(float(v), 4) for v in row] for row in ind],
        "prev_token_scores": [[round(float(v), 4) for v in row] for row in prev],
        "n_eval": n,
        "eval_seed": seed,
    }
