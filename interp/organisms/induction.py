"""`induction`: a 2-layer attention-only transformer that learns induction heads.

Task (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"; Olsson et al.
2022, "In-context Learning and Induction Heads"): sequences of uniform random tokens in which a
span A of random length T (5-16) starting at a random position s is immediately repeated:
``<bos> ... A A ...``. Tokens in the second copy are predictable only by finding the earlier
occurrence of the current token and copying the token after it. The length and start vary per
example, because with a fixed period learned positions let a layer-0 head fake an induction score
through a position shortcut.

Training seeds the textbook circuit (as InterpBench, Gupta et al. 2024, trains models to
implement a known circuit): for the first SEED_STEPS steps an auxiliary loss asks head 0.0 to
attend to the previous token and head 1.0 to attend to i - T + 1 in the second copy; the rest of
training uses the language-modelling loss alone, and the scores in the manifest are measured
after it. Without the seed, a from-scratch run on a shared CPU sits for thousands of steps on
in-context bag-of-tokens statistics, or finds a non-canonical variant (matching the previous
token against a "3 back" head and attending to i - T + 2), which would make a poor ground truth.
The seed only sets where two heads look; finding i - T + 1 still needs K-composition with the
previous-token head, since the position is random.

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
from interp.organisms.training import (
    IGNORE,
    TrainConfig,
    TrainLog,
    attention_logprobs,
    fit,
    init_model,
    logits_in_batches,
)
from interp.tokens import VocabTokenizer

NAME = "induction"
TASK = "next-token prediction on random tokens with one repeated span (random length 5-16, random start)"
MECHANISM = ("previous-token head 0.0 + induction head 1.0 via K-composition (attend to the token "
             "after the earlier occurrence, copy it); circuit seeded for the first 600 of 2000 steps")
N_RANDOM = 64
SEQ_LEN = 48
MIN_REPEAT, MAX_REPEAT = 5, 16
BATCH = 64
DEFAULT_STEPS = 2000
SEED_STEPS = 600
SEED_HEADS = ((0, 0), (1, 0))  # (layer, head): previous-token head, induction head

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


def dataset(n: int, seed: int) -> InductionData:
    """`n` sequences, deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, N_RANDOM + 1, (n, SEQ_LEN), generator=g)
    tokens[:, 0] = BOS
    length = torch.randint(MIN_REPEAT, MAX_REPEAT + 1, (n,), generator=g)
    # start uniform in [1, SEQ_LEN - 2T]
    start = 1 + (torch.rand(n, generator=g) * (SEQ_LEN - 2 * length)).long()
    ar = torch.arange(SEQ_LEN)
    offset = ar[None] - start[:, None] - length[:, None]  # index into the first copy
    in_second = (offset >= 0) & (offset < length[:, None])
    src = (start[:, None] + offset).clamp(0, SEQ_LEN - 1)
    tokens = torch.where(in_second, tokens.gather(1, src), tokens)
    return InductionData(tokens=tokens, start=start, length=length)


def train(steps: int = DEFAULT_STEPS, seed: int = 0, progress: bool = True,
          threads: int | None = 1) -> tuple[HookedTransformer, TrainLog]:
    """Train from scratch (AdamW 1e-3, batch 64, loss on every next token; circuit seeded for
    the first SEED_STEPS steps, see the module docstring)."""
    model = init_model(config(), seed)
    batch: dict[str, InductionData] = {}

    def sample(step: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        data = dataset(BATCH, int(torch.randint(0, 2**62, (1,), generator=g)))
        batch["data"] = data
        targets = torch.full_like(data.tokens, IGNORE)
        targets[:, :-1] = data.tokens[:, 1:]
        return data.tokens, targets

    def seed_circuit(m: HookedTransformer, tokens: Tensor, step: int) -> Tensor:
        if step >= SEED_STEPS:
            return torch.zeros((), device=tokens.device)
        data = batch["data"]
        logp = attention_logprobs(m, tokens, SEED_HEADS)
        ar = torch.arange(1, SEQ_LEN, device=tokens.device)
        prev = -logp[SEED_HEADS[0]][:, ar, ar - 1].mean()
        n_idx, q_idx = data.scored.nonzero(as_tuple=True)
        ind = -logp[SEED_HEADS[1]][n_idx, q_idx, q_idx - data.length[n_idx] + 1].mean()
        return prev + ind

    tc = TrainConfig(steps=steps, lr=1e-3, warmup=100, seed=seed, threads=threads)
    log = fit(model, sample, tc, aux=seed_circuit, progress=progress, desc=NAME)
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
def composition_test(model: HookedTransformer, data: InductionData, prev_head: tuple[int, int],
                     induction_head: tuple[int, int]) -> dict[str, float]:
    """Repeated-half loss when the previous-token head's output is removed from ONLY the query,
    key or value input of the induction head (Elhage et al.'s Q/K/V-composition). K-composition
    predicts that removing it from the key input alone destroys the in-context prediction."""
    (pl, ph), (il, ih) = prev_head, induction_head
    tokens = data.tokens.to(model.cfg.device)
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{pl}.attn.hook_z")
    prev_out = cache[f"blocks.{pl}.attn.hook_z"][:, :, ph] @ model.W_O[pl, ph]  # [batch pos d_model]

    def remove(x: Tensor, hook: object) -> Tensor:
        x = x.clone()
        x[:, :, ih] = x[:, :, ih] - prev_out
        return x

    out = {}
    was = model.cfg.use_split_qkv_input
    model.set_use_split_qkv_input(True)
    try:
        for site in ("q", "k", "v"):
            with model.hooks(fwd_hooks=[(f"blocks.{il}.hook_{site}_input", remove)]):
                loss = token_loss(model(tokens), tokens).cpu()
            out[site] = masked_mean(loss, data.scored)
    finally:
        model.set_use_split_qkv_input(was)
    return out


@torch.inference_mode()
def evaluate(model: HookedTransformer, n: int = 512, seed: int = 1) -> dict[str, object]:
    """Losses on the first vs repeated copy and per-head induction / previous-token scores."""
    data = dataset(n, seed)
    loss = token_loss(logits_in_batches(model, data.tokens), data.tokens.to(model.cfg.device)).cpu()
    first = masked_mean(loss, data.first_scored)
    repeated = masked_mean(loss, data.scored)
    ind, prev = head_scores(model, data)
    prev_head, ind_head = (0, int(prev[0].argmax())), (1, int(ind[1].argmax()))
    comp = composition_test(model, data, prev_head, ind_head)
    return {
        "loss_first_half": first,
        "loss_repeated_half": repeated,
        "loss_ratio": repeated / first,
        "best_induction_score_layer1": float(ind[1].max()),
        "best_prev_token_score_layer0": float(prev[0].max()),
        "induction_head": list(ind_head),
        "prev_token_head": list(prev_head),
        "repeated_loss_prev_head_removed_from_q": comp["q"],
        "repeated_loss_prev_head_removed_from_k": comp["k"],
        "repeated_loss_prev_head_removed_from_v": comp["v"],
        "induction_scores": [[round(float(v), 4) for v in row] for row in ind],
        "prev_token_scores": [[round(float(v), 4) for v in row] for row in prev],
        "n_eval": n,
        "eval_seed": seed,
    }
