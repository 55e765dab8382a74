"""Prompts: the one value every method takes — padded tokens, named positions, answers, partners.

A researcher's prompts differ in length, names span several tokens and answers can be several
tokens long. `Prompts` carries all of it end to end:

- padded tokens (left or right) with each prompt's length (it *is* an `interp.tokens.Batch`, so
  every entry point that takes a padded batch takes prompts);
- per-example **named positions**, each a span ``[start, end)`` of token indices counted from the
  prompt's first real token (its *prompt coordinates*, the same under left and right padding).
  ``index(name)`` is the span's last token (the usual read-out: a subject's last token);
  ``last`` is always defined: the prompt's last token, the one whose logits predict the answer;
- per-example **answers** of one or several tokens. A multi-token answer is teacher-forced: its
  tokens but the last are appended after the prompt (they are part of ``tokens`` and of
  ``lengths``), so the logits at ``last + j`` predict answer token ``j``. The named span
  ``answer`` covers those read-out positions;
- an optional **partner**: counterfactual prompts (e.g. corrupted by symmetric token replacement)
  with their own positions and answers.

Builders: `Prompts.from_tokens` (token lists), `Prompts.from_text` (text plus character spans,
with any tokenizer: a Hugging Face fast tokenizer through its offsets, or the toolkit's
`Tokenizer` protocol through prefix encodings) and `read_prompts` (a JSONL prompt set; schema in
its docstring). The toolkit computes on the right-padded layout (`Prompts.right()`); named
positions need no change there because they are in prompt coordinates.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from interp.tokens import Batch, HFTokenizer, Side, Tokenizer, check_tokens

LAST = "last"
ANSWER = "answer"
RESERVED = (LAST, ANSWER)

SpanLike = int | tuple[int, int] | Sequence[int]


def _spans(name: str, value: object, lengths: Tensor) -> Int[Tensor, "batch 2"]:
    """Per-example spans from ints (one token; negative counts from the prompt's end), (start, end)
    pairs, or a [batch] / [batch, 2] integer tensor, checked against each prompt's length."""
    b = lengths.shape[0]
    t = value if isinstance(value, Tensor) else None
    if t is None:
        rows = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
        if rows is None or len(rows) != b:
            raise ValueError(f"position {name!r}: expected one int or (start, end) per prompt ({b}), got {value!r}")
        out = []
        for i, r in enumerate(rows):
            if isinstance(r, (int, Tensor)) and not isinstance(r, bool) and torch.as_tensor(r).ndim == 0:
                p = int(r)
                out.append((p, p + 1))
            elif isinstance(r, Sequence) and len(r) == 2 and all(isinstance(x, int) for x in r):
                out.append((int(r[0]), int(r[1])))
            else:
                raise ValueError(f"position {name!r} of prompt {i}: expected an int or a (start, end) pair, got {r!r}")
        t = torch.tensor(out, dtype=torch.long)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"position {name!r}: expected integer indices, got {t.dtype}")
    t = t.long().cpu()
    if t.shape == (b,):
        t = torch.stack([t, t + 1], dim=1)
    if t.shape != (b, 2):
        raise ValueError(f"position {name!r}: expected shape ({b},) or ({b}, 2), got {tuple(t.shape)}")
    neg = t[:, 0] < 0
    t = torch.where(neg[:, None], t + lengths[:, None], t)  # -1 is each prompt's own last token
    bad = (t[:, 0] < 0) | (t[:, 1] <= t[:, 0]) | (t[:, 1] > lengths)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"position {name!r} of prompt {i}: expected a non-empty span inside its "
                         f"{int(lengths[i])} tokens, got [{int(t[i, 0])}, {int(t[i, 1])})")
    return t


@dataclass(frozen=True)
class Prompts(Batch):
    """Padded prompts with named positions, answers and an optional partner (see the module doc).

    `prompt_lengths` are the prompts' lengths without the teacher-forced answer tokens;
    `lengths` (from `Batch`) include them. `answers` is [batch, k] padded with -1 after each
    example's `answer_lengths`; None when the prompts carry no answers.
    """

    prompt_lengths: Int[Tensor, "batch"] | None = None
    spans: Mapping[str, Any] = field(default_factory=dict)  # name -> [batch, 2] spans once built
    answers: Int[Tensor, "batch k"] | None = None
    answer_lengths: Int[Tensor, "batch"] | None = None
    partner: Prompts | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        b = self.tokens.shape[0]
        lengths = self.lengths.long().cpu()
        object.__setattr__(self, "lengths", lengths)
        plen = lengths if self.prompt_lengths is None else torch.as_tensor(self.prompt_lengths).long().cpu()
        if plen.shape != (b,) or bool((plen < 1).any()) or bool((plen > lengths).any()):
            raise ValueError(f"Prompts.prompt_lengths: expected {b} values in [1, length], got {plen.tolist()}")
        object.__setattr__(self, "prompt_lengths", plen)
        spans = {}
        for name, v in dict(self.spans).items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"Prompts.spans: expected non-empty str names, got {name!r}")
            spans[name] = _spans(name, v, lengths)
        if self.answers is not None:
            ans = torch.as_tensor(self.answers).long().cpu()
            if ans.ndim == 1:
                ans = ans[:, None]
            if ans.ndim != 2 or ans.shape[0] != b or ans.shape[1] < 1:
                raise ValueError(f"Prompts.answers: expected shape ({b}, k >= 1), got {tuple(ans.shape)}")
            alen = (ans >= 0).sum(1) if self.answer_lengths is None else torch.as_tensor(self.answer_lengths).long().cpu()
            if alen.shape != (b,) or bool((alen < 1).any()) or bool((alen > ans.shape[1]).any()):
                raise ValueError(f"Prompts.answer_lengths: expected {b} values in [1, {ans.shape[1]}], got {alen.tolist()}")
            cols = torch.arange(ans.shape[1])[None]
            if bool((ans[cols < alen[:, None]] < 0).any()):
                raise ValueError("Prompts.answers: expected token ids >= 0 within each answer's length, got -1 inside one")
            if not torch.equal(plen + alen - 1, lengths):
                i = int(torch.nonzero(plen + alen - 1 != lengths)[0, 0])
                raise ValueError(f"Prompts: prompt {i} expected length prompt + answer - 1 = "
                                 f"{int(plen[i] + alen[i] - 1)} (teacher-forced answer tokens but the last), "
                                 f"got {int(lengths[i])}")
            forced = Batch.right(self).tokens
            for j in range(1, ans.shape[1]):
                rows = alen > j
                if bool(rows.any()):
                    at = (plen - 1 + j)[rows]
                    if not torch.equal(forced.cpu()[rows, at], ans[rows, j - 1]):
                        raise ValueError(f"Prompts.answers: expected answer token {j - 1} to follow each prompt "
                                         f"(teacher forcing), got different tokens there")
            object.__setattr__(self, "answers", torch.where(cols < alen[:, None], ans, -1))
            object.__setattr__(self, "answer_lengths", alen)
            spans[ANSWER] = torch.stack([plen - 1, plen - 1 + alen], dim=1)
        elif not torch.equal(plen, lengths):
            raise ValueError("Prompts.prompt_lengths: expected the full lengths when there are no answers")
        spans[LAST] = torch.stack([plen - 1, plen], dim=1)
        for name in RESERVED:
            given = self.spans.get(name) if isinstance(self.spans, Mapping) else None
            if given is not None and not torch.equal(_spans(name, given, lengths), spans.get(name, torch.empty(0))):
                raise ValueError(f"Prompts.spans: {name!r} is defined by the toolkit (the prompt's last token / the "
                                 f"answer's read-out span), got a different span for it; use another name")
        object.__setattr__(self, "spans", spans)
        if self.partner is not None:
            if not isinstance(self.partner, Prompts):
                raise TypeError(f"Prompts.partner: expected Prompts, got {type(self.partner).__name__}")
            if len(self.partner) != b:
                raise ValueError(f"Prompts.partner: expected {b} prompts (one per prompt), got {len(self.partner)}")

    # ---------------------------------------------------------------------------------- access

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.spans)

    def span(self, name: str) -> Int[Tensor, "batch 2"]:
        """Each prompt's ``[start, end)`` for `name`, in prompt coordinates."""
        if name not in self.spans:
            raise KeyError(f"position {name!r}: expected one of {sorted(self.spans)}, got an unknown name")
        return self.spans[name]

    def index(self, name: str) -> Int[Tensor, "batch"]:
        """Each prompt's index of `name` (a span's last token), in prompt coordinates (= the
        right-padded layout the toolkit computes on)."""
        return self.span(name)[:, 1] - 1

    def span_mask(self, name: str, width: int | None = None) -> Bool[Tensor, "batch pos"]:
        """[batch, width] True on the span `name`, in prompt coordinates (the right-padded layout)."""
        s = self.span(name)
        ar = torch.arange(self.tokens.shape[1] if width is None else width)
        return (ar[None] >= s[:, :1]) & (ar[None] < s[:, 1:])

    @property
    def first_answer(self) -> Int[Tensor, "batch"]:
        """Each example's first answer token (the one single-token metrics read)."""
        if self.answers is None:
            raise ValueError("Prompts.answers: expected answers for this metric, got prompts without answers; "
                             "build them with answers=...")
        return self.answers[:, 0]

    # ----------------------------------------------------------------------------- transforms

    def right(self) -> Prompts:
        """The same prompts, right-padded (the layout the toolkit computes on)."""
        if self.side == "right":
            return self
        return replace(self, tokens=Batch.right(self).tokens, side="right")

    def select(self, rows: Int[Tensor, "n"] | Sequence[int] | slice) -> Prompts:
        """A subset of the prompts (and of the partner), trimmed to its widest prompt."""
        idx = torch.arange(len(self))[rows] if isinstance(rows, slice) else torch.as_tensor(rows, dtype=torch.long)
        if idx.ndim != 1 or idx.numel() == 0:
            raise ValueError(f"Prompts.select: expected a non-empty 1-d index, got {rows!r}")
        r = self.right()
        lengths = r.lengths[idx]
        width = int(lengths.max())
        out = Prompts(r.tokens[idx.to(r.tokens.device), :width], lengths, "right", r.prompt_lengths[idx],
                      {k: v[idx] for k, v in r.spans.items() if k not in RESERVED},
                      None if r.answers is None else r.answers[idx],
                      None if r.answer_lengths is None else r.answer_lengths[idx],
                      None if r.partner is None else r.partner.select(idx))
        return out.to_side(self.side)

    def rows(self, sl: slice) -> Prompts:
        """Rows `sl` of the prompts (and of the partner), keeping the width and the side (a batch of
        a larger set: its tensors line up with the whole set's)."""
        if not isinstance(sl, slice):
            raise TypeError(f"Prompts.rows: expected a slice, got {type(sl).__name__}; use select() for indices")
        if not len(range(*sl.indices(len(self)))):
            raise ValueError(f"Prompts.rows: expected a non-empty slice of {len(self)} prompts, got {sl}")
        return Prompts(self.tokens[sl], self.lengths[sl], self.side, self.prompt_lengths[sl],
                       {k: v[sl] for k, v in self.spans.items() if k not in RESERVED},
                       None if self.answers is None else self.answers[sl],
                       None if self.answer_lengths is None else self.answer_lengths[sl],
                       None if self.partner is None else self.partner.rows(sl))

    def to_side(self, side: Side) -> Prompts:
        """The same prompts padded on `side`."""
        if side == self.side:
            return self
        r = self.right()
        if side == "right":
            return r
        shift = r.tokens.shape[1] - r.lengths
        from interp.tokens import realign

        return replace(r, tokens=realign(r.tokens, shift), side="left")

    def to(self, device: torch.device | str) -> Prompts:
        return replace(self, tokens=self.tokens.to(device),
                       partner=None if self.partner is None else self.partner.to(device))

    def with_partner(self, partner: Prompts | None) -> Prompts:
        return replace(self, partner=partner)

    def with_spans(self, **spans: object) -> Prompts:
        """These prompts with more named positions (ints, (start, end) pairs or tensors)."""
        keep = {k: v for k, v in self.spans.items() if k not in RESERVED}
        return replace(self, spans={**keep, **spans})

    # ------------------------------------------------------------------------------- builders

    @staticmethod
    def from_tokens(
        seqs: Sequence[Sequence[int] | Tensor] | Tensor,
        *,
        spans: Mapping[str, object] | None = None,
        answers: Sequence[Sequence[int] | int] | Tensor | None = None,
        partner: Prompts | None = None,
        side: Side = "right",
        pad_id: int = 0,
    ) -> Prompts:
        """Prompts from token sequences (a [batch, pos] tensor is prompts of one length).

        `spans` maps names to one int or (start, end) per prompt (prompt coordinates; negative
        ints count from the prompt's end). `answers`: one token id or a list of ids per prompt;
        multi-token answers are teacher-forced (their tokens but the last are appended)."""
        rows = [torch.as_tensor(s, dtype=torch.long).flatten().cpu() for s in
                (list(seqs) if not isinstance(seqs, Tensor) else list(check_tokens(seqs)))]
        if not rows or any(r.numel() == 0 for r in rows):
            raise ValueError("Prompts.from_tokens: expected at least one non-empty sequence, got an empty one or none")
        plen = torch.tensor([r.numel() for r in rows])
        ans, alen = None, None
        if answers is not None:
            items = answers.tolist() if isinstance(answers, Tensor) else list(answers)
            if len(items) != len(rows):
                raise ValueError(f"Prompts.from_tokens answers: expected one per prompt ({len(rows)}), got {len(items)}")
            lists = [[int(a)] if isinstance(a, int) else [int(x) for x in a] for a in items]
            if any(not a for a in lists):
                raise ValueError("Prompts.from_tokens answers: expected at least one token per answer, got an empty one")
            alen = torch.tensor([len(a) for a in lists])
            ans = torch.full((len(rows), int(alen.max())), -1, dtype=torch.long)
            for i, a in enumerate(lists):
                ans[i, : len(a)] = torch.tensor(a)
                rows[i] = torch.cat([rows[i], torch.tensor(a[:-1], dtype=torch.long)])
        b = Batch.pad(rows, side="right", pad_id=pad_id)
        out = Prompts(b.tokens, b.lengths, "right", plen, dict(spans or {}), ans, alen, partner)
        return out.to_side(side)

    @staticmethod
    def from_text(
        texts: Sequence[str],
        tokenizer: Any,
        *,
        spans: Mapping[str, Sequence[Sequence[int] | str]] | None = None,
        answers: Sequence[str] | None = None,
        partner: Prompts | None = None,
        side: Side = "right",
        pad_id: int | None = None,
        prepend_bos: bool | None = None,
    ) -> Prompts:
        """Prompts from text, with named character spans mapped to the tokens they cover.

        `tokenizer`: a Hugging Face fast tokenizer (offsets give the mapping), an `HFTokenizer`,
        or anything with the `Tokenizer` protocol (the mapping comes from encoding each span's
        prefix, which must tokenize as a prefix of the whole text). A span is a (start, end)
        character range or a substring (its first occurrence). Each answer is tokenized as the
        continuation of its prompt (``encode(prompt + answer)`` minus the prompt's tokens), so a
        leading space is handled by the tokenizer, not assumed. `prepend_bos` (HF tokenizers
        only): None (default) follows the tokenizer (an `HFTokenizer`'s own setting; a raw HF
        tokenizer's post-processor / ``add_bos_token``: Llama-style tokenizers prepend BOS,
        GPT-2-style ones do not); True / False force a BOS in or out."""
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"Prompts.from_text: expected a non-empty list of str, got {type(texts).__name__}")
        enc = _Encoder.of(tokenizer, prepend_bos)
        seqs, named = [], {k: [] for k in (spans or {})}
        ans_ids = [] if answers is not None else None
        if answers is not None and len(answers) != len(texts):
            raise ValueError(f"Prompts.from_text answers: expected one per prompt ({len(texts)}), got {len(answers)}")
        for i, text in enumerate(texts):
            ids, offsets = enc.encode(text)
            seqs.append(ids)
            for name, per in (spans or {}).items():
                if len(per) != len(texts):
                    raise ValueError(f"span {name!r}: expected one per prompt ({len(texts)}), got {len(per)}")
                named[name].append(_token_span(name, i, text, per[i], offsets))
            if ans_ids is not None:
                ans_ids.append(enc.continuation(text, answers[i], ids, i))
        return Prompts.from_tokens(seqs, spans=named, answers=ans_ids, partner=partner, side=side,
                                   pad_id=enc.pad_id if pad_id is None else pad_id)


def _token_span(name: str, i: int, text: str, span: Sequence[int] | str,
                offsets: list[tuple[int, int]]) -> tuple[int, int]:
    """The tokens whose characters overlap a character span (or the first occurrence of a string)."""
    if isinstance(span, str):
        start = text.find(span)
        if start < 0 or not span:
            raise ValueError(f"span {name!r} of prompt {i}: expected a substring of {text!r}, got {span!r}")
        lo, hi = start, start + len(span)
    else:
        if not (isinstance(span, Sequence) and len(span) == 2):
            raise ValueError(f"span {name!r} of prompt {i}: expected (start, end) characters or a substring, got {span!r}")
        lo, hi = int(span[0]), int(span[1])
        if not 0 <= lo < hi <= len(text):
            raise ValueError(f"span {name!r} of prompt {i}: expected 0 <= start < end <= {len(text)}, got ({lo}, {hi})")
    toks = [j for j, (a, b) in enumerate(offsets) if a < hi and b > lo and b > a]
    if not toks:
        raise ValueError(f"span {name!r} of prompt {i}: characters [{lo}, {hi}) of {text!r} cover no token")
    return toks[0], toks[-1] + 1


def special_prefix(hf: Any) -> list[int]:
    """The special tokens a Hugging Face tokenizer's own post-processor puts before a text (BOS for
    Llama / Gemma / Mistral tokenizers, nothing for GPT-2 / Qwen / GPT-NeoX ones): the ids that
    ``hf(text)`` has before ``hf(text, add_special_tokens=False)``. Suffixes (an EOS some
    tokenizers append) are not kept: the prompt's last token must be its own."""
    probe = "a b"
    plain = list(hf(probe, add_special_tokens=False)["input_ids"])
    full = list(hf(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


@dataclass(frozen=True)
class _Encoder:
    """Text -> token ids with per-token character offsets, for either kind of tokenizer."""

    tok: Any
    hf: Any | None
    prefix: tuple[int, ...]  # special tokens before every text (e.g. BOS)
    pad_id: int

    @staticmethod
    def of(tokenizer: Any, prepend_bos: bool | None) -> _Encoder:
        hf = tokenizer.hf if isinstance(tokenizer, HFTokenizer) else (
            tokenizer if callable(tokenizer) and getattr(tokenizer, "is_fast", False) else None)
        if hf is None and not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer: expected a Hugging Face fast tokenizer or an interp.tokens.Tokenizer "
                            f"(encode/decode), got {type(tokenizer).__name__}")
        prefix: list[int] = []
        if hf is not None:
            own = special_prefix(hf)  # the tokenizer's own convention (add_bos_token / post-processor)
            wrapped = isinstance(tokenizer, HFTokenizer) and prepend_bos is None
            want = tokenizer.prepend_bos if wrapped else prepend_bos
            bos = getattr(hf, "bos_token_id", None)
            if want is None or (want and bos is None and wrapped):
                prefix = own
            elif want:
                if bos is None:
                    raise ValueError(f"prepend_bos=True: expected a tokenizer with a BOS token, got "
                                     f"{type(hf).__name__} without one; pass prepend_bos=False or None")
                prefix = own if own[:1] == [bos] else [bos, *own]
            else:
                prefix = own[1:] if bos is not None and own[:1] == [bos] else own
        pad = getattr(hf, "pad_token_id", None) if hf is not None else None
        pad = pad if pad is not None else (getattr(hf, "eos_token_id", None) if hf is not None else None)
        return _Encoder(tokenizer, hf, tuple(int(t) for t in prefix), int(pad) if pad is not None else 0)

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if self.hf is not None:
            out = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = list(out["input_ids"]), [tuple(o) for o in out["offset_mapping"]]
            ids, offsets = [*self.prefix, *ids], [(0, 0)] * len(self.prefix) + offsets
            return ids, offsets  # type: ignore[return-value]
        ids = list(self.tok.encode(text))
        # offsets from prefix encodings: token j ends where the shortest prefix encoding to j+1 tokens does
        offsets, prev = [], 0

        def prefix(c: int) -> list[int]:
            try:
                return list(self.tok.encode(text[:c]))
            except ValueError:  # a cut word may be no token at all
                return []

        for j in range(len(ids)):
            end = next((c for c in range(prev + 1, len(text) + 1) if prefix(c)[: j + 1] == ids[: j + 1]), None)
            if end is None:
                raise ValueError(f"tokenizer {type(self.tok).__name__}: expected prefixes of {text!r} to encode as "
                                 f"prefixes of its tokens (needed to map character spans), got no match for token {j}")
            offsets.append((prev, end))
            prev = end
        return ids, offsets

    def continuation(self, text: str, answer: str, prompt_ids: list[int], i: int) -> list[int]:
        if not isinstance(answer, str) or not answer:
            raise ValueError(f"answer of prompt {i}: expected a non-empty str, got {answer!r}")
        full, _ = self.encode(text + answer)
        if full[: len(prompt_ids)] != prompt_ids or len(full) == len(prompt_ids):
            alone = self.encode(answer)[0]
            alone = alone[len(self.prefix):] if self.prefix and alone[:len(self.prefix)] == list(self.prefix) else alone
            if not alone:
                raise ValueError(f"answer of prompt {i}: {answer!r} encodes to no tokens")
            return alone
        return full[len(prompt_ids):]


# ------------------------------------------------------------------------------------ JSONL

def read_prompts(path: str | Path, tokenizer: Any, *, side: Side = "right", prepend_bos: bool | None = None,
                 limit: int | None = None) -> Prompts:
    """A JSONL prompt set as `Prompts` (with partners when every line has one).

    One JSON object per line::

        {"prompt": "The Eiffel Tower is in the city of", "answer": " Paris",
         "spans": {"subject": "Eiffel Tower", "relation": [19, 36]},
         "partner": {"prompt": "The Colosseum is in the city of", "answer": " Rome",
                     "spans": {"subject": "Colosseum"}}}

    `prompt` (required, str); `answer` (optional, str: the continuation, tokenized after the
    prompt, so include its leading space if the tokenizer needs one); `spans` (optional: name ->
    substring (first occurrence) or [start, end) character offsets); `partner` (optional: an
    object with the same keys, the counterfactual prompt). Either every line has an answer (or a
    partner) or none does. Unknown keys are refused. A bad line raises with its line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt set: expected a JSONL file, got {str(path)!r} (not found)")
    lines = []
    with path.open() as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                lines.append((n, _check_line(obj)))
            except (json.JSONDecodeError, ValueError, TypeError) as e:
                raise ValueError(f"{path}:{n}: {e}") from e
            if limit is not None and len(lines) >= limit:
                break
    if not lines:
        raise ValueError(f"prompt set {path}: expected at least one JSON line, got none")
    for key in ("answer", "partner", "spans"):
        has = [key in obj for _, obj in lines]
        if any(has) and not all(has):
            n = lines[has.index(False)][0]
            raise ValueError(f"{path}:{n}: expected {key!r} on every line (the first line with one is "
                             f"{lines[has.index(True)][0]}), got a line without it")
    names = [tuple(sorted(obj.get("spans", {}))) for _, obj in lines]
    if len(set(names)) > 1:
        n = lines[names.index(next(x for x in names if x != names[0]))][0]
        raise ValueError(f"{path}:{n}: expected the span names {list(names[0])} of the first line, got {list(set(names) - {names[0]})}")

    def build(objs: list[dict]) -> Prompts:
        texts = [o["prompt"] for o in objs]
        sp = {k: [o["spans"][k] for o in objs] for k in objs[0].get("spans", {})}
        ans = [o["answer"] for o in objs] if "answer" in objs[0] else None
        return Prompts.from_text(texts, tokenizer, spans=sp, answers=ans, side=side, prepend_bos=prepend_bos)

    try:
        objs = [obj for _, obj in lines]
        partner = build([o["partner"] for o in objs]) if "partner" in objs[0] else None
        return build(objs).with_partner(partner)
    except ValueError as e:
        # name the line: from_text errors say "prompt i"
        raise ValueError(f"{path}: {e} (prompt i is the i-th non-empty line, counting from 0)") from e


_LINE_KEYS = {"prompt", "answer", "spans", "partner", "meta"}


def _check_line(obj: object, partner: bool = False) -> dict:
    if not isinstance(obj, dict):
        raise TypeError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - _LINE_KEYS - ({"partner"} if partner else set())
    if unknown:
        raise ValueError(f"expected keys among {sorted(_LINE_KEYS)}, got unknown {sorted(unknown)}")
    if not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
        raise ValueError(f"'prompt': expected a non-empty string, got {obj.get('prompt')!r}")
    if "answer" in obj and (not isinstance(obj["answer"], str) or not obj["answer"]):
        raise ValueError(f"'answer': expected a non-empty string, got {obj['answer']!r}")
    spans = obj.get("spans", {})
    if not isinstance(spans, dict) or not all(isinstance(v, str) or isinstance(v, list) and len(v) == 2
                                              and all(isinstance(x, int) for x in v) for v in spans.values()):
        raise ValueError(f"'spans': expected an object of name -> substring or [start, end], got {spans!r}")
    if any(k in RESERVED for k in spans):
        raise ValueError(f"'spans': {sorted(RESERVED)} are defined by the toolkit, got {sorted(set(spans) & set(RESERVED))}")
    if "partner" in obj:
        if partner:
            raise ValueError("'partner': expected no nested partner inside a partner")
        _check_line(obj["partner"], partner=True)
        if set(obj["partner"]) - {"meta"} != set(obj) - {"partner", "meta"}:
            raise ValueError(f"'partner': expected the same keys as its prompt ({sorted(set(obj) - {'partner', 'meta'})}), "
                             f"got {sorted(set(obj['partner']) - {'meta'})}")
    return obj


def as_prompts(data: Prompts | Batch | Tensor, name: str = "tokens") -> Prompts:
    """`Prompts` from any accepted input: prompts as they are, a padded `Batch`, or a token tensor
    (prompts of one length, no padding)."""
    if isinstance(data, Prompts):
        return data
    if isinstance(data, Batch):
        return Prompts(data.tokens, data.lengths, data.side)
    t = check_tokens(data, name=name)
    return Prompts(t, torch.full((t.shape[0],), t.shape[1], dtype=torch.long))
