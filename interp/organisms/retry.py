"""`retry` and `retry-clean`: a step-by-step chain with occasional wrong steps, a back-off marker and
the correct step (Ye et al. 2024, "Physics of Language Models: Part 2.2, How to Learn From
Mistakes on Grade-School Math Problems"), next to the same architecture trained on error-free
chains (the control).

Task: a stride token ``d1/d2/d3/d5`` and a start number, then the chain of numbers ``n0..n15``
that adds the stride modulo 16 at every step; each step is determined by the previous one and the
stride (context), never by the position:

    <bos> d3 n4 n7 n10 n13 n0 n3 n6 n9 n12 n15 n2 n5          (error-free)
    <bos> d3 n4 n7 n10 n2 <back> n13 n0 n3 n6 n9 n12 n15     (retry data: a wrong step n2, the
                                                              marker, then the correct step n13)

`retry` is trained on chains half of which hold one wrong step (a uniformly drawn wrong number at
a random step, never the first); the loss on the wrong number itself is masked (the model is not
taught to make errors), the loss on ``<back>`` after it and on the correct step after ``<back>``
is kept. `retry-clean` is trained on error-free chains only, same architecture, optimiser, steps
and seed. Held-out acceptance (`evaluate`): on error-free chains both predict every next step;
after a teacher-forced wrong step `retry` predicts ``<back>`` and then the correct step, and
never predicts ``<back>`` after a correct step; `retry-clean` never predicts ``<back>``.

Known mechanism (measured, not hard-coded): detecting a wrong step x at position p needs the
expected number there, (number at p - 1) + stride, which the model already computes at p - 1 as
its own prediction; so the retry model reads it from the K/V of the pre-surprise positions and
compares it with the token at p: a linear probe at p reads "last step was wrong" before
``<back>`` is emitted, and the error-free model's residual at p holds no such signal (its
next-step prediction needs only x and the stride). `probe_data` builds the balanced probe set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from interp.organisms.base import Criterion
from interp.organisms.training import IGNORE, TrainConfig, TrainLog, fit, init_model, logits_in_batches
from interp.tl import HookedTransformer, HookedTransformerConfig
from interp.tokens import VocabTokenizer

NAME = "retry"
CONTROL = "retry-clean"
TASK = ("a chain of numbers mod 16 that adds an in-context stride at every step; half the training chains "
        "hold one wrong step followed by a back-off marker and the correct step (loss on the wrong step masked)")
CONTROL_TASK = "the same chains without errors (the error-free control)"
MECHANISM = ("the expected step (previous number + stride, the model's own prediction one position earlier) "
             "is read through K/V and compared with the token: a wrong step is detected before <back> is emitted")
CONTROL_MECHANISM = "none: never trained on errors, so nothing detects a wrong step (it continues from it)"
N_NUMBERS = 16
STRIDES = (1, 3, 5, 7)
N_STEPS = 12  # numbers in an error-free chain
FIRST = 2  # position of the first number
SEQ_LEN = FIRST + N_STEPS  # 14: an error chain has N_STEPS - 2 numbers + wrong step + <back> + ... same length
ERROR_RATE = 0.5  # share of retry training chains holding one wrong step
BATCH = 64
DEFAULT_STEPS = 3000

BOS = 0
STRIDE0 = 1
NUM0 = STRIDE0 + len(STRIDES)
BACK = NUM0 + N_NUMBERS
D_VOCAB = BACK + 1

ACCEPTANCE = (
    Criterion(metric="step_accuracy", op=">=", threshold=0.98,
              what="share of held-out error-free steps predicted correctly"),
    Criterion(metric="backoff_rate", op=">=", threshold=0.9,
              what="share of teacher-forced wrong steps after which <back> is predicted"),
    Criterion(metric="repair_accuracy", op=">=", threshold=0.9,
              what="share of <back> markers after which the correct step is predicted"),
    Criterion(metric="false_backoff_rate", op="<=", threshold=0.02,
              what="share of correct steps after which <back> is predicted"),
)
CONTROL_ACCEPTANCE = (
    Criterion(metric="step_accuracy", op=">=", threshold=0.98,
              what="share of held-out error-free steps predicted correctly"),
    Criterion(metric="backoff_rate", op="<=", threshold=0.02,
              what="share of teacher-forced wrong steps after which <back> is predicted (a control: never)"),
)


def tokenizer() -> VocabTokenizer:
    """``<bos>``, strides ``d1 d3 d5 d7``, numbers ``n0``..``n15``, ``<back>``."""
    return VocabTokenizer(("<bos>",) + tuple(f"d{s}" for s in STRIDES)
                          + tuple(f"n{i}" for i in range(N_NUMBERS)) + ("<back>",))


def config() -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=SEQ_LEN, d_vocab=D_VOCAB,
        act_fn="gelu", normalization_type="LN", positional_embedding_type="standard",
        original_architecture="interp-organism-retry", seed=None, dtype=torch.float32, device="cpu")


@dataclass(frozen=True)
class RetryData:
    """Chains and their ground truth. `error_pos` is the position of the wrong step (-1: none);
    `wrong` the wrong number's token, `correct` the step's correct token (at `error_pos` in the
    error-free chain, and at `error_pos + 2`, after ``<back>``, in this one). `step` marks the
    positions whose next token is a chain step (the number after a number or after ``<back>``)."""

    tokens: Int[Tensor, "n pos"]
    stride: Int[Tensor, "n"]
    start: Int[Tensor, "n"]
    error_pos: Int[Tensor, "n"]
    wrong: Int[Tensor, "n"]
    correct: Int[Tensor, "n"]

    @property
    def has_error(self) -> Bool[Tensor, "n"]:
        return self.error_pos >= 0

    @property
    def step(self) -> Bool[Tensor, "n pos"]:
        n, t = self.tokens.shape
        pos = torch.arange(t)[None]
        out = (pos >= FIRST) & (pos < t - 1)
        e = self.error_pos[:, None]
        return out & ~((e >= 0) & ((pos == e - 1) | (pos == e)))  # the wrong step and the marker's slot


def chains(start: Tensor, stride: Tensor, n: int) -> Int[Tensor, "b n"]:
    """Number tokens of the chains start, start + d, ... (mod 16)."""
    i = torch.arange(n)[None]
    return NUM0 + (start[:, None] + i * stride[:, None]) % N_NUMBERS


def dataset(n: int, seed: int, error_rate: float = 0.0, error_pos: Tensor | None = None) -> RetryData:
    """`n` chains, deterministic in `seed`; a share `error_rate` hold one wrong step (at a
    random step 1..N_STEPS-3, or at the given positions, -1 = none)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, N_NUMBERS, (n,), generator=g)
    stride = torch.tensor(STRIDES)[torch.randint(0, len(STRIDES), (n,), generator=g)]
    nums = chains(start, stride, N_STEPS)
    j = torch.randint(1, N_STEPS - 2, (n,), generator=g)  # index of the wrong step in the chain
    err = torch.rand(n, generator=g) < error_rate
    shift = torch.randint(1, N_NUMBERS, (n,), generator=g)
    if error_pos is not None:
        err = error_pos >= 0
        j = (error_pos - FIRST).clamp_min(1)
        if bool(((j[err] < 1) | (j[err] > N_STEPS - 3)).any()):
            raise ValueError(f"retry dataset error_pos: expected -1 or positions in [{FIRST + 1}, "
                             f"{FIRST + N_STEPS - 3}], got {error_pos.tolist()}")
    bos = torch.full((n, 1), BOS)
    tokens = torch.cat([bos, (STRIDE0 + torch.tensor([STRIDES.index(int(s)) for s in stride]))[:, None], nums], 1)
    rows = torch.arange(n)
    correct = nums[rows, j]
    wrong = NUM0 + (correct - NUM0 + shift) % N_NUMBERS
    for i in torch.nonzero(err)[:, 0].tolist():
        k = int(j[i])
        row = torch.cat([nums[i, :k], torch.tensor([int(wrong[i]), BACK]), nums[i, k:N_STEPS - 2]])
        tokens[i, FIRST:] = row
    epos = torch.where(err, FIRST + j, torch.full_like(j, -1))
    return RetryData(tokens=tokens, stride=stride, start=start, error_pos=epos, wrong=wrong, correct=correct)


def targets(d: RetryData) -> Int[Tensor, "n pos"]:
    """Next-token targets: every chain step, ``<back>`` after a wrong step, the correct step after
    ``<back>``; the wrong step itself (target of the position before it) and the start are masked."""
    t = torch.full_like(d.tokens, IGNORE)
    t[:, FIRST:-1] = d.tokens[:, FIRST + 1:]
    e = d.error_pos
    rows = torch.nonzero(e >= 0)[:, 0]
    t[rows, e[rows] - 1] = IGNORE
    return t


def _sampler(error_rate: float):  # noqa: ANN202
    def sample(step: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        d = dataset(BATCH, int(torch.randint(0, 2**62, (1,), generator=g)), error_rate)
        return d.tokens, targets(d)
    return sample


def train(steps: int = DEFAULT_STEPS, seed: int = 0, progress: bool = True, threads: int | None = 1,
          error_rate: float = ERROR_RATE) -> tuple[HookedTransformer, TrainLog]:
    """Train from scratch (AdamW 1e-3, batch 64); `error_rate` 0 trains the error-free control."""
    model = init_model(config(), seed)
    tc = TrainConfig(steps=steps, lr=1e-3, warmup=100, seed=seed, threads=threads)
    return model, fit(model, _sampler(error_rate), tc, progress=progress, desc=NAME if error_rate else CONTROL)


def forced_errors(n: int, seed: int) -> RetryData:
    """Held-out chains, each with one wrong step at a random step (teacher-forced errors)."""
    g = torch.Generator().manual_seed(seed + 7)
    pos = FIRST + torch.randint(1, N_STEPS - 2, (n,), generator=g)
    return dataset(n, seed, error_pos=pos)


@torch.inference_mode()
def evaluate(model: HookedTransformer, n: int = 1000, seed: int = 1) -> dict[str, object]:
    """Held-out next-step accuracy on error-free chains, and after teacher-forced wrong steps:
    the share predicting ``<back>`` at the wrong step, the correct step after ``<back>``, and
    ``<back>`` after correct steps (false alarms)."""
    clean = dataset(n, seed)
    pred = logits_in_batches(model, clean.tokens).argmax(-1).cpu()
    step = clean.step
    ok = (pred[:, :-1] == clean.tokens[:, 1:])[step[:, :-1]]
    false = (pred[:, :-1] == BACK)[step[:, :-1]]
    err = forced_errors(n, seed + 1)
    pe = logits_in_batches(model, err.tokens).argmax(-1).cpu()
    rows = torch.arange(n)
    back = pe[rows, err.error_pos] == BACK
    repair = pe[rows, err.error_pos + 1] == err.correct
    return {
        "step_accuracy": float(ok.double().mean()),
        "backoff_rate": float(back.double().mean()),
        "repair_accuracy": float(repair.double().mean()),
        "false_backoff_rate": float(false.double().mean()),
        "n_eval": n,
        "eval_seed": seed,
    }


@dataclass(frozen=True)
class ProbeData:
    """Balanced probe set for "the last step was wrong": chains with a wrong step at `pos` (label
    1) and error-free chains (label 0) read at the same position; the token there is uniform over
    the numbers under both labels, so it carries no label information by itself."""

    tokens: Int[Tensor, "n pos"]
    pos: Int[Tensor, "n"]
    label: Int[Tensor, "n"]


def probe_data(n: int, seed: int) -> ProbeData:
    """`n` chains (half with a wrong step) and the position to read, the wrong step's or the same
    position of an error-free chain."""
    g = torch.Generator().manual_seed(seed + 11)
    pos = FIRST + torch.randint(1, N_STEPS - 2, (n,), generator=g)
    label = (torch.arange(n) % 2 == 0).long()
    d = dataset(n, seed, error_pos=torch.where(label.bool(), pos, torch.full_like(pos, -1)))
    return ProbeData(tokens=d.tokens, pos=pos, label=label)


def prompts(n: int, seed: int, error_rate: float = 0.0):  # noqa: ANN201
    """`dataset(n, seed, error_rate)` as `interp.prompts.Prompts` with the spans `error` (the wrong
    step's position; -1 rows get the last position) and `stride`."""
    from interp.prompts import Prompts

    d = dataset(n, seed, error_rate)
    pos = torch.where(d.has_error, d.error_pos, torch.full_like(d.error_pos, SEQ_LEN - 1))
    return Prompts.from_tokens(d.tokens, spans={"error": pos, "stride": torch.ones_like(pos)})


@dataclass(frozen=True)
class Variant:
    """`retry` or its error-free control `retry-clean` (what `interp.organisms.get` returns)."""

    NAME: str
    error_rate: float
    ACCEPTANCE: tuple[Criterion, ...]
    TASK: str = TASK
    MECHANISM: str = MECHANISM
    DEFAULT_STEPS: int = DEFAULT_STEPS

    def config(self) -> HookedTransformerConfig:
        return config()

    def tokenizer(self) -> VocabTokenizer:
        return tokenizer()

    def dataset(self, n: int, seed: int) -> RetryData:
        return dataset(n, seed, self.error_rate)

    def train(self, steps: int = DEFAULT_STEPS, seed: int = 0, progress: bool = True,
              threads: int | None = 1) -> tuple[HookedTransformer, TrainLog]:
        return train(steps, seed, progress, threads, error_rate=self.error_rate)

    def evaluate(self, model: HookedTransformer, n: int = 1000, seed: int = 1) -> dict[str, object]:
        return evaluate(model, n, seed)


def variant(name: str) -> Variant:
    """``retry`` or the error-free control ``retry-clean``."""
    if name == NAME:
        return Variant(NAME=NAME, error_rate=ERROR_RATE, ACCEPTANCE=ACCEPTANCE)
    if name == CONTROL:
        return Variant(NAME=CONTROL, error_rate=0.0, ACCEPTANCE=CONTROL_ACCEPTANCE, TASK=CONTROL_TASK,
                       MECHANISM=CONTROL_MECHANISM)
    raise ValueError(f"retry variant: expected {NAME!r} or {CONTROL!r}, got {name!r}")
