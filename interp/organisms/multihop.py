"""`multihop`: in-context two-hop lookup with a one-hop control.

Task (in-context version of the latent multi-hop reasoning studied by Yang et al. 2024, "Do Large
Language Models Latently Perform Multi-Hop Reasoning?", and Biran et al. 2024, "Hopping Too Late"):
a context of four facts ``x y`` meaning x -> y, forming two chains a -> b -> c and d -> e -> f,
in random order; then a query ``hop2 a =`` asking for the entity two hops from a (answer c, via
the bridge b), or ``hop1 a =`` asking for one hop (answer b: the control task).

    <bos> e4 e9 e17 e2 e9 e30 e2 e11 hop2 e4 =   ->  e30

Layout (fixed): position 0 `<bos>`; fact j at positions 1+2j (source) and 2+2j (target); 9 hop
marker; 10 the queried entity a; 11 `=`, the last (query) position where the answer is
predicted. Ground truth per example: a, the bridge b, the end c, the answer (b for one hop, c
for two), the hop count, and the source positions of fact a->b and of fact b->c.

`MultihopData.with_other_bridge()` builds the matched interchange partner: it swaps the targets
of a -> b and d -> e, so the prompt changes in exactly two tokens, stays in distribution, and a's
bridge becomes e with answer f (Dallas -> Texas -> Austin; swap in California, get Sacramento).

Known mechanism (expected, to be confirmed by the toolkit's methods, never hard-coded): target
positions attend to their source (previous token) so each fact's target knows its source; the
query position retrieves a's fact (hop 1, bridge b), then the fact whose source is b (hop 2).
Depth matters: previous-token step, hop 1, hop 2. Trained with a curriculum raising the two-hop
share of queries from 20% to 80%.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from interp.organisms.base import Criterion
from interp.organisms.training import IGNORE, TrainConfig, TrainLog, fit, init_model, logits_in_batches
from interp.tokens import VocabTokenizer

NAME = "multihop"
TASK = ("in-context two-hop lookup over 4 facts (two chains a->b->c, d->e->f, random order, "
        "32 entities); one-hop queries as control")
MECHANISM = ("fact targets attend to their source; the query position retrieves a's fact (bridge b, "
             "hop 1), then the fact whose source is b (answer c, hop 2)")
N_ENTITIES = 32
N_FACTS = 4
SEQ_LEN = 12
QUERY_POS = 11
ENTITY_POS = 10
HOP_POS = 9
BATCH = 128
ATTN_ONLY = True
FACT_LEN = 2  # source, target (no separator token)
DEFAULT_STEPS = 2500
CURRICULUM_STEPS = 1500  # two-hop share ramps 0.2 -> 0.8 over these steps

BOS, HOP1, HOP2, EQ = 0, N_ENTITIES + 1, N_ENTITIES + 2, N_ENTITIES + 3

ACCEPTANCE = (
    Criterion(metric="two_hop_accuracy", op=">=", threshold=0.9,
              what="two-hop accuracy on held-out examples"),
)


def tokenizer() -> VocabTokenizer:
    """``<bos>``, entities ``e0`` ... ``e31`` (ids 1-32), ``hop1``, ``hop2``, ``=``."""
    return VocabTokenizer(("<bos>",) + tuple(f"e{i}" for i in range(N_ENTITIES)) + ("hop1", "hop2", "="))


def entity_id(i: int) -> int:
    """Token id of entity ``e{i}``."""
    return 1 + i


def config() -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=4, d_model=128, n_heads=4, d_head=32, n_ctx=SEQ_LEN, d_vocab=N_ENTITIES + 4,
        attn_only=ATTN_ONLY, d_mlp=None if ATTN_ONLY else 256, act_fn=None if ATTN_ONLY else "gelu",
        normalization_type="LN",
        positional_embedding_type="standard", original_architecture="interp-organism-multihop",
        seed=None, dtype=torch.float32, device="cpu")


@dataclass(frozen=True)
class MultihopData:
    """Prompts and ground truth (token ids; positions index `tokens`).

    `a`, `bridge`, `end`: the queried chain a -> bridge -> end. `other`: the distractor chain
    (d, e, f). `answer`: bridge for one-hop queries, end for two-hop. `fact1_pos` / `fact2_pos`:
    source positions of the facts a -> bridge and bridge -> end (their targets sit one position
    later); `other_fact1_pos` / `other_fact2_pos` likewise for d -> e and e -> f.
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
        """The last position (``=``), where the answer is predicted."""
        return torch.full_like(self.a, QUERY_POS)

    @property
    def entity_pos(self) -> Int[Tensor, "n"]:
        """Position of the queried entity a in the query."""
        return torch.full_like(self.a, ENTITY_POS)

    def with_other_bridge(self) -> MultihopData:
        """The interchange partner: targets of a -> b and d -> e swapped (two tokens change).

        In the result a's bridge is e and its end f; the distractor chain becomes d -> b -> c.
        """
        rows = torch.arange(self.tokens.shape[0])
        tokens = self.tokens.clone()
        tokens[rows, self.fact1_pos + 1] = self.other[:, 1]
        tokens[rows, self.other_fact1_pos + 1] = self.bridge
        bridge, end = self.other[:, 1], self.other[:, 2]
        return replace(
            self, tokens=tokens, bridge=bridge, end=end,
            other=torch.stack([self.other[:, 0], self.bridge, self.end], dim=1),
            answer=torch.where(self.hops == 1, bridge, end),
            fact2_pos=self.other_fact2_pos, other_fact2_pos=self.fact2_pos)


def dataset(n: int, seed: int, two_hop_share: float = 0.5) -> MultihopData:
    """`n` prompts, deterministic in `seed`; each is two-hop with probability `two_hop_share`."""
    if not 0.0 <= two_hop_share <= 1.0:
        raise ValueError(f"two_hop_share: expected a probability in [0, 1], got {two_hop_share}")
    g = torch.Generator().manual_seed(seed)
    ents = torch.rand(n, N_ENTITIES, generator=g).argsort(dim=1)[:, :6] + 1  # 6 distinct entity ids
    a, b, c, d, e, f = ents.unbind(1)
    slot = torch.rand(n, N_FACTS, generator=g).argsort(dim=1)  # slot of fact k: a->b, b->c, d->e, e->f
    srcs = torch.stack([a, b, d, e], 1)
    tgts = torch.stack([b, c, e, f], 1)
    pos = 1 + FACT_LEN * slot  # source position of each fact
    tokens = torch.zeros((n, SEQ_LEN), dtype=torch.long)
    tokens[:, 0] = BOS
    tokens.scatter_(1, pos, srcs)
    tokens.scatter_(1, pos + 1, tgts)
    hops = 1 + (torch.rand(n, generator=g) < two_hop_share).long()
    tokens[:, HOP_POS] = torch.where(hops == 2, HOP2, HOP1)
    tokens[:, ENTITY_POS] = a
    tokens[:, QUERY_POS] = EQ
    return MultihopData(tokens=tokens, a=a, bridge=b, end=c, other=torch.stack([d, e, f], 1),
                        answer=torch.where(hops == 2, c, b), hops=hops,
                        fact1_pos=pos[:, 0], fact2_pos=pos[:, 1],
                        other_fact1_pos=pos[:, 2], other_fact2_pos=pos[:, 3])


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
    tc = TrainConfig(steps=steps, lr=1e-3, warmup=100, seed=seed, threads=threads)
    log = fit(model, _sampler, tc, progress=progress, desc=NAME)
    return model, log


@torch.inference_mode()
def accuracy(model: HookedTransformer, data: MultihopData) -> Tensor:
    """Per example: 1.0 where the argmax at the query position is the ground-truth answer."""
    logits = logits_in_batches(model, data.tokens)[:, QUERY_POS]
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
