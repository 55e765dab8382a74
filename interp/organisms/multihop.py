"""`multihop`: in-context two-hop lookup with a one-hop control.

Task (in-context version of the latent multi-hop reasoning studied by Yang et al. 2024, "Do Large
Language Models Latently Perform Multi-Hop Reasoning?", and Biran et al. 2024, "Hopping Too Late"):
a context of four facts forming two chains a -> b -> c and d -> e -> f, in random order; then the
queried entity a, after a hop marker at the start: ``hop2`` asks for the entity two hops from a
(answer c, via the bridge b), ``hop1`` for one hop (answer b: the control task).

    <bos> hop2 e4>e9 e17>e2 e9>e30 e2>e11 e4   ->  e30

Each fact x -> y is ONE token ``x>y`` (1,024 fact tokens over 32 entities); entities are their
own tokens (``e0``..``e31``), which are the answers. One token per fact makes every step a content
lookup (find the fact whose source is a, read its target b; find the fact whose source is b,
read c) with no previous-token step to discover first: that step is the slow part of induction-
style circuits (a long loss plateau), and it made two-token facts too slow to train on a shared
CPU. During training a fact token's embedding is tied to source + target parts
(W_E[x>y] = S[x] + T[y]); the saved checkpoint holds the resulting plain table, so it is an
ordinary HookedTransformer.

Layout (fixed): position 0 `<bos>`; 1 the hop marker; 2-5 the facts; 6 the queried entity a, the
last (query) position where the answer is predicted. Ground truth per example: a, the bridge b,
the end c (entity token ids), the answer (b for one hop, c for two), the hop count, and the
positions of the facts a -> b and b -> c.

`MultihopData.with_other_bridge()` builds the matched interchange partner: it swaps the targets
of a -> b and d -> e, so exactly two fact tokens change, the prompt stays in distribution, and
a's bridge becomes e with answer f (Dallas -> Texas -> Austin; swap in California, get Sacramento).

Known mechanism (expected, to be confirmed by the toolkit's methods, never hard-coded): the query
position attends to the fact whose source is a and reads the bridge b (hop 1); a later layer
attends to the fact whose source is b and reads c (hop 2). Trained with a curriculum raising the
two-hop share of queries from 20% to 80%.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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

NAME = "multihop"
TASK = ("in-context two-hop lookup over 4 one-token facts (chains a->b->c, d->e->f, random order, "
        "32 entities); one-hop queries as control")
MECHANISM = ("query position attends to the fact with source a and reads the bridge b (hop 1), then "
             "to the fact with source b and reads the answer c (hop 2)")
N_ENTITIES = 32
N_FACTS = 4
SEQ_LEN = 7
HOP_POS = 1
FACT_POS0 = 2
QUERY_POS = 6
BATCH = 128
DEFAULT_STEPS = 1500
CURRICULUM_STEPS = 1000  # two-hop share ramps 0.2 -> 0.8 over these steps

BOS, HOP1, HOP2 = 0, N_ENTITIES + 1, N_ENTITIES + 2
FACT0 = N_ENTITIES + 3  # token id of fact e0>e0; fact x>y is FACT0 + 32 x + y

ACCEPTANCE = (
    Criterion(metric="two_hop_accuracy", op=">=", threshold=0.9,
              what="two-hop accuracy on held-out examples"),
)


def tokenizer() -> VocabTokenizer:
    """``<bos>``, entities ``e0``..``e31`` (ids 1-32), ``hop1``, ``hop2``, facts ``ex>ey``."""
    facts = tuple(f"e{x}>e{y}" for x in range(N_ENTITIES) for y in range(N_ENTITIES))
    return VocabTokenizer(("<bos>",) + tuple(f"e{i}" for i in range(N_ENTITIES)) + ("hop1", "hop2")
                          + facts)


def entity_id(i: int) -> int:
    """Token id of entity ``e{i}``."""
    return 1 + i


def fact_id(source: Tensor, target: Tensor) -> Tensor:
    """Token id of the fact source -> target (both given as entity token ids)."""
    return FACT0 + N_ENTITIES * (source - 1) + (target - 1)


def config() -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=4, d_model=128, n_heads=4, d_head=32, n_ctx=SEQ_LEN,
        d_vocab=FACT0 + N_ENTITIES * N_ENTITIES, attn_only=True, normalization_type="LN",
        positional_embedding_type="standard", original_architecture="interp-organism-multihop",
        seed=None, dtype=torch.float32, device="cpu")


@dataclass(frozen=True)
class MultihopData:
    """Prompts and ground truth (token ids; positions index `tokens`).

    `a`, `bridge`, `end`: the queried chain a -> bridge -> end (entity token ids). `other`: the
    distractor chain (d, e, f). `answer`: bridge for one-hop queries, end for two-hop.
    `fact1_pos` / `fact2_pos`: positions of the fact tokens a>bridge and bridge>end;
    `other_fact1_pos` / `other_fact2_pos` likewise for d>e and e>f.
    """

    tokens: Int[Tensor, "n pos"]
    a: Int[Tensor, "n"]
    bridge: Int[Tensor, "n"]
    end: Int[Tensor, "n"]
    other: Int[Tensor, "n 3"]
    answer: Int[Tensor, "n"]
    hops: Int[Tensor, "n"]
    fact1_pos: Int[Tensor, "n"]
    fact2_pos: Int[Tensor, "n"]
    other_fact1_pos: Int[Tensor, "n"]
    other_fact2_pos: Int[Tensor, "n"]

    @property
    def query_pos(self) -> Int[Tensor, "n"]:
        """The last position (the queried entity a), where the answer is predicted."""
        return torch.full_like(self.a, QUERY_POS)

    def with_other_bridge(self) -> MultihopData:
        """The interchange partner: targets of a -> b and d -> e swapped (two tokens change).

        In the result a's bridge is e and its end f; the distractor chain becomes d -> b -> c.
        """
        rows = torch.arange(self.tokens.shape[0])
        tokens = self.tokens.clone()
        d, e, f = self.other.unbind(1)
        tokens[rows, self.fact1_pos] = fact_id(self.a, e)
        tokens[rows, self.other_fact1_pos] = fact_id(d, self.bridge)
        return replace(
            self, tokens=tokens, bridge=e, end=f,
            other=torch.stack([d, self.bridge, self.end], dim=1),
            answer=torch.where(self.hops == 1, e, f),
            fact2_pos=self.other_fact2_pos, other_fact2_pos=self.fact2_pos)


def dataset(n: int, seed: int, two_hop_share: float = 0.5) -> MultihopData:
    """`n` prompts, deterministic in `seed`; each is two-hop with probability `two_hop_share`."""
    if not 0.0 <= two_hop_share <= 1.0:
        raise ValueError(f"two_hop_share: expected a probability in [0, 1], got {two_hop_share}")
    g = torch.Generator().manual_seed(seed)
    ents = torch.rand(n, N_ENTITIES, generator=g).argsort(dim=1)[:, :6] + 1  # 6 distinct entity ids
    a, b, c, d, e, f = ents.unbind(1)
    slot = torch.rand(n, N_FACTS, generator=g).argsort(dim=1)  # slot of fact k: a>b, b>c, d>e, e>f
    facts = fact_id(torch.stack([a, b, d, e], 1), torch.stack([b, c, e, f], 1))
    pos = FACT_POS0 + slot
    tokens = torch.zeros((n, SEQ_LEN), dtype=torch.long)
    tokens[:, 0] = BOS
    hops = 1 + (torch.rand(n, generator=g) < two_hop_share).long()
    tokens[:, HOP_POS] = torch.where(hops == 2, HOP2, HOP1)
    tokens.scatter_(1, pos, facts)
    tokens[:, QUERY_POS] = a
    return MultihopData(tokens=tokens, a=a, bridge=b, end=c, other=torch.stack([d, e, f], 1),
                        answer=torch.where(hops == 2, c, b), hops=hops,
                        fact1_pos=pos[:, 0], fact2_pos=pos[:, 1],
                        other_fact1_pos=pos[:, 2], other_fact2_pos=pos[:, 3])


CIRCUIT_SLOTS = (2, 4, 3, 5)  # positions of the facts a>b, b>c, d>e, e>f in `circuit_prompts`


def _fixed(n: int, g: torch.Generator, a: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Two-hop prompts with the facts at CIRCUIT_SLOTS; `a` fixed when given. (tokens, answer c)."""
    ents = torch.rand(n, N_ENTITIES, generator=g).argsort(dim=1)[:, :6] + 1
    if a is not None:  # keep a, draw the other five among the remaining entities
        rest = torch.rand(n, N_ENTITIES, generator=g).argsort(dim=1) + 1
        rest = rest[rest != a[:, None]].reshape(n, N_ENTITIES - 1)[:, :5]
        ents = torch.cat([a[:, None], rest], 1)
    a_, b, c, d, e, f = ents.unbind(1)
    tokens = torch.zeros((n, SEQ_LEN), dtype=torch.long)
    tokens[:, 0], tokens[:, HOP_POS], tokens[:, QUERY_POS] = BOS, HOP2, a_
    facts = fact_id(torch.stack([a_, b, d, e], 1), torch.stack([b, c, e, f], 1))
    tokens[:, list(CIRCUIT_SLOTS)] = facts
    return tokens, c


def circuit_prompts(n: int = 48, seed: int = 0) -> CircuitPrompts:
    """Two-hop prompts with the facts in fixed slots (a>b at 2, d>e at 3, b>c at 4, e>f at 5).
    Corrupt: the same query a and layout with all four facts re-drawn (a new bridge and answer).
    Roles: ``fact1`` (a>b), ``fact2`` (b>c), ``other1`` (d>e), ``other2`` (e>f), ``hop``,
    ``last`` (the query a, where the answer is read)."""
    g = torch.Generator().manual_seed(seed)
    clean, c = _fixed(n, g)
    corrupt, _ = _fixed(n, g, a=clean[:, QUERY_POS])
    f1, f2, o1, o2 = CIRCUIT_SLOTS
    roles = {"bos": 0, "hop": HOP_POS, "fact1": f1, "fact2": f2, "other1": o1, "other2": o2, "last": QUERY_POS}
    return CircuitPrompts(clean=clean, corrupt=corrupt, answer=c[:, None], answer_pos=(QUERY_POS,), roles=roles,
                          candidates=tuple(range(SEQ_LEN)))


def pairs(n: int, seed: int, two_hop_share: float = 1.0) -> tuple[MultihopData, MultihopData]:
    """Matched (clean, other-bridge) prompts for interchange interventions."""
    clean = dataset(n, seed, two_hop_share)
    return clean, clean.with_other_bridge()


def two_hop_share(step: int) -> float:
    """Curriculum: 20% two-hop queries at step 0, rising linearly to 80% at CURRICULUM_STEPS."""
    return 0.2 + 0.6 * min(1.0, step / CURRICULUM_STEPS)


def _sampler(step: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    data = dataset(BATCH, int(torch.randint(0, 2**62, (1,), generator=g)), two_hop_share(step))
    targets = torch.full_like(data.tokens, IGNORE)
    targets[:, QUERY_POS] = data.answer
    return data.tokens, targets


def train(steps: int = DEFAULT_STEPS, seed: int = 0, progress: bool = True,
          threads: int | None = 1) -> tuple[HookedTransformer, TrainLog]:
    """Train from scratch (AdamW 1e-3, batch 128, loss on the answer only, two-hop curriculum)."""
    model = init_model(config(), seed)
    emb = PairEmbedding(model.embed.W_E[:FACT0], N_ENTITIES, N_ENTITIES,
                        float(model.cfg.initializer_range), seed)
    tc = TrainConfig(steps=steps, lr=1e-3, warmup=100, seed=seed, threads=threads)
    log = fit(model, _sampler, tc, embedding=(emb, list(emb.parameters())), progress=progress,
              desc=NAME)
    return model, log


@torch.inference_mode()
def accuracy(model: HookedTransformer, data: MultihopData) -> Tensor:
    """Per example: 1.0 where the argmax at the query position is the ground-truth answer."""
    logits = last_logits(model, data.tokens)
    return (logits.argmax(-1).cpu() == data.answer).float()


@torch.inference_mode()
def evaluate(model: HookedTransformer, n: int = 1000, seed: int = 1) -> dict[str, object]:
    """Held-out two-hop and one-hop accuracy, and accuracy on the other-bridge partners."""
    two = dataset(n, seed, two_hop_share=1.0)
    one = dataset(n, seed + 10_000, two_hop_share=0.0)
    swapped = two.with_other_bridge()
    return {
        "two_hop_accuracy": float(accuracy(model, two).mean()),
        "one_hop_accuracy": float(accuracy(model, one).mean()),
        "other_bridge_two_hop_accuracy": float(accuracy(model, swapped).mean()),
        "n_eval": n,
        "eval_seed": seed,
    }


def prompts(n: int, seed: int, two_hop_share: float = 1.0, *, partner: bool = True):  # noqa: ANN201
    """`dataset(n, seed, two_hop_share)` as `interp.prompts.Prompts`: answers, the spans `fact1`
    (the fact a>bridge), `fact2` (bridge>end), `query` (the queried entity, the last token), and
    (with `partner`) the interchange partner `with_other_bridge()` as the partner."""
    from interp.prompts import Prompts

    def build(d: MultihopData) -> Prompts:
        return Prompts.from_tokens(d.tokens, answers=d.answer, spans={
            "fact1": d.fact1_pos, "fact2": d.fact2_pos, "query": d.query_pos})

    d = dataset(n, seed, two_hop_share)
    return build(d).with_partner(build(d.with_other_bridge()) if partner else None)


def bridge_labels(n: int, seed: int, two_hop_share: float = 1.0) -> Int[Tensor, "n"]:
    """The bridge entity of each of `prompts(n, seed, two_hop_share)` (token ids)."""
    return dataset(n, seed, two_hop_share).bridge
