"""Inputs with ground truth for the investigations: from the organisms, or prompt sets for
pretrained models (data/prompts/), tokenized with the model's own tokenizer.

The investigations themselves take plain token tensors and labels; these helpers only build them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.data import read_jsonl, retrieval_prompts
from interp.hypotheses.positional_decay import DistanceSet
from interp.models import ORGANISM_PREFIX, data_dir
from interp.tokens import HFTokenizer, Tokenizer


@dataclass(frozen=True)
class TwoHopInputs:
    tokens: Int[Tensor, "n pos"]
    bridge: Int[Tensor, "n"]
    answer: Int[Tensor, "n"]
    partner_tokens: Int[Tensor, "n pos"]
    partner_answer: Int[Tensor, "n"]
    control_types: Int[Tensor, "n"]  # Hewitt-Liang types for the control task
    positions: dict[str, int]


@dataclass(frozen=True)
class LastTokenInputs:
    tokens: Int[Tensor, "n pos"]
    answer: Int[Tensor, "n"]


@dataclass(frozen=True)
class RouteInputs:
    clean: Int[Tensor, "n pos"]
    corrupt: Int[Tensor, "n pos"]
    answer: Int[Tensor, "n"]
    source: int
    via: list[int]


def organism_name(spec: str) -> str | None:
    return spec.removeprefix(ORGANISM_PREFIX) if spec.startswith(ORGANISM_PREFIX) else None


def _tokenizer(model: HookedTransformer) -> Tokenizer:
    if getattr(model, "tokenizer", None) is None:
        raise ValueError(f"model {model.cfg.model_name!r}: expected a tokenizer to encode the prompt set, got none")
    return HFTokenizer(model.tokenizer)


# ------------------------------------------------------------------------------------- multihop

def twohop(spec: str, model: HookedTransformer, n: int = 400, seed: int = 0) -> TwoHopInputs:
    """Two-hop prompts with bridge/answer labels and matched partners whose bridge differs."""
    if organism_name(spec) == "multihop":
        from interp.organisms import multihop as mh

        base, partner = mh.pairs(n, seed)
        # control type: the fact token a->b (the bridge is a function of it; a per-entity control
        # would be trivially memorised from the last token, which *is* a)
        fact = base.tokens[torch.arange(n), base.fact1_pos]
        return TwoHopInputs(base.tokens, base.bridge, base.answer, partner.tokens, partner.answer, fact,
                            {"last": mh.QUERY_POS})
    if organism_name(spec) is not None:
        raise ValueError(f"multihop: expected organism:multihop or a pretrained model, got {spec!r}")
    return _twohop_prompts(model, seed)


def _first_token(tok: Tokenizer, word: str) -> int:
    ids = tok.encode(" " + word)
    return ids[1] if isinstance(tok, HFTokenizer) and tok.prepend_bos and len(ids) > 1 else ids[0]


def _twohop_prompts(model: HookedTransformer, seed: int, tokenizer: Tokenizer | None = None,
                    min_prompts: int = 20) -> TwoHopInputs:
    """GPT-2-style prompts from data/prompts/twohop_gpt2.jsonl, kept at their modal token length
    (the investigations read fixed positions); partners share the relation and length but not
    the bridge."""
    tok = tokenizer or _tokenizer(model)
    recs = read_jsonl(data_dir() / "prompts" / "twohop_gpt2.jsonl")
    enc = [tok.encode(r["text"]) for r in recs]
    length = Counter(len(e) for e in enc).most_common(1)[0][0]
    keep = [i for i, e in enumerate(enc) if len(e) == length]
    # Labels are first tokens (what the model predicts next). A multi-token name's first token
    # can be shared by another entity (" New" York / Jersey): such a label would merge two
    # bridges into one probe class and let a partner "switch" the answer for free, so prompts
    # whose bridge or answer shares its first token with another entity are left out.
    first = {w: _first_token(tok, w) for i in keep for w in (recs[i]["bridge"], recs[i]["answer"])}
    owners: dict[tuple[str, int], set[str]] = {}
    for i in keep:
        for field in ("bridge", "answer"):
            owners.setdefault((field, first[recs[i][field]]), set()).add(recs[i][field])
    keep = [i for i in keep if all(len(owners[(f, first[recs[i][f]])]) == 1 for f in ("bridge", "answer"))]
    g = torch.Generator().manual_seed(seed)
    rows, partners = [], []
    for i in keep:
        cands = [j for j in keep if recs[j]["relation"] == recs[i]["relation"] and recs[j]["bridge"] != recs[i]["bridge"]
                 and first[recs[j]["answer"]] != first[recs[i]["answer"]]]
        if cands:
            rows.append(i)
            partners.append(cands[int(torch.randint(len(cands), (1,), generator=g))])
    if len(rows) < min_prompts:
        raise ValueError(f"two-hop prompt set: expected at least {min_prompts} prompts of one token length with partners and "
                         f"unambiguous first tokens, got {len(rows)} at length {length}; add prompts to "
                         f"data/prompts/twohop_gpt2.jsonl")
    t = torch.tensor([enc[i] for i in rows])
    return TwoHopInputs(
        tokens=t, bridge=torch.tensor([_first_token(tok, recs[i]["bridge"]) for i in rows]),
        answer=torch.tensor([_first_token(tok, recs[i]["answer"]) for i in rows]),
        partner_tokens=torch.tensor([enc[j] for j in partners]),
        partner_answer=torch.tensor([_first_token(tok, recs[j]["answer"]) for j in partners]),
        control_types=torch.tensor([_first_token(tok, recs[i]["subject"]) for i in rows]),
        positions={"last": length - 1})


# ------------------------------------------------------------------------------------ planning

def plan(spec: str, n: int = 400, seed: int = 0) -> tuple[Int[Tensor, "n pos"], Bool[Tensor, "n pos"]]:
    """Planning-organism prompts and the mask of the positions where the word is determined."""
    if organism_name(spec) != "planning":
        raise ValueError(f"plan ahead: expected organism:planning, got {spec!r}")
    from interp.organisms import planning

    d = planning.dataset(n, seed)
    mask = torch.zeros_like(d.tokens, dtype=torch.bool)
    mask[torch.arange(n), d.plan_pos] = True
    return d.tokens, mask


# ------------------------------------------------------------------------------------ decay

def by_distance(spec: str, model: HookedTransformer, n_per: int = 64, seed: int = 0, *, long: bool = True
                ) -> dict[int, DistanceSet]:
    """Prompts grouped by the distance of the needed fact (for the retrieval organisms, at twice
    the training length when `long`)."""
    name = organism_name(spec)
    if name is not None and name.startswith("retrieval") and long:
        return {d: retrieval_long(n_per, seed + i, d) for i, d in enumerate(LONG_DISTANCES)}
    if name is not None and name.startswith("retrieval"):
        from interp.organisms import retrieval

        out = {}
        for i, d in enumerate(retrieval.DISTANCE_BINS):
            data = retrieval.dataset(n_per, seed + i, distance=d)
            p = int(data.pair_pos[0])
            out[d] = DistanceSet(data.tokens, data.value, (p,), query_pos=retrieval.QUERY_POS)
        return out
    if name is not None:
        raise ValueError(f"decay: expected a retrieval organism or a pretrained model, got {spec!r}")
    return _retrieval_prompts(model, n_per, seed)


LONG_DISTANCES = (2, 8, 32, 64, 96, 126, 160, 200, 248)


def retrieval_long(n: int, seed: int, distance: int) -> DistanceSet:
    """Retrieval-organism prompts at twice the training length (250 bindings, 253 tokens): a
    prefix of 125 bindings from another draw, then a training-length prompt, with the needed
    binding moved to `distance` tokens before the query (2..250). The queried key occurs once.
    Beyond 126 tokens the needed fact sits where training never put one (Haviv et al. 2022:
    test at the training length and at 2x)."""
    from interp.organisms import retrieval as R

    x, y = R.dataset(n, seed, distance=2), R.dataset(n, seed + 7919)
    g = torch.Generator().manual_seed(seed)

    def key_of(tok: Tensor) -> Tensor:
        return (tok - R.PAIR0) // R.N_VALUES + R.KEY0

    def filler(shape: tuple[int, ...]) -> Tensor:
        other = (x.key[:, None] - R.KEY0 + torch.randint(1, R.N_KEYS, shape, generator=g)) % R.N_KEYS + R.KEY0
        return R.pair_id(other, torch.randint(R.VALUE0, R.VALUE0 + R.N_VALUES, shape, generator=g))

    prefix = y.tokens[:, 1:1 + R.N_PAIRS].clone()
    clash = key_of(prefix) == x.key[:, None]
    prefix[clash] = filler(prefix.shape)[clash]
    suffix = x.tokens[:, 1:].clone()
    rows = torch.arange(n)
    suffix[rows, x.pair_pos - 1] = filler((n, 1))[:, 0]
    tokens = torch.cat([x.tokens[:, :1], prefix, suffix], dim=1)
    q = tokens.shape[1] - 1
    if not 2 <= distance <= q - 2:
        raise ValueError(f"distance: expected 2..{q - 2}, got {distance}")
    tokens[:, q - distance] = R.pair_id(x.key, x.value)
    return DistanceSet(tokens, x.value, (q - distance,), query_pos=q)


def _retrieval_prompts(model: HookedTransformer, n_per: int, seed: int, tokenizer: Tokenizer | None = None
                       ) -> dict[int, DistanceSet]:
    """Distance-controlled English retrieval prompts (interp.data.retrieval_prompts), grouped by
    distance and token length so that the fact's token positions agree within a group."""
    tok = tokenizer or _tokenizer(model)
    out: dict[int, DistanceSet] = {}
    recs = retrieval_prompts(n_per * 12, n_pairs=12, seed=seed)
    groups: dict[int, list[tuple[list[int], int, tuple[int, ...]]]] = {}
    for r in recs:
        ids = tok.encode(r["text"])
        line = f"{r['key']}'s number is {r['answer'].strip()}."
        prefix = r["text"][: r["text"].index(line)] if line in r["text"] else None
        if prefix is None:
            continue
        start, end = len(tok.encode(prefix.rstrip())), len(tok.encode((prefix + line).rstrip()))
        groups.setdefault((r["distance"], len(ids)), []).append((ids, _first_token(tok, r["answer"].strip()),
                                                                   tuple(range(start, end))))  # type: ignore[arg-type]
    for (d, _), items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        if d in out or len(items) < 8:
            continue
        fact = items[0][2]
        same = [it for it in items if it[2] == fact]
        if len(same) >= 8:
            out[d] = DistanceSet(torch.tensor([it[0] for it in same]), torch.tensor([it[1] for it in same]), fact)
    return out


# --------------------------------------------------------------------------- last token, routes

def last_token(spec: str, model: HookedTransformer, n: int = 400, seed: int = 0) -> LastTokenInputs:
    name = organism_name(spec)
    if name == "multihop":
        from interp.organisms import multihop as mh

        d = mh.dataset(n, seed, two_hop_share=1.0)
        return LastTokenInputs(d.tokens, d.answer)
    if name == "induction":
        r = induction_routes(n, seed)
        return LastTokenInputs(r.clean, r.answer)
    if name is not None and name.startswith("retrieval"):
        from interp.organisms import retrieval

        d = retrieval.dataset(n, seed)
        return LastTokenInputs(d.tokens, d.value)
    if name is not None:
        raise ValueError(f"last-token: expected organism:multihop, induction or retrieval-*, got {spec!r}")
    t = twohop(spec, model, seed=seed)
    return LastTokenInputs(t.tokens, t.answer)


def induction_routes(n: int = 48, seed: int = 0) -> RouteInputs:
    """Induction prompts cut after the second occurrence of a token A whose next token B is the
    answer; all of one length, A's first occurrence at one position. Corrupt: A's first
    occurrence replaced by another token (the model can no longer find where to copy from).
    The layout is the organism's own (`interp.organisms.induction.circuit_prompts`)."""
    from interp.organisms import induction

    p = induction.circuit_prompts(n, seed)
    source, last = p.roles["A"], p.roles["last"]
    return RouteInputs(p.clean, p.corrupt, p.answer[:, 0], source, list(range(source + 1, last)))
