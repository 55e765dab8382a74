"""Tokenizers and token batches.

Public APIs take token tensors. Text goes through the small `Tokenizer` protocol (encode/decode)
so Hugging Face tokenizers and the organisms' own vocabularies work alike.

Batches of prompts of different lengths are a known silent-error source: under left padding a
naive forward gives every prompt the wrong positions. `Batch` records each prompt's length and
padding side; the toolkit always *computes* on the right-padded layout (for a causal model the
pads after a prompt cannot influence it, and its positions start at 0, exactly as if run alone)
and maps results back to the caller's layout.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch
from jaxtyping import Bool, Int
from torch import Tensor

Side = Literal["left", "right"]


@runtime_checkable
class Tokenizer(Protocol):
    """Anything that turns text into token ids and back."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class VocabTokenizer:
    """A whitespace tokenizer over a fixed vocabulary (the organisms' tokenizer)."""

    vocab: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("VocabTokenizer: expected unique token strings, got duplicates")
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.vocab)})

    def encode(self, text: str) -> list[int]:
        index: dict[str, int] = self._index  # type: ignore[attr-defined]
        out = []
        for word in text.split():
            if word not in index:
                raise ValueError(f"token {word!r}: expected one of the {len(self.vocab)} vocabulary "
                                 f"strings, got an unknown token")
            out.append(index[word])
        return out

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return " ".join(self.vocab[i] for i in ids)

    @staticmethod
    def load(path: str | Path) -> VocabTokenizer:
        data = json.loads(Path(path).read_text())
        return VocabTokenizer(tuple(data["vocab"]))


class HFTokenizer:
    """Adapts a Hugging Face tokenizer (e.g. `model.tokenizer`) to the `Tokenizer` protocol."""

    def __init__(self, hf_tokenizer: object, prepend_bos: bool = True) -> None:
        self.hf = hf_tokenizer
        self.prepend_bos = prepend_bos

    def encode(self, text: str) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
        bos = getattr(self.hf, "bos_token_id", None)
        return ([bos] if self.prepend_bos and bos is not None else []) + list(ids)

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return self.hf.decode(ids)  # type: ignore[attr-defined]


def check_tokens(tokens: object, d_vocab: int | None = None, name: str = "tokens", *,
                 n_ctx: int | None = None) -> Tensor:
    """Validate a token tensor: the one token check every entry point uses.

    Integer dtype, shape (batch, pos) with at least one row and one position, ids in
    [0, d_vocab) and at most `n_ctx` positions (when given). Returns the tokens as torch.long. A token id of -1 would silently
    index the last embedding row, and a sequence longer than n_ctx fails deep inside the
    positional embedding: both are refused here with what was expected.
    """
    if not isinstance(tokens, Tensor):
        hint = ("; pass batch.tokens, or use an entry point that accepts a padded interp.tokens.Batch"
                if isinstance(tokens, Batch) else "")
        raise TypeError(f"{name}: expected an integer torch.Tensor of shape (batch, pos), "
                        f"got {type(tokens).__name__}{hint}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
        raise TypeError(f"{name}: expected an integer dtype (torch.long), got {tokens.dtype}")
    if tokens.ndim != 2:
        raise ValueError(f"{name}: expected shape (batch, pos), got {tuple(tokens.shape)}"
                         + ("; add a batch axis with tokens[None]" if tokens.ndim == 1 else ""))
    if tokens.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one prompt (row), got shape {tuple(tokens.shape)}")
    if tokens.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one position, got shape {tuple(tokens.shape)}")
    if n_ctx is not None and tokens.shape[1] > n_ctx:
        raise ValueError(f"{name}: expected at most n_ctx={n_ctx} positions (the model's context "
                         f"length), got {tokens.shape[1]}; truncate or split the prompts")
    if d_vocab is not None:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= d_vocab:
            bad = torch.nonzero((tokens < 0) | (tokens >= d_vocab))[0].tolist()
            raise ValueError(f"{name}: expected ids in [0, {d_vocab}), got values in [{lo}, {hi}] "
                             f"(first at row {bad[0]}, position {bad[1]}); pad ids too must be "
                             f"valid tokens")
    # one index dtype downstream (jaxtyping's Int excludes uint8; hooks and stores see long ids)
    return tokens if tokens.dtype == torch.long else tokens.long()


def check_model_tokens(model: object, tokens: object, name: str = "tokens") -> Tensor:
    """`check_tokens` against a model's vocabulary and context length."""
    from interp.arch import Arch

    arch = Arch.of(model)  # type: ignore[arg-type]
    return check_tokens(tokens, arch.d_vocab, name, n_ctx=arch.n_ctx)


@dataclass(frozen=True)
class Batch:
    """Padded prompts: `tokens` [batch, pos], each prompt's true `lengths`, and the pad side."""

    tokens: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, "batch"]
    side: Side = "right"

    def __post_init__(self) -> None:
        check_tokens(self.tokens)
        if self.side not in ("left", "right"):
            raise ValueError(f"Batch.side: expected 'left' or 'right', got {self.side!r}")
        if self.lengths.shape != (self.tokens.shape[0],):
            raise ValueError(f"Batch.lengths: expected shape ({self.tokens.shape[0]},), "
                             f"got {tuple(self.lengths.shape)}")
        if int(self.lengths.min()) < 1 or int(self.lengths.max()) > self.tokens.shape[1]:
            raise ValueError(f"Batch.lengths: expected values in [1, {self.tokens.shape[1]}], got "
                             f"[{int(self.lengths.min())}, {int(self.lengths.max())}]")

    @staticmethod
    def pad(seqs: Sequence[Sequence[int] | Tensor], side: Side = "right", pad_id: int = 0) -> Batch:
        """Pad token sequences of different lengths into one batch."""
        if not seqs:
            raise ValueError("Batch.pad: expected at least one sequence, got none")
        rows = [torch.as_tensor(s, dtype=torch.long).flatten() for s in seqs]
        lengths = torch.tensor([len(r) for r in rows])
        width = int(lengths.max())
        out = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            if side == "right":
                out[i, : len(r)] = r
            else:
                out[i, width - len(r):] = r
        return Batch(out, lengths, side)

    @staticmethod
    def of(tokens: Tensor) -> Batch:
        """A batch with no padding."""
        tokens = check_tokens(tokens)
        return Batch(tokens, torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long))

    @property
    def mask(self) -> Bool[Tensor, "batch pos"]:
        """True at real (non-pad) positions, in this batch's own layout."""
        ar = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        lengths = self.lengths.to(self.tokens.device)
        if self.side == "right":
            return ar[None, :] < lengths[:, None]
        return ar[None, :] >= (self.tokens.shape[1] - lengths)[:, None]

    @property
    def last(self) -> Int[Tensor, "batch"]:
        """Index of each prompt's last real token, in this batch's own layout."""
        if self.side == "right":
            return self.lengths - 1
        return torch.full_like(self.lengths, self.tokens.shape[1] - 1)

    def shift(self) -> Int[Tensor, "batch"]:
        """Offset from the right-padded layout to this one (0 for right padding)."""
        return self.tokens.shape[1] - self.lengths if self.side == "left" else torch.zeros_like(self.lengths)

    def right(self) -> Batch:
        """The same prompts, right-padded (the layout the toolkit computes on)."""
        if self.side == "right":
            return self
        return Batch(realign(self.tokens, -self.shift()), self.lengths, "right")

    def to_layout(self, x: Tensor, pos_dim: int = 1) -> Tensor:
        """Map a tensor computed on the right-padded layout back to this batch's layout."""
        if self.side == "right":
            return x
        return realign(x, self.shift(), pos_dim)


def realign(x: Tensor, shift: Int[Tensor, "batch"], pos_dim: int = 1) -> Tensor:
    """Roll each example's `pos_dim` axis by its own `shift` (positive: to the right)."""
    n = x.shape[pos_dim]
    ar = torch.arange(n, device=x.device)
    src = (ar[None, :] - shift.to(x.device)[:, None]) % n  # [batch, pos]
    shape = [1] * x.ndim
    shape[0], shape[pos_dim] = x.shape[0], n
    idx = src.reshape(shape).expand(*[x.shape[d] if d not in (0, pos_dim) else shape[d]
                                      for d in range(x.ndim)])
    return torch.gather(x, pos_dim, idx)
