"""`retrieval-*`: key -> value retrieval over a long context, in three positional schemes.

Task (associative recall, as in the "needle" and lost-in-the-middle studies, Liu et al. 2023):
a context of P = 125 key -> value bindings, then a query ``? k``; the model must predict the
value bound to k. Each binding is ONE token ``kX>vY``; a context binds 40 of the 64 keys to
random values (a key that recurs keeps its value). The queried key occurs exactly once, at a
position drawn uniformly, so the distance d from the query to the needed binding spans the
whole context:

    <bos> k12>v3 k40>v61 ... k12>v3 ... k7>v20 ? k40   ->  v61         (128 tokens)

d = (position of the query key) - (position of the binding), in tokens: 2, 3, ..., 126.

One token per binding makes the lookup a single content match (attend to the binding whose key
is k, copy its value), learnable in minutes on a CPU by every scheme; a two-token ``k v`` format
needs a previous-token step first, which from scratch sits on a long loss plateau (and, without
positions, has no direct signal at all). During training a binding's embedding is tied to
key + value parts (W_E[kX>vY] = K[X] + V[Y]); the checkpoint holds the resulting plain table.
Training starts with 4 bindings and grows the context to 125 by step 800 (`context_pairs`):
at initialisation a needle among 125 bindings gets a 1/128-diluted gradient and training stalls.

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
128 was chosen so that each variant trains in a few minutes on one contended CPU core.

Known mechanism: a content lookup at the query position: a head whose query is the key k
attends to the binding token containing k and copies its value part to the logits. Positional
information can only add distance-dependent bias (recency), which the accuracy-vs-distance curve
in each manifest records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Int
from torch import Tensor

from interp.organisms.base import CircuitPrompts, Criterion
from interp.organisms.training import (
    IGNORE,
    PairEmbedding,
    TrainConfig,
    TrainLog,
    fit,
    init_model,
    last_logits,
)
from interp.tl import HookedTransformer, HookedTransformerConfig
from interp.tokens import VocabTokenizer

Scheme = Literal["learned", "rotary", "none"]

N_KEYS = 64
N_VALUES = 64
N_PAIRS = 125
N_CONTEXT_KEYS = 40  # distinct keys bound in one context
SEQ_LEN = N_PAIRS + 3  # <bos>, bindings, ?, key
N_CTX = 256
QUERY_POS = SEQ_LEN - 1
BATCH = 64
DEFAULT_STEPS = 1200
WARM_STEPS = 300
CURRICULUM_STEPS = 800
SHORT_DISTANCE = 16  # "short": the needed binding is at most this many tokens before the query

BOS = 0
KEY0 = 1
VALUE0 = KEY0 + N_KEYS
QMARK = VALUE0 + N_VALUES
PAIR0 = QMARK + 1  # binding kX>vY is PAIR0 + N_VALUES * X + Y
DISTANCE_BINS = (2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 126)

TASK = (f"key->value retrieval: {N_PAIRS} one-token bindings ({SEQ_LEN} tokens), query '? k' -> v, "
        f"distance to the needed binding uniform over 2..{N_PAIRS + 1}")
MECHANISM = ("content lookup: the query position attends to the binding token whose key part matches "
             "k and copies its value part")

ACCEPTANCE = (
    Criterion(metric="short_distance_accuracy", op=">=", threshold=0.9,
              what=f"accuracy with the needed binding at distance <= {SHORT_DISTANCE} tokens"),
)


def tokenizer() -> VocabTokenizer:
    """``<bos>``, keys ``k0``..``k63``, values ``v0``..``v63``, ``?``, bindings ``kX>vY``."""
    pairs = tuple(f"k{x}>v{y}" for x in range(N_KEYS) for y in range(N_VALUES))
    return VocabTokenizer(("<bos>",) + tuple(f"k{i}" for i in range(N_KEYS))
                          + tuple(f"v{i}" for i in range(N_VALUES)) + ("?",) + pairs)


def pair_id(key: Tensor, value: Tensor) -> Tensor:
    """Token id of the binding key -> value (both given as key / value token ids)."""
    return PAIR0 + N_VALUES * (key - KEY0) + (value - VALUE0)


def config(scheme: Scheme = "learned") -> HookedTransformerConfig:
    if scheme not in ("learned", "rotary", "none"):
        raise ValueError(f"retrieval scheme: expected 'learned', 'rotary' or 'none', got {scheme!r}")
    extra: dict[str, object] = {}
    if scheme == "rotary":
        extra = {"positional_embedding_type": "rotary", "rotary_dim": 16}
    return HookedTransformerConfig(
        n_layers=2, d_model=64, n_heads=4, d_head=16, n_ctx=N_CTX, d_vocab=PAIR0 + N_KEYS * N_VALUES,
        attn_only=True, normalization_type="LN", **({"positional_embedding_type": "standard"} | extra),
        original_architecture="interp-NoPE" if scheme == "none" else f"interp-organism-retrieval-{scheme}",
        seed=None, dtype=torch.float32, device="cpu")


@dataclass(frozen=True)
class RetrievalData:
    """Prompts and ground truth: `key` (queried key token id, also the last token), `value`
    (the answer: value token id), `pair_pos` (position of the needed binding token) and
    `distance` (query position - pair_pos, in tokens)."""

    tokens: Int[Tensor, "n pos"]
    key: Int[Tensor, "n"]
    value: Int[Tensor, "n"]
    pair_pos: Int[Tensor, "n"]
    distance: Int[Tensor, "n"]

    @property
    def query_pos(self) -> Int[Tensor, "n"]:
        return torch.full_like(self.key, QUERY_POS)

    @property
    def answer(self) -> Int[Tensor, "n"]:
        return self.value


def dataset(n: int, seed: int, distance: int | Tensor | None = None, n_pairs: int = N_PAIRS
            ) -> RetrievalData:
    """`n` prompts, deterministic in `seed`. `distance` (2..n_pairs + 1; an int or one per
    example) fixes the query-to-binding distance; by default it is uniform over the context.
    `n_pairs` < N_PAIRS gives the shorter contexts of the training curriculum."""
    if not 2 <= n_pairs <= N_PAIRS:
        raise ValueError(f"n_pairs: expected 2..{N_PAIRS}, got {n_pairs}")
    n_keys = min(N_CONTEXT_KEYS, n_pairs)
    seq_len = n_pairs + 3
    query_pos = seq_len - 1
    g = torch.Generator().manual_seed(seed)
    keys_used = torch.rand(n, N_KEYS, generator=g).argsort(dim=1)[:, :n_keys] + KEY0
    bound = torch.randint(VALUE0, VALUE0 + N_VALUES, (n, n_keys), generator=g)
    if distance is None:
        index = torch.randint(0, n_pairs, (n,), generator=g)
    else:
        d = torch.as_tensor(distance).long().expand(n)
        if bool(((d < 2) | (d > n_pairs + 1)).any()):
            raise ValueError(f"distance: expected values in [2, {n_pairs + 1}], got "
                             f"{sorted(set(d.tolist()))[:8]}")
        index = query_pos - 1 - d
    # slot 0 is the queried key; the other bindings use slots 1.. (each at least once, in random
    # order), then uniformly
    others = torch.cat([torch.rand(n, n_keys - 1, generator=g).argsort(dim=1) + 1,
                        torch.randint(1, n_keys, (n, n_pairs - n_keys), generator=g)], 1)
    others = others.gather(1, torch.rand(n, n_pairs - 1, generator=g).argsort(dim=1))
    rows = torch.arange(n)
    slots = torch.zeros(n, n_pairs, dtype=torch.long)
    keep = torch.ones(n, n_pairs, dtype=torch.bool)
    keep[rows, index] = False
    slots[keep] = others.reshape(-1)
    tokens = torch.empty(n, seq_len, dtype=torch.long)
    tokens[:, 0] = BOS
    tokens[:, 1:1 + n_pairs] = pair_id(keys_used.gather(1, slots), bound.gather(1, slots))
    tokens[:, query_pos - 1] = QMARK
    key, value = keys_used[:, 0], bound[:, 0]
    tokens[:, query_pos] = key
    pair_pos = 1 + index
    return RetrievalData(tokens=tokens, key=key, value=value, pair_pos=pair_pos,
                         distance=query_pos - pair_pos)


CIRCUIT_DISTANCE = 40


def circuit_prompts(n: int = 48, seed: int = 0) -> CircuitPrompts:
    """Prompts with the needed binding at CIRCUIT_DISTANCE tokens before the query. Corrupt: the
    needed binding replaced by a binding of a key absent from the context (the lookup finds no
    match). Roles: ``pair`` (the needed binding), ``qmark``, ``last`` (the queried key)."""
    d = dataset(n, seed, distance=CIRCUIT_DISTANCE)
    g = torch.Generator().manual_seed(seed + 1)
    p = QUERY_POS - CIRCUIT_DISTANCE
    keys = (d.tokens[:, 1:QUERY_POS - 1] - PAIR0) // N_VALUES + KEY0  # keys bound in the context
    present = torch.zeros(n, KEY0 + N_KEYS, dtype=torch.bool)
    present.scatter_(1, keys, True)
    present[torch.arange(n), d.key] = True
    score = torch.rand(n, KEY0 + N_KEYS, generator=g).masked_fill(present, -1.0)
    score[:, :KEY0] = -1.0
    absent = score.argmax(1)  # a key bound nowhere in this context (40 of 64 keys are used)
    corrupt = d.tokens.clone()
    corrupt[:, p] = pair_id(absent, torch.randint(VALUE0, VALUE0 + N_VALUES, (n,), generator=g))
    roles = {"bos": 0, "pair": p, "qmark": QUERY_POS - 1, "last": QUERY_POS}
    cands = (0, p - 1, p, p + 1, QUERY_POS - 1, QUERY_POS)
    return CircuitPrompts(clean=d.tokens, corrupt=corrupt, answer=d.value[:, None], answer_pos=(QUERY_POS,),
                          roles=roles, candidates=cands)


def context_pairs(step: int) -> int:
    """Curriculum: 4 bindings for the first WARM_STEPS steps, then linear growth to N_PAIRS at
    CURRICULUM_STEPS (a needle among 125 bindings gets a 1/128-diluted gradient at
    initialisation; among 4 it is learned quickly, and the content match carries over)."""
    if step < WARM_STEPS:
        return 4
    frac = (step - WARM_STEPS) / (CURRICULUM_STEPS - WARM_STEPS)
    return min(N_PAIRS, 4 + int((N_PAIRS - 4) * frac))


def _sampler(step: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    data = dataset(BATCH, int(torch.randint(0, 2**62, (1,), generator=g)), n_pairs=context_pairs(step))
    targets = torch.full_like(data.tokens, IGNORE)
    targets[:, -1] = data.value
    return data.tokens, targets


@torch.inference_mode()
def accuracy(model: HookedTransformer, data: RetrievalData) -> Tensor:
    """Per example: 1.0 where the argmax at the query position is the paired value."""
    return (last_logits(model, data.tokens).argmax(-1).cpu() == data.value).float()


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

    def circuit_prompts(self, n: int = 48, seed: int = 0) -> CircuitPrompts:
        return circuit_prompts(n, seed)

    def train(self, steps: int = DEFAULT_STEPS, seed: int = 0, progress: bool = True,
              threads: int | None = 1) -> tuple[HookedTransformer, TrainLog]:
        """Train from scratch (AdamW 1e-3, batch 64, loss on the answer only)."""
        model = init_model(self.config(), seed)
        frozen: tuple[str, ...] = ()
        if self.scheme == "none":
            with torch.no_grad():
                model.pos_embed.W_pos.zero_()
            frozen = ("pos_embed.W_pos",)
        emb = PairEmbedding(model.embed.W_E[:PAIR0], N_KEYS, N_VALUES,
                            float(model.cfg.initializer_range), seed)
        tc = TrainConfig(steps=steps, lr=1e-3, warmup=100, seed=seed, threads=threads)
        log = fit(model, _sampler, tc, frozen=frozen, embedding=(emb, list(emb.parameters())),
                  progress=progress, desc=self.NAME)
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


def prompts(n: int, seed: int, distance: int | Tensor | None = None):  # noqa: ANN201
    """`dataset(n, seed, distance)` as `interp.prompts.Prompts`: the value as the answer, the span
    `fact` (the needed binding token) and `query` (the queried key, the last token)."""
    from interp.prompts import Prompts

    d = dataset(n, seed, distance)
    return Prompts.from_tokens(d.tokens, answers=d.value, spans={"fact": d.pair_pos, "query": d.query_pos})


def distance_prompts(n_per: int, seed: int, distances: tuple[int, ...] = DISTANCE_BINS):  # noqa: ANN201
    """`n_per` prompts at each distance (seed + i for the i-th distance), concatenated in order."""
    from interp.prompts import Prompts

    parts = [dataset(n_per, seed + i, distance=d) for i, d in enumerate(distances)]
    return Prompts.from_tokens(torch.cat([p.tokens for p in parts]), answers=torch.cat([p.value for p in parts]),
                               spans={"fact": torch.cat([p.pair_pos for p in parts]),
                                      "query": torch.cat([p.query_pos for p in parts])})


LONG_DISTANCES = (2, 8, 32, 64, 96, 126, 160, 200, 248)


def long_dataset(n: int, seed: int, distance: int) -> tuple[Tensor, Tensor, int]:
    """Prompts at twice the training length (250 bindings, 253 tokens): a prefix of 125 bindings
    from another draw, then a training-length prompt, with the needed binding moved to `distance`
    tokens before the query (2..250). The queried key occurs once. Beyond 126 tokens the needed
    fact sits where training never put one (Haviv et al. 2022: test at the training length and
    at 2x). Returns (tokens, values, the binding's position)."""
    x, y = dataset(n, seed, distance=2), dataset(n, seed + 7919)
    g = torch.Generator().manual_seed(seed)

    def key_of(tok: Tensor) -> Tensor:
        return (tok - PAIR0) // N_VALUES + KEY0

    def filler(shape: tuple[int, ...]) -> Tensor:
        other = (x.key[:, None] - KEY0 + torch.randint(1, N_KEYS, shape, generator=g)) % N_KEYS + KEY0
        return pair_id(other, torch.randint(VALUE0, VALUE0 + N_VALUES, shape, generator=g))

    prefix = y.tokens[:, 1:1 + N_PAIRS].clone()
    clash = key_of(prefix) == x.key[:, None]
    prefix[clash] = filler(prefix.shape)[clash]
    suffix = x.tokens[:, 1:].clone()
    rows = torch.arange(n)
    suffix[rows, x.pair_pos - 1] = filler((n, 1))[:, 0]
    tokens = torch.cat([x.tokens[:, :1], prefix, suffix], dim=1)
    q = tokens.shape[1] - 1
    if not 2 <= distance <= q - 2:
        raise ValueError(f"distance: expected 2..{q - 2}, got {distance}")
    tokens[:, q - distance] = pair_id(x.key, x.value)
    return tokens, x.value, q - distance


def long_prompts(n_per: int, seed: int, distances: tuple[int, ...] = LONG_DISTANCES):  # noqa: ANN201
    """`n_per` prompts at twice the training length at each distance (seed + i), concatenated."""
    from interp.prompts import Prompts

    parts = [long_dataset(n_per, seed + i, d) for i, d in enumerate(distances)]
    tokens = torch.cat([t for t, _, _ in parts])
    fact = torch.cat([torch.full((n_per,), f) for _, _, f in parts])
    return Prompts.from_tokens(tokens, answers=torch.cat([v for _, v, _ in parts]),
                               spans={"fact": fact, "query": torch.full_like(fact, tokens.shape[1] - 1)})
