"""Prompt datasets on disk: JSONL files of token ids or text, read with line-numbered errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from interp.tokens import Batch, Side, Tokenizer


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) pairs of a JSONL file; a malformed line is reported by number."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dataset {p}: expected a JSONL file, got no such file")
    any_record = False
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"dataset {p} line {lineno}: expected a JSON object, got invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"dataset {p} line {lineno}: expected a JSON object, got {type(rec).__name__}")
            any_record = True
            yield lineno, rec
    if not any_record:
        raise ValueError(f"dataset {p}: expected at least one record, got an empty file")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file (see `iter_jsonl`)."""
    return [rec for _, rec in iter_jsonl(path)]


def read_token_jsonl(path: str | Path, *, tokenizer: Tokenizer | None = None, side: Side = "right") -> Batch:
    """A padded batch from a JSONL file whose records hold "tokens" (ids) or "text" (needs a tokenizer)."""
    seqs: list[list[int]] = []
    for lineno, rec in iter_jsonl(path):
        if "tokens" in rec:
            toks = rec["tokens"]
            if not isinstance(toks, list) or not toks or not all(isinstance(t, int) and t >= 0 for t in toks):
                raise ValueError(f"dataset {path} line {lineno}: expected 'tokens' to be a non-empty list of "
                                 f"non-negative ints, got {str(toks)[:80]}")
            seqs.append(toks)
        elif "text" in rec:
            if tokenizer is None:
                raise ValueError(f"dataset {path} line {lineno}: expected 'tokens' (no tokenizer is known "
                                 f"for this model), got 'text'")
            seqs.append(tokenizer.encode(str(rec["text"])))
        else:
            raise ValueError(f"dataset {path} line {lineno}: expected a 'tokens' or 'text' field, got keys "
                             f"{sorted(rec)}")
    return Batch.pad(seqs, side=side)


# ------------------------------------------------------------------ prompt sets for pretrained models

_RETRIEVAL_KEYS = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack",
                   "Karen", "Leo", "Maria", "Nathan", "Olivia", "Peter", "Quinn", "Rachel", "Steve",
                   "Tina", "Ursula", "Victor", "Wendy", "Xavier", "Yvonne", "Zach")


def retrieval_prompts(n: int, n_pairs: int = 12, seed: int = 0) -> list[dict[str, Any]]:
    """Distance-controlled key->value retrieval prompts in plain English (for pretrained models).

    Each prompt lists `n_pairs` lines "NAME's number is DD." and ends "So NAME's number is"; the
    queried line sits `distance` lines before the query (1 = the last line), cycling through
    every distance so that each is equally represented.
    """
    if not 1 <= n_pairs <= len(_RETRIEVAL_KEYS):
        raise ValueError(f"retrieval_prompts: expected 1 <= n_pairs <= {len(_RETRIEVAL_KEYS)}, got {n_pairs}")
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        keys = rng.sample(_RETRIEVAL_KEYS, n_pairs)
        values = [rng.randint(10, 99) for _ in keys]
        distance = 1 + i % n_pairs
        q = n_pairs - distance
        lines = [f"{k}'s number is {v}." for k, v in zip(keys, values, strict=True)]
        text = " ".join(lines) + f" So {keys[q]}'s number is"
        out.append({"text": text, "key": keys[q], "answer": f" {values[q]}", "distance": distance,
                    "line": q, "n_pairs": n_pairs})
    return out
