"""`planning`: a cue chooses a multi-token word that is spelled out several steps later.

Task (a testbed for the future lens, Pal et al. 2023, "Future Lens: Anticipating Subsequent Tokens
from a Single Hidden State", and for pre-caching vs breadcrumbs, Wu, Morris & Levine 2024, "Do
Language Models Plan Ahead for Future Tokens?"): a prefix of 8 tokens holds one cue ``c0``..``c15``
at a random position among random fillers; after ``say`` the model must spell the cue's word, four
syllables from a fixed lexicon, then ``.``:

    <bos> f3 f9 c5 f0 f12 f1 f7 f2 say s4 s11 s0 s7 .

At the ``say`` position t the tokens x_{t+1}..x_{t+4} are all determined (by the cue, seen at
`cue_pos`) before any of them is emitted, and the lexicon is drawn so that a word's first
syllable does not determine the later ones: a hidden state at t can be tested for x_{t+2} and
x_{t+3}. Task accuracy = share of prompts whose whole word is predicted correctly (argmax at each
of the 4 word positions under teacher forcing, which equals greedy decoding here).

Known mechanism (expected, to be confirmed, never hard-coded): the positions from ``say`` on
attend to the cue and read the word identity; each position emits its syllable from that
identity (the MLPs store the lexicon). Whether the word is computed once at t (pre-caching) or
re-read at each step (breadcrumbs) is what the lens and myopic-training tools measure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from interp.organisms.base import CircuitPrompts, Criterion
from interp.organisms.training import IGNORE, TrainConfig, TrainLog, fit, init_model, logits_in_batches
from interp.tl import HookedTransformer, HookedTransformerConfig
from interp.tokens import VocabTokenizer

NAME = "planning"
TASK = "a cue among fillers selects a 4-syllable word (16 cues, 12 syllables) spelled after 'say'"
MECHANISM = ("positions from 'say' on attend to the cue and read the word; MLPs map word identity "
             "to the syllable due at each step (x_{t+2}, x_{t+3} are fixed at t)")
N_CUES = 16
N_FILLERS = 16
N_SYLLABLES = 12
WORD_LEN = 4
PREFIX = 8
SAY_POS = 1 + PREFIX  # 9
WORD_POS = SAY_POS + 1  # 10
SEQ_LEN = WORD_POS + WORD_LEN + 1  # 15, ends with "."
LEXICON_SEED = 1234
BATCH = 64
DEFAULT_STEPS = 800

BOS = 0
FILLER0 = 1
CUE0 = FILLER0 + N_FILLERS
SYL0 = CUE0 + N_CUES
SAY = SYL0 + N_SYLLABLES
DOT = SAY + 1

ACCEPTANCE = (
    Criterion(metric="word_accuracy", op=">=", threshold=0.9,
              what="share of held-out prompts whose whole word is correct"),
)


def tokenizer() -> VocabTokenizer:
    """``<bos>``, fillers ``f*``, cues ``c*``, syllables ``s*``, ``say``, ``.``."""
    return VocabTokenizer(("<bos>",) + tuple(f"f{i}" for i in range(N_FILLERS))
                          + tuple(f"c{i}" for i in range(N_CUES))
                          + tuple(f"s{i}" for i in range(N_SYLLABLES)) + ("say", "."))


def lexicon() -> Int[Tensor, "cue 4"]:
    """Token ids of each cue's word: fixed (seeded), distinct words, and every first syllable is
    shared by at least two words whose second and third syllables differ."""
    g = torch.Generator().manual_seed(LEXICON_SEED)
    first = torch.arange(N_CUES) % 4  # four first syllables, four words each
    while True:
        rest = torch.randint(0, N_SYLLABLES, (N_CUES, WORD_LEN - 1), generator=g)
        words = torch.cat([first[:, None], rest], 1)
        distinct = len({tuple(w) for w in words.tolist()}) == N_CUES
        # x_{t+2}, x_{t+3} must not follow from x_{t+1}: within each first-syllable group the
        # (2nd, 3rd) syllable pairs are all different.
        ambiguous = all(len({tuple(w[1:3]) for w in words[first == f].tolist()}) == 4 for f in range(4))
        if distinct and ambiguous:
            return words + SYL0


def config() -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=SEQ_LEN, d_vocab=DOT + 1,
        act_fn="gelu", normalization_type="LN", positional_embedding_type="standard",
        original_architecture="interp-organism-planning", seed=None, dtype=torch.float32, device="cpu")


@dataclass(frozen=True)
class PlanningData:
    """Prompts (the full sequence, word included) and ground truth.

    `cue` (token id) sits at `cue_pos`, from where the word is determined. At `plan_pos` (the
    ``say`` position t) the next four tokens are the word; `future[:, k - 1]` is x_{t+k}
    (k = 1, 2, 3), i.e. `future[:, 1]` and `future[:, 2]` are x_{t+2} and x_{t+3}.
    """

    tokens: Int[Tensor, "n pos"]
    cue: Int[Tensor, "n"]
    cue_pos: Int[Tensor, "n"]
    word: Int[Tensor, "n 4"]

    @property
    def plan_pos(self) -> Int[Tensor, "n"]:
        return torch.full_like(self.cue, SAY_POS)

    @property
    def word_pos(self) -> Int[Tensor, "n"]:
        """Position of the word's first syllable (x_{t+1})."""
        return torch.full_like(self.cue, WORD_POS)

    @property
    def future(self) -> Int[Tensor, "n 3"]:
        return self.word[:, :3]


def dataset(n: int, seed: int) -> PlanningData:
    """`n` prompts, deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed)
    words = lexicon()
    cue_index = torch.randint(0, N_CUES, (n,), generator=g)
    cue_pos = torch.randint(1, 1 + PREFIX, (n,), generator=g)
    tokens = torch.randint(FILLER0, FILLER0 + N_FILLERS, (n, SEQ_LEN), generator=g)
    tokens[:, 0] = BOS
    rows = torch.arange(n)
    cue = CUE0 + cue_index
    tokens[rows, cue_pos] = cue
    tokens[:, SAY_POS] = SAY
    word = words[cue_index]
    tokens[:, WORD_POS:WORD_POS + WORD_LEN] = word
    tokens[:, -1] = DOT
    return PlanningData(tokens=tokens, cue=cue, cue_pos=cue_pos, word=word)


CIRCUIT_CUE_POS = 3


def circuit_prompts(n: int = 48, seed: int = 0) -> CircuitPrompts:
    """Prompts with the cue at CIRCUIT_CUE_POS. Corrupt: another cue (another word); the clean
    word stays in the tokens (teacher forcing). The metric reads the word's four syllables at
    ``say`` and the three positions after it. Roles: ``cue``, ``say``, ``w1``..``w3``."""
    d = dataset(n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    tokens = d.tokens.clone()
    rows = torch.arange(n)
    filler = torch.randint(FILLER0, FILLER0 + N_FILLERS, (n,), generator=g)
    tokens[rows, d.cue_pos] = filler  # the cue moves to CIRCUIT_CUE_POS
    tokens[:, CIRCUIT_CUE_POS] = d.cue
    corrupt = tokens.clone()
    shift = torch.randint(1, N_CUES, (n,), generator=g)
    corrupt[:, CIRCUIT_CUE_POS] = CUE0 + (d.cue - CUE0 + shift) % N_CUES
    roles = {"bos": 0, "cue": CIRCUIT_CUE_POS, "say": SAY_POS, "w1": WORD_POS, "w2": WORD_POS + 1,
             "w3": WORD_POS + 2}
    pos = tuple(range(SAY_POS, SAY_POS + WORD_LEN))
    return CircuitPrompts(clean=tokens, corrupt=corrupt, answer=d.word, answer_pos=pos, roles=roles,
                          candidates=(0, CIRCUIT_CUE_POS, CIRCUIT_CUE_POS + 1, SAY_POS - 1, *pos))


def _sampler(step: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    data = dataset(BATCH, int(torch.randint(0, 2**62, (1,), generator=g)))
    targets = torch.full_like(data.tokens, IGNORE)
    targets[:, SAY_POS:-1] = data.tokens[:, SAY_POS + 1:]  # the word and the final "."
    return data.tokens, targets


def train(steps: int = DEFAULT_STEPS, seed: int = 0, progress: bool = True,
          threads: int | None = 1) -> tuple[HookedTransformer, TrainLog]:
    """Train from scratch (AdamW 1e-3, batch 64, loss on the word tokens and the final '.')."""
    model = init_model(config(), seed)
    tc = TrainConfig(steps=steps, lr=1e-3, warmup=100, seed=seed, threads=threads)
    log = fit(model, _sampler, tc, progress=progress, desc=NAME)
    return model, log


@torch.inference_mode()
def evaluate(model: HookedTransformer, n: int = 1000, seed: int = 1) -> dict[str, object]:
    """Whole-word accuracy and the accuracy of each syllable x_{t+1}..x_{t+4}."""
    data = dataset(n, seed)
    logits = logits_in_batches(model, data.tokens)
    pred = logits[:, SAY_POS:SAY_POS + WORD_LEN].argmax(-1).cpu()  # predictions of x_{t+1..t+4}
    correct = (pred == data.word).float()
    return {
        "word_accuracy": float(correct.min(1).values.mean()),
        "syllable_accuracy": [round(float(v), 4) for v in correct.mean(0)],
        "n_eval": n,
        "eval_seed": seed,
    }


def prompts(n: int, seed: int):  # noqa: ANN201
    """`dataset(n, seed)` as `interp.prompts.Prompts` (the whole sequence, word included) with the
    spans `plan` (the ``say`` position t, where the word is determined), `cue` and `word`."""
    from interp.prompts import Prompts

    d = dataset(n, seed)
    return Prompts.from_tokens(d.tokens, spans={"plan": d.plan_pos, "cue": d.cue_pos,
                                                "word": torch.stack([d.word_pos, d.word_pos + WORD_LEN], 1)})
