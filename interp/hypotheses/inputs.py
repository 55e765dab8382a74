"""Inputs with ground truth for the investigations, as `interp.prompts.Prompts`: from the
organisms' own builders (`interp.organisms.<name>.prompts`), or JSONL prompt sets
(`interp.prompts.read_prompts`, schema in data/prompts/README.md) tokenized with the model's own
tokenizer. Prompts of any lengths are kept: the investigations read each prompt at its own
named positions.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

from interp.models import ORGANISM_PREFIX
from interp.prompts import LAST, Prompts, read_prompts
from interp.tl import HookedTransformer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TwoHopInputs:
    prompts: Prompts  # answers; partner: prompts whose bridge (hence answer) differs
    bridge: Int[Tensor, "n"] | None  # the bridge entity's first token; None when the set names none
    control_types: Int[Tensor, "n"]  # Hewitt-Liang types for the control task


@dataclass(frozen=True)
class RouteInputs:
    clean: Int[Tensor, "n pos"]
    corrupt: Int[Tensor, "n pos"]
    answer: Int[Tensor, "n"]
    source: int
    via: list[int]


def organism_name(spec: str) -> str | None:
    return spec.removeprefix(ORGANISM_PREFIX) if spec.startswith(ORGANISM_PREFIX) else None


def tokenizer_of(model: HookedTransformer) -> object:
    if getattr(model, "tokenizer", None) is None:
        raise ValueError(f"model {model.cfg.model_name!r}: expected a tokenizer to encode the prompt set, got none")
    return model.tokenizer


def prompt_set(path: str | Path, model: HookedTransformer | None = None, tokenizer: object | None = None,
               limit: int | None = None) -> Prompts:
    """A JSONL prompt set tokenized with `tokenizer` (default: the model's own)."""
    tok = tokenizer if tokenizer is not None else tokenizer_of(model)  # type: ignore[arg-type]
    return read_prompts(path, tok, limit=limit)


def _meta(path: str | Path, key: str, limit: int | None = None) -> list[str] | None:
    """`meta[key]` of every non-empty line, or None when a line has none."""
    out = []
    for raw in Path(path).read_text().splitlines():
        if raw.strip():
            v = json.loads(raw).get("meta", {}).get(key)
            if not isinstance(v, str):
                return None
            out.append(v)
            if limit is not None and len(out) >= limit:
                break
    return out


def _type_tokens(p: Prompts, span: str | None) -> Tensor:
    """Each prompt's token at the start of `span` (default: the token before the last)."""
    pos = p.span(span)[:, 0] if span is not None and span in p.spans else (p.index(LAST) - 1).clamp_min(0)
    r = p.right()
    return r.tokens.cpu()[torch.arange(len(r)), pos]


# ------------------------------------------------------------------------------------- multihop

def twohop(spec: str, model: HookedTransformer, n: int = 400, seed: int = 0, prompts: str | Path | None = None,
           tokenizer: object | None = None) -> TwoHopInputs:
    """Two-hop prompts with answers and partners whose bridge differs: the multihop organism's, or
    a JSONL set (`prompts`; each line's ``meta.bridge`` names its bridge entity, tokenized as a
    continuation of the prompt; the control type is the first token of the span ``subject``)."""
    if prompts is not None:
        p = prompt_set(prompts, model, tokenizer)
        bridges = _meta(prompts, "bridge")
        bridge = None
        if bridges is not None:
            texts = [json.loads(x)["prompt"] for x in Path(prompts).read_text().splitlines() if x.strip()]
            bridge = Prompts.from_text(texts, tokenizer if tokenizer is not None else tokenizer_of(model),
                                       answers=bridges).first_answer
        return TwoHopInputs(p, bridge, _type_tokens(p, "subject"))
    if organism_name(spec) == "multihop":
        from interp.organisms import multihop as mh

        p = mh.prompts(n, seed)
        # control type: the fact token a->b (the bridge is a function of it; a per-entity control
        # would be trivially memorised from the last token, which *is* a)
        return TwoHopInputs(p, mh.bridge_labels(n, seed), _type_tokens(p, "fact1"))
    raise ValueError(f"multihop: expected organism:multihop or a prompt set (--prompts FILE.jsonl), got {spec!r}")


# ------------------------------------------------------------------------------------ planning

def plan(spec: str, n: int = 400, seed: int = 0) -> Prompts:
    """Planning-organism prompts with the span `plan` (where the word is determined)."""
    if organism_name(spec) != "planning":
        raise ValueError(f"plan ahead: expected organism:planning, got {spec!r}")
    from interp.organisms import planning

    return planning.prompts(n, seed)


# ------------------------------------------------------------------------------------ decay

def decay(spec: str, model: HookedTransformer, n_per: int = 64, seed: int = 0, *, long: bool = True,
          prompts: str | Path | None = None, tokenizer: object | None = None) -> Prompts:
    """Prompts with answers and the span `fact`, at many distances of the fact from the query: a
    JSONL set (`prompts`), or the retrieval organisms' (at twice the training length when
    `long`)."""
    if prompts is not None:
        return prompt_set(prompts, model, tokenizer)
    name = organism_name(spec)
    if name is not None and name.startswith("retrieval"):
        from interp.organisms import retrieval

        return retrieval.long_prompts(n_per, seed) if long else retrieval.distance_prompts(n_per, seed)
    raise ValueError(f"decay: expected a retrieval organism or a prompt set (--prompts FILE.jsonl), got {spec!r}")


# --------------------------------------------------------------------------- last token, routes

def last_token(spec: str, model: HookedTransformer, n: int = 400, seed: int = 0, prompts: str | Path | None = None,
               tokenizer: object | None = None) -> Prompts:
    """Prompts with answers (and, from a JSONL set whose partners have the prompts' lengths, those
    as the neutral contexts; other partners, e.g. two-hop ones, are dropped for the default)."""
    if prompts is not None:
        p = prompt_set(prompts, model, tokenizer)
        q = p.partner
        if q is not None and not (torch.equal(q.lengths, p.lengths) and torch.equal(q.index(LAST), p.index(LAST))):
            log.info("last-token: the prompt set's partners differ in length from their prompts; using "
                     "neutral_prompts (another example's context) as the neutral context")
            p = p.with_partner(None)
        return p
    name = organism_name(spec)
    if name == "multihop":
        from interp.organisms import multihop as mh

        return mh.prompts(n, seed, partner=False)
    if name == "induction":
        r = induction_routes(n, seed)
        return Prompts.from_tokens(r.clean, answers=r.answer)
    if name is not None and name.startswith("retrieval"):
        from interp.organisms import retrieval

        return retrieval.prompts(n, seed)
    raise ValueError(f"last-token: expected organism:multihop, induction, retrieval-* or a prompt set "
                     f"(--prompts FILE.jsonl), got {spec!r}")


def route_prompts(spec: str, model: HookedTransformer, n: int = 32, seed: int = 0, prompts: str | Path | None = None,
                  tokenizer: object | None = None) -> Prompts:
    """Clean prompts with answers, the span `source` and the corrupted prompts as partner: the
    induction organism's (`induction_routes`) or a JSONL set with partners and a span `source`."""
    if prompts is not None:
        return prompt_set(prompts, model, tokenizer)
    if organism_name(spec) != "induction":
        raise ValueError(f"routes: expected organism:induction (the known K-composition circuit) or a prompt set "
                         f"(--prompts FILE.jsonl), got {spec!r}")
    r = induction_routes(n, seed)
    src = torch.full((n,), r.source)
    corrupt = Prompts.from_tokens(r.corrupt, answers=r.answer, spans={"source": src})
    return Prompts.from_tokens(r.clean, answers=r.answer, spans={"source": src}, partner=corrupt)


def induction_routes(n: int = 48, seed: int = 0) -> RouteInputs:
    """Induction prompts cut after the second occurrence of a token A whose next token B is the
    answer; all of one length, A's first occurrence at one position. Corrupt: A's first
    occurrence replaced by another token (the model can no longer find where to copy from).
    The layout is the organism's own (`interp.organisms.induction.circuit_prompts`)."""
    from interp.organisms import induction

    p = induction.circuit_prompts(n, seed)
    source, last = p.roles["A"], p.roles["last"]
    return RouteInputs(p.clean, p.corrupt, p.answer[:, 0], source, list(range(source + 1, last)))
