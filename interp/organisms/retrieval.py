"""`retrieval-*`: key -> value retrieval over a long context, in three positional schemes.

Task (associative recall, as in the "needle" and lost-in-the-middle studies, Liu et al. 2023):
a context of P = 62 key -> value pairs ``k v`` binding 24 keys (of 64) to random values (a key
that recurs keeps its value), then a query ``? k``; the model must predict the value bound to k.
The queried key occurs exactly once, at a pair drawn uniformly, so the distance d from the query
to the needed pair spans the whole context:

    <bos> k12 v3 k40 v61 ... k12 v3 ... k7 v20 ? k40   ->  v61         (127 tokens)

d = (position of the query key) - (position of the pair's key), in tokens: 3, 5, ..., 125.
Recurring keys make most context values predictable too (`repeat_mask`); training uses those
positions as well as the final answer, a dense signal that makes the lookup learnable in minutes.

The three variants differ ONLY in the positional scheme (same task, size, optimiser, seed and
steps), so positional-information decay can be compared across schemes (Haviv et al. 2022,
"Transformer Language Models without Positional Encodings Still Learn Positional Information";
Kazemnejad et al. 2023, "The Impact of Positional Encoding on Length Generalization"):

- ``retrieval-learned``: learned absolute position table;
- ``retrieval-rotary``: rotary embeddings (RoPE, Su et al. 2021) on all of d_head;
- ``retrieval-nope``: no positional information: a position table frozen at zero during training
  (``cfg.original_architecture = "interp-NoPE"`` so `Arch.of(model).positional == "none"`).

n_ctx is 256 for all three (twice the training length, so length-generalisation probes can run
the rotary and NoPE models at 2x; the learned table's rows past 127 are untrained). Context length
127 was chosen so that each variant trains in about 5 minutes on one contended CPU core.

Known mechanism: induction-style lookup. A previous-token step makes each value position carry
its key; at the query, a head whose query matches that key attends to the value and copies it.
Without positions (NoPE) the previous-token step has no direct signal, which is why its
accuracy-vs-distance curve is the interesting one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from interp.organisms.base import Criterion
from interp.organisms.training import IGNORE, TrainConfig, TrainLog, fit, init_model, logits_in_batches
from interp.tokens import VocabTokenizer

Scheme = Literal["learned", "rotary", "none"]

N_KEYS = 64
N_VALUES = 64
N_PAIRS = 62
N_CONTEXT_KEYS = 24  # distinct keys bound in one context
SEQ_LEN = 2 * N_PAIRS + 3  # <bos>, pairs, ?, key
N_CTX = 256
QUERY_POS = SEQ_LEN - 1
BATCH = 32
DEFAULT_STEPS = 3000
SHORT_DISTANCE = 17  # "short": the needed pair is at most this many tokens before the query

BOS, QMARK = 0, 1 + N_KEYS + N_VALUES
DISTANCE_BINS = (3, 9, 17, 33, 49, 65, 81, 97, 113, 125)

TASK = (f"key->value retrieval: {N_PAIRS} pairs ({SEQ_LEN} tokens), query '? k' -> v, distance to the "
        f"needed pair uniform over 3..{2 * N_PAIRS + 1}")
MECHANISM = ("induction-style lookup: value positions carry their key (previous-token step); the "
             "query attends to the matching key's value and copies it")

ACCEPTANCE = (
    Criterion(metric="short_distance_accuracy", op=">=", threshold=0.9,
              what=f"accuracy with the needed pair at distance <= {SHORT_DISTANCE} tokens"),
)


def tokenizer() -> VocabTokenizer:
    """``<bos>`` (0), keys ``k0``..``k63`` (1-64), values ``v0``..``v63`` (65-128), ``?`` (129)."""
    return VocabTokenizer(("<bos>",) + tuple(f"k{i}" for i in range(N_KEYS))
                          + tuple(f"v{i}" for i in range(N_VALUES)) + ("?",))


def config(scheme: Scheme = "learned") -> HookedTransformerConfig:
    if scheme not in ("learned", "rotary", "none"):
        raise ValueError(f"retrieval scheme: expected 'learned', 'rotary' or 'none', got {scheme!r}")
    extra: dict[str, object] = {}
    if scheme == "rotary":
        extra = {"positional_embedding_type": "rotary", "rotary_dim": 16}
    return HookedTransformerConfig(
        n_layers=2, d_model=64, n_heads=4, d_head=16, n_ctx=N_CTX, d_vocab=QMARK + 1,
        attn_only=True, normalization_type="LN", **({"positional_embedding_type": "standard"} | extra),
        original_architecture="interp-NoPE" if scheme == "none" else f"interp-organism-retrieval-{scheme}",
        seed=None, dtype=torch.float32, device="cpu")


@dataclass(frozen=True)
class RetrievalData:
    """Prompts and ground truth: `key` (queried key id), `value` (the answer id), `pair_pos`
    (position of the needed pair's key; its value is at pair_pos + 1) and `distance`
    (query position - pair_pos, in tokens). The query key sits at the last position.
    `repeat_mask` marks context key positions whose key occurred earlier (their next token, the
    value, is predictable in context)."""

    tokens: Int[Tensor, "n pos"]
    key: Int[Tensor, "n"]
    value: Int[Tensor, "n"]
    pair_pos: Int[Tensor, "n"]
    distance: Int[Tensor, "n"]
    repeat_mask: Bool[Tensor, "n pos"]

    @property
    def query_pos(self) -> Int[Tensor, "n"]:
        return torch.full_like(self.key, QUERY_POS)

    @property
    def answer(self) -> Int[Tensor, "n"]:
        return self.value


def dataset(n: int, seed: int, distance: int | Tensor | None = None) -> RetrievalData:
    """`n` prompts, deterministic in `seed`. `distance` (odd, 3..125; an int or one per example)
    fixes the query-to-pair distance; by default the queried pair is uniform over the context.

    Each context binds N_CONTEXT_KEYS keys to random values; the queried key occurs exactly once
    (at the controlled distance), the others recur with the same value, so every recurrence is
    itself a retrieval (`repeat_mask`), which gives training a dense signal.
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.rand(n, N_KEYS, generator=g).argsort(dim=1)[:, :N_CONTEXT_KEYS] + 1
    bound = torch.randint(1 + N_KEYS, 1 + N_KEYS + N_VALUES, (n, N_CONTEXT_KEYS), generator=g)
    if distance is None:
        index = torch.randint(0, N_PAIRS, (n,), generator=g)
    else:
        d = torch.as_tensor(distance).long().expand(n)
        if bool(((d < 3) | (d > 2 * N_PAIRS + 1) | (d % 2 != 1)).any()):
            raise ValueError(f"distance: expected odd values in [3, {2 * N_PAIRS + 1}], got "
                             f"{sorted(set(d.tolist()))[:8]}")
        index = (QUERY_POS - 1 - d) // 2
    # slot 0 of `perm` is the queried key; the other pairs draw from slots 1.. (each used once
    # first, in random order, so all of them occur), then uniformly.
    others = torch.cat([torch.rand(n, N_CONTEXT_KEYS - 1, generator=g).argsort(dim=1) + 1,
                        torch.randint(1, N_CONTEXT_KEYS, (n, N_PAIRS - N_CONTEXT_KEYS), generator=g)], 1)
    others = others.gather(1, torch.rand(n, N_PAIRS - 1, generator=g).argsort(dim=1))
    rows = torch.arange(n)
    slots = torch.zeros(n, N_PAIRS, dtype=torch.long)
    keep = torch.ones(n, N_PAIRS, dtype=torch.bool)
    keep[rows, index] = False
    slots[keep] = others.reshape(-1)
    keys, values = perm.gather(1, slots), bound.gather(1, slots)
    tokens = torch.empty(n, SEQ_LEN, dtype=torch.long)
    tokens[:, 0] = BOS
    tokens[:, 1:1 + 2 * N_PAIRS:2] = keys
    tokens[:, 2:2 + 2 * N_PAIRS:2] = values
    tokens[:, QUERY_POS - 1] = QMARK
    key, value = perm[:, 0], bound[:, 0]
    tokens[:, QUERY_POS] = key
    pair_pos = 1 + 2 * index
    # a pair's value is predictable when its key occurred before in the context
    seen = (keys[:, :, None] == keys[:, None, :]).tril(-1).any(-1)  # [n, pair]
    repeat = torch.zeros(n, SEQ_LEN, dtype=torch.bool)
    repeat[:, 1:1 + 2 * N_PAIRS:2] = seen  # marked at the key position, which predicts the value
    return RetrievalData(tokens=tokens, key=key, value=value, pair_pos=pair_pos,
                         distance=QUERY_POS - pair_pos, repeat_mask=repeat)


def _sampler(step: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    data = dataset(BATCH, int(torch.randint(0, 2**62, (1,), generator=g)))
    targets = torch.full_like(data.tokens, IGNORE)
    nxt = torch.roll(data.tokens, -1, dims=1)
    targets = torch.where(data.repeat_mask, nxt, targets)
    targets[:, QUERY_POS] = data.value
    return data.tokens, targets


@torch.inference_mode()
def accuracy(model: HookedTransformer, data: RetrievalData) -> Tensor:
    """Per example: 1.0 where the argmax at the query position is the paired value."""
    logits = logits_in_batches(model, data.tokens, batch_size=128)[:, QUERY_POS]
    return (logits.argmax(-1).cpu() == data.value).float()


@dataclass(frozen=True)
class Variant:
    """One positional scheme of the retrieval organism (what `interp.organisms.get` returns)."""

    NAME: str
    scheme: Scheme
    TASK: str = TASK
    MECHANISM: str = MECHANISM
    DEFAULT_STEPS: int = DEFAULT_STEPS
    ACCEPTANCE: tuple[Criterion, ...] = ACCEPTANCE

    def config(self) -> HookedTransformerConfig:
        return config(self.scheme)

    def tokenizer(self) -> VocabTokenizer:
        return tokenizer()

    def dataset(self, n: int, seed: int, distance: int | Tensor | None = None) -> RetrievalData:
        return dataset(n, seed, distance)

    def train(self, steps: int = DEFAULT_STEPS, seed: int = 0, progress: bool = True,
              threads: int | None = 1) -> tuple[HookedTransformer, TrainLog]:
        """Train from scratch (AdamW 1e-3, batch 32, loss on the answer only)."""
        model = init_model(self.config(), seed)
        frozen: tuple[str, ...] = ()
        if self.scheme == "none":
            with torch.no_grad():
                model.pos_embed.W_pos.zero_()
            frozen = ("pos_embed.W_pos",)
        tc = TrainConfig(steps=steps, lr=1e-3, warmup=100, seed=seed, threads=threads)
        log = fit(model, _sampler, tc, frozen=frozen, progress=progress, desc=self.NAME)
        return model, log

    def evaluate(self, model: HookedTransformer, n: int = 100, seed: int = 1) -> dict[str, object]:
        """Accuracy at each distance in DISTANCE_BINS (`n` prompts each) and overall."""
        curve = {}
        for i, d in enumerate(DISTANCE_BINS):
            curve[d] = float(accuracy(model, dataset(n, seed + 1000 * i, distance=d)).mean())
        short = [curve[d] for d in DISTANCE_BINS if d <= SHORT_DISTANCE]
        return {
            "short_distance_accuracy": sum(short) / len(short),
            "mean_accuracy": sum(curve.values()) / len(curve),
            "accuracy_vs_distance": {"distance": list(curve), "accuracy": list(curve.values())},
            "n_eval_per_distance": n,
            "eval_seed": seed,
        }


def variant(name: str) -> Variant:
    """The variant called ``retrieval-learned``, ``retrieval-rotary`` or ``retrieval-nope``."""
    schemes: dict[str, Scheme] = {"retrieval-learned": "learned", "retrieval-rotary": "rotary",
                                  "retrieval-nope": "none"}
    if name not in schemes:
        raise ValueError(f"retrieval variant: expected one of {list(schemes)}, got {name!r}")
    return Variant(NAME=name, scheme=schemes[name])
