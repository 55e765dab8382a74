"""Declared circuits of the organisms, and how well each discovery method recovers them.

Ground truth for circuit discovery (InterpBench, Gupta et al. 2024; auto-circuit, Miller et al.
2024; METHODS.md "Scoring circuit discovery"): each organism's manifest declares its known
circuit as *attention edges* -- head h of layer l, at query position q, reads the key/value of
position k -- in the toolkit's node vocabulary: the edge is the residual `Node(l, resid_pre, k)`
entering `Node(l, k, k, h)` and `Node(l, v, k, h)`, read only by query q, and it feeds the head
output `Node(l, head, q, h)`. Positions are named by role (``A``, ``B``, ``last`` ...) of the
organism's fixed-layout `circuit_prompts`, so a circuit is independent of one prompt layout.

Declaring (`declare`): every candidate edge (all layers x heads x pairs of candidate positions)
is ablated alone by *noising path patching* (the corrupted run's residual at k enters only that
head's K/V, read only by q; everything else clean) and its share of the clean-corrupt gap is
measured; edges with |share| >= MIN_SHARE (5% of the gap) are declared. The manifest states the
thresholds a re-measurement on fresh prompts must meet (with margins for prompt sampling). Nothing is assumed: a test re-measures
every declared edge and a sample of undeclared ones on fresh prompts.

Scoring (`score`): a discovery method ranks the candidates by |effect| on prompts of another seed
(denoising), and the ranking is compared with the declared set by ROC AUC (Mann-Whitney, ties
averaged) and precision at the circuit's size, with percentile-bootstrap CIs over prompt
resamples (each resample re-runs the method) and a random-ranking baseline. Methods:

- ``path-patching`` (edges): `interp.patching.path_patch` of each candidate edge, exact.
- ``knockout`` (edges): `interp.patching.knockout` of each attention edge on the clean run (a
  necessity test without a corrupted run, so edges whose blocking disrupts attention in general,
  e.g. to an attention sink, rank high too).
- ``activation-patching`` (nodes): `interp.patching.sweep` of each head output (layer, pos, head).
- ``attribution-patching`` (nodes): `interp.patching.attribute`, its first-order estimate.
- ``sae-feature-graph`` (heads): the heads of `interp.sae.feature_graph` traced from the
  multihop SAEs' task feature, ranked by |attribution| (multihop only; the graph does not resolve
  positions, so it is scored on (layer, head); the SAE pair at resid_post 0 and 1 sees only the
  layer-1 heads, and every head it cannot see scores 0).

Node- and head-level scores are compared with the nodes (heads) of the declared edges.
Caveat: the exact methods' AUC reflects how cleanly the organism separates circuit from
non-circuit (they measure what the declaration measures, on other prompts and in the other
direction); the approximations and the corruption-free knockout show where they differ.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from interp.graph import Node, Site
from interp.metrics import ReadMetric

if TYPE_CHECKING:
    from interp.organisms.base import CircuitPrompts
    from interp.tl import HookedTransformer

log = logging.getLogger(__name__)

Method = Literal["activation-patching", "attribution-patching", "path-patching", "knockout", "sae-feature-graph"]
METHODS: tuple[str, ...] = ("activation-patching", "attribution-patching", "path-patching", "knockout",
                            "sae-feature-graph")
LEVEL = {"activation-patching": "node", "attribution-patching": "node", "path-patching": "edge",
         "knockout": "edge", "sae-feature-graph": "head"}
CIRCUIT_ORGANISMS: tuple[str, ...] = ("induction", "multihop", "retrieval-learned", "retrieval-rotary",
                                      "retrieval-nope", "planning")
SAE_SPECS = {"multihop": ("sae:multihop-L0", "sae:multihop-L1")}
DECLARED_SHARE = 0.2
UNDECLARED_SHARE = 0.1
MIN_SHARE = 0.05  # an edge carrying >= 5% of the clean-corrupt gap is part of the circuit


# ----------------------------------------------------------------------------- AUC, precision

def roc_auc(scores: Float[Tensor, "m"], labels: Bool[Tensor, "m"]) -> float:
    """ROC AUC of `scores` for the positive `labels`: P(score of a positive > score of a
    negative), ties counted one half (the Mann-Whitney U statistic over P x N)."""
    s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(labels).reshape(-1).bool()
    if s.shape != y.shape:
        raise ValueError(f"roc_auc labels: expected shape {tuple(s.shape)}, got {tuple(y.shape)}")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc: expected both positives and negatives, got {n_pos} and {n_neg}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("roc_auc scores: expected finite values, got NaN/Inf")
    _, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)  # sorted values
    average_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # 1-based, ties averaged
    ranks = average_rank[inverse]
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def precision_at_k(scores: Float[Tensor, "m"], labels: Bool[Tensor, "m"], k: int | None = None) -> float:
    """Share of positives among the `k` highest scores (default k = number of positives); ties at
    the cut-off are broken at random in expectation."""
    s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(labels).reshape(-1).bool()
    k = int(y.sum()) if k is None else k
    if not 1 <= k <= len(s):
        raise ValueError(f"precision_at_k: expected 1 <= k <= {len(s)}, got {k}")
    cut = torch.sort(s, descending=True).values[k - 1]
    above, tied = s > cut, s == cut
    need = k - int(above.sum())
    hits = float(y[above].sum()) + need * float(y[tied].float().mean())
    return hits / k


# ------------------------------------------------------------------------- edges and circuits

@dataclass(frozen=True)
class AttentionEdge:
    """Head `head` of layer `layer` at query position `query` reads the key/value of `key`."""

    layer: int
    head: int
    query: int
    key: int

    @property
    def sender(self) -> Node:
        return Node(self.layer, Site.RESID_PRE, pos=self.key)

    @property
    def receivers(self) -> tuple[Node, Node]:
        return (Node(self.layer, Site.K, pos=self.key, head=self.head),
                Node(self.layer, Site.V, pos=self.key, head=self.head))

    @property
    def node(self) -> Node:
        """The head output this edge feeds."""
        return Node(self.layer, Site.HEAD, pos=self.query, head=self.head)


@dataclass(frozen=True, kw_only=True)
class DeclaredEdge:
    """An attention edge with its positions named by role, and its measured share of the gap."""

    layer: int
    head: int
    query: str
    key: str
    share: float

    def resolve(self, prompts: CircuitPrompts) -> AttentionEdge:
        return AttentionEdge(self.layer, self.head, prompts.position(self.query), prompts.position(self.key))

    def to_dict(self, prompts: CircuitPrompts | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"layer": self.layer, "head": self.head, "query": self.query, "key": self.key,
                               "share": round(self.share, 4)}
        if prompts is not None:
            e = self.resolve(prompts)
            out["route"] = (f"{e.sender} -> {e.receivers[0]} + {e.receivers[1]} (read by the query at "
                            f"{self.query}={e.query}) -> {e.node}")
        return out


@dataclass(frozen=True, kw_only=True)
class Circuit:
    """An organism's declared circuit: attention edges over the roles of its circuit prompts."""

    organism: str
    edges: tuple[DeclaredEdge, ...]
    declared_share: float = DECLARED_SHARE
    undeclared_share: float = UNDECLARED_SHARE
    evidence: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.edges:
            raise ValueError(f"Circuit({self.organism!r}).edges: expected at least one edge, got none")
        if not (self.declared_share > 0 and self.undeclared_share > 0):
            raise ValueError(f"Circuit thresholds: expected positive declared and undeclared shares, got "
                             f"{self.declared_share}, {self.undeclared_share}")

    def attention_edges(self, prompts: CircuitPrompts) -> set[AttentionEdge]:
        return {e.resolve(prompts) for e in self.edges}

    def nodes(self, prompts: CircuitPrompts) -> set[Node]:
        return {e.node for e in self.attention_edges(prompts)}

    def heads(self) -> set[tuple[int, int]]:
        return {(e.layer, e.head) for e in self.edges}

    def to_manifest(self, prompts: CircuitPrompts | None = None) -> dict[str, Any]:
        return {"kind": "attention edges", "edges": [e.to_dict(prompts) for e in self.edges],
                "declared_share": self.declared_share, "undeclared_share": self.undeclared_share,
                "evidence": self.evidence}

    @classmethod
    def from_manifest(cls, organism: str, facts: dict[str, Any]) -> Circuit:
        unknown = set(facts) - {"kind", "edges", "declared_share", "undeclared_share", "evidence"}
        if unknown:
            raise ValueError(f"circuit of {organism!r}: expected keys kind, edges, declared_share, "
                             f"undeclared_share, evidence, got unknown keys {sorted(unknown)}")
        edges = tuple(DeclaredEdge(layer=int(e["layer"]), head=int(e["head"]), query=str(e["query"]),
                                   key=str(e["key"]), share=float(e["share"])) for e in facts["edges"])
        return cls(organism=organism, edges=edges, declared_share=float(facts["declared_share"]),
                   undeclared_share=float(facts["undeclared_share"]), evidence=dict(facts.get("evidence", {})))


def circuit_of(organism: str) -> Circuit:
    """The circuit declared in a shipped organism's manifest."""
    from interp.models import read_manifest

    m = read_manifest(f"organism:{organism}")
    if "circuit" not in m:
        raise ValueError(f"organism {organism!r}: expected a declared 'circuit' in its manifest, got none; "
                         f"run `interp circuits declare {organism} --write`")
    return Circuit.from_manifest(organism, m["circuit"])


def prompts_of(organism: str, n: int, seed: int) -> CircuitPrompts:
    from interp.organisms import get

    org = get(organism)
    fn = getattr(org, "circuit_prompts", None)
    if fn is None:
        raise ValueError(f"organism {organism!r}: expected a circuit_prompts builder, got none")
    return fn(n, seed)  # type: ignore[no-any-return]


def candidate_edges(model: HookedTransformer, prompts: CircuitPrompts) -> list[AttentionEdge]:
    """Every (layer, head, query, key) with query and key among the candidate positions,
    key <= query and query >= 1 (position 0 reads only itself)."""
    cand = sorted(set(prompts.candidates))
    return [AttentionEdge(layer, head, q, k)
            for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)
            for q in cand if q >= 1 for k in cand if k <= q]


def candidate_nodes(model: HookedTransformer, prompts: CircuitPrompts) -> list[Node]:
    return [Node(layer, Site.HEAD, pos=p, head=h) for layer in range(model.cfg.n_layers)
            for p in sorted(set(prompts.candidates)) for h in range(model.cfg.n_heads)]


class AnswerMetric:
    """Per example, the mean over answer positions of the answer's logit minus the mean logit (a
    linear "logit margin": unlike log p it does not saturate when the clean answer is certain).

    `metric()` is the `interp.metrics` form: it reads `prompts.answer_pos` only, so the patching
    engine unembeds only those rows, and returns one value per example (every method keeps them)."""

    def __init__(self, prompts: CircuitPrompts) -> None:
        self.answer = prompts.answer
        self.positions = prompts.answer_pos

    def per_example(self, logits_at: Float[Tensor, "batch k d_vocab"]) -> Float[Tensor, "batch"]:
        x = logits_at.float()
        if x.shape[0] != self.answer.shape[0]:
            raise ValueError(f"AnswerMetric: expected logits for the {self.answer.shape[0]} prompts it was built "
                             f"for, got {x.shape[0]}")
        right = x.gather(-1, self.answer.to(x.device)[..., None])[..., 0]
        return (right - x.mean(-1)).mean(-1)

    def metric(self) -> ReadMetric:
        pos = torch.tensor(list(self.positions), dtype=torch.long)
        return ReadMetric("answer logit margin", lambda p: pos[None].expand(len(p), -1),
                          lambda at, p: self.per_example(at))


def gap(model: HookedTransformer, prompts: CircuitPrompts) -> tuple[Tensor, Tensor]:
    """Per-example (clean, corrupted) metric values."""
    metric = AnswerMetric(prompts)
    with torch.inference_mode():
        clean = metric.per_example(model(prompts.clean.to(model.cfg.device))[:, list(prompts.answer_pos)])
        corrupt = metric.per_example(model(prompts.corrupt.to(model.cfg.device))[:, list(prompts.answer_pos)])
    return clean.double().cpu(), corrupt.double().cpu()


EdgeMethod = Literal["noising", "denoising", "knockout"]


def edge_effects(model: HookedTransformer, prompts: CircuitPrompts, edges: Sequence[AttentionEdge], *,
                 how: EdgeMethod = "noising", progress: bool = False) -> Float[Tensor, "n m"]:
    """Per example and edge: the metric after intervening on that edge alone minus the metric of
    the run intervened on. ``noising`` / ``denoising``: path patching of the edge (the residual
    at its key from the other run enters only its head's K/V, read only by its query);
    ``knockout``: its attention edge blocked on the clean run."""
    from interp.patching import knockout, path_patch

    n = prompts.clean.shape[0]
    metric = AnswerMetric(prompts).metric()
    out = torch.empty(n, len(edges), dtype=torch.float64)
    for i, e in enumerate(tqdm(edges, desc=f"edges ({how})", disable=not progress)):
        if how == "knockout":
            r = knockout(model, prompts.clean, metric, at=e.query, sources=[e.key], start_layers=[e.layer],
                         end_layer=e.layer + 1, heads=[e.head])
        else:
            r = path_patch(model, prompts.clean, prompts.corrupt, metric, senders=e.sender,
                           receivers=list(e.receivers), reader=[e.query], direction=how)
        out[:, i] = r.per_example_effect.reshape(-1, n)[0]
    return out


def edge_shares(model: HookedTransformer, prompts: CircuitPrompts, edges: Sequence[AttentionEdge], *,
                direction: Literal["noising", "denoising"] = "noising", progress: bool = False
                ) -> Float[Tensor, "m"]:
    """Each edge's share of the clean-corrupt gap when it alone is path-patched: noising
    (m_clean - m_patched) / (m_clean - m_corrupt); denoising (m_patched - m_corrupt) / (same)."""
    clean, corrupt = gap(model, prompts)
    denom = float(clean.mean() - corrupt.mean())
    if abs(denom) < 1e-6:
        raise ValueError(f"edge shares: expected clean and corrupted metrics to differ, got {float(clean.mean())} "
                         f"and {float(corrupt.mean())}")
    eff = edge_effects(model, prompts, edges, how=direction, progress=progress).mean(0)
    return eff / denom if direction == "denoising" else -eff / denom


def split_shares(shares: Float[Tensor, "m"], min_share: float = MIN_SHARE
                 ) -> tuple[Bool[Tensor, "m"], float, float]:
    """Declare the edges with |share| >= `min_share`. Returns (declared mask, declared threshold,
    undeclared threshold) for re-measurement on fresh prompts: 0.5 x the smallest declared
    |share|, and max(2 x the largest undeclared |share|, 0.02) -- margins for prompt sampling
    (an edge near MIN_SHARE moves by about half its share between samples of 24-64 prompts)."""
    s = shares.abs().double()
    keep = s >= min_share
    if not bool(keep.any()):
        raise ValueError(f"declare: expected at least one edge with |share| >= {min_share}, got a largest "
                         f"share of {float(s.max()):.3f}")
    rest = float(s[~keep].max()) if bool((~keep).any()) else 0.0
    return keep, round(0.5 * float(s[keep].min()), 4), round(max(2.0 * rest, 0.02), 4)


def declare(organism: str, model: HookedTransformer | None = None, *, n: int = 64, seed: int = 100,
            min_share: float = MIN_SHARE, progress: bool = False) -> Circuit:
    """Measure every candidate edge by noising path patching and declare those whose |share| of
    the clean-corrupt gap is >= `min_share` (`split_shares`; see the module docstring)."""
    from interp.models import load_model

    model = model if model is not None else load_model(f"organism:{organism}")
    prompts = prompts_of(organism, n, seed)
    edges = candidate_edges(model, prompts)
    shares = edge_shares(model, prompts, edges, direction="noising", progress=progress)
    keep, declared_share, undeclared_share = split_shares(shares, min_share)
    declared = tuple(DeclaredEdge(layer=e.layer, head=e.head, query=prompts.role_of(e.query),
                                  key=prompts.role_of(e.key), share=float(s))
                     for e, s, k in zip(edges, shares, keep, strict=True) if k)
    rest = shares[~keep]
    clean, corrupt = gap(model, prompts)
    evidence = {
        "method": "noising path patching of each candidate attention edge alone (interp.circuits.edge_shares)",
        "metric": "answer logit minus mean logit at the answer positions (interp.circuits.AnswerMetric)",
        "clean_metric": round(float(clean.mean()), 4), "corrupt_metric": round(float(corrupt.mean()), 4), "n_prompts": n, "seed": seed, "n_candidates": len(edges),
        "candidate_positions": {prompts.role_of(p): p for p in sorted(set(prompts.candidates))},
        "max_undeclared_share": round(float(rest.abs().max()) if len(rest) else 0.0, 4),
        "sum_declared_share": round(float(shares[keep].sum()), 4),
    }
    return Circuit(organism=organism, edges=declared, declared_share=declared_share,
                   undeclared_share=undeclared_share, evidence=evidence)


def write_circuit(organism: str, circuit: Circuit) -> Path:
    """Write `circuit` into the shipped organism's manifest (the weights and their sha256 are
    untouched)."""
    from interp.atomic import write_json_atomic
    from interp.models import MANIFEST, organisms_dir, read_manifest

    facts = read_manifest(f"organism:{organism}")
    facts["circuit"] = circuit.to_manifest(prompts_of(organism, 2, 0))
    path = organisms_dir() / organism / MANIFEST
    write_json_atomic(path, facts)
    return path


# ------------------------------------------------------------------------------ the methods

def _node_scores(model: HookedTransformer, prompts: CircuitPrompts, nodes: list[Node], exact: bool) -> Tensor:
    from interp.patching import attribute, sweep

    metric = AnswerMetric(prompts).metric()
    if exact:
        pos = sorted(set(prompts.candidates))
        r = sweep(model, prompts.clean, prompts.corrupt, metric, site="head", positions=pos)
        eff = r.effect
        index = {(layer, p, h): eff[li, pi, h] for li, layer in enumerate(r.coords[0])
                 for pi, p in enumerate(r.coords[1]) for h in range(eff.shape[2])}
    else:
        a = attribute(model, prompts.clean, prompts.corrupt, metric, site="head")
        index = {(layer, p, h): a.values[layer, p, h] for layer in range(a.values.shape[0])
                 for p in range(a.values.shape[1]) for h in range(a.values.shape[2])}
    return torch.tensor([abs(float(index[(n.layer, n.pos, n.head)])) for n in nodes], dtype=torch.float64)


def _sae_head_scores(model: HookedTransformer, prompts: CircuitPrompts, organism: str,
                     heads: list[tuple[int, int]]) -> Tensor:
    """|attribution| of each head in the SAE feature graph traced from the downstream SAE's
    feature most correlated with the clean answer's log-probability."""
    from interp import sae as sae_mod

    saes = [sae_mod.load(s) for s in SAE_SPECS[organism]]
    pos = prompts.answer_pos[0]
    feature = _answer_feature(model, saes[-1], prompts)
    fg = sae_mod.feature_graph(model, saes, feature, prompts.clean, pos=pos, top_k=model.cfg.n_heads * 4,
                               check=False)
    e = fg.edges[fg.edges["source_kind"] == "head"]
    w: dict[tuple[int, int], float] = {}
    for _, row in e.iterrows():
        layer, head = (int(x) for x in str(row["source"]).removeprefix("L").split("H"))
        w[(layer, head)] = max(w.get((layer, head), 0.0), abs(float(row["weight"])))
    return torch.tensor([w.get(h, 0.0) for h in heads], dtype=torch.float64)


def _answer_feature(model: HookedTransformer, sae: Any, prompts: CircuitPrompts) -> int:
    """The downstream SAE feature whose activation at the answer position differs most between
    the clean and corrupted prompts (the feature that carries the task input)."""
    from interp.sae.checks import check_sae

    name = check_sae(model, sae)
    pos = prompts.answer_pos[0]
    acts = []
    with torch.inference_mode():
        for toks in (prompts.clean, prompts.corrupt):
            _, cache = model.run_with_cache(toks.to(model.cfg.device), names_filter=name)
            acts.append(sae.encode(cache[name][:, pos]).float())
    return int((acts[0] - acts[1]).abs().mean(0).argmax())


@dataclass(frozen=True)
class _Candidates:
    """`run(prompts)` -> one score per candidate; or `per_example(prompts)` -> [n, m] effects
    whose resample means are the scores (a bootstrap then needs no re-run)."""

    level: str
    labels: tuple[str, ...]
    positive: Tensor
    run: Callable[[CircuitPrompts], Tensor] | None = None
    per_example: Callable[[CircuitPrompts], Tensor] | None = None


def _candidates(method: str, organism: str, model: HookedTransformer, prompts: CircuitPrompts,
                circuit: Circuit) -> _Candidates:
    level = LEVEL[method]
    if level == "edge":
        edges = candidate_edges(model, prompts)
        truth = circuit.attention_edges(prompts)
        missing = truth - set(edges)
        if missing:
            raise ValueError(f"circuit of {organism!r}: expected its edges among the candidates, got {missing}")
        how: EdgeMethod = "denoising" if method == "path-patching" else "knockout"
        return _Candidates(level, tuple(f"L{e.layer}H{e.head} {prompts.role_of(e.query)}<-{prompts.role_of(e.key)}"
                                        for e in edges),
                           torch.tensor([e in truth for e in edges]),
                           per_example=lambda p: edge_effects(model, p, edges, how=how))
    if level == "node":
        nodes = candidate_nodes(model, prompts)
        truth_n = circuit.nodes(prompts)
        exact = method == "activation-patching"
        return _Candidates(level, tuple(f"L{n.layer}H{n.head}@{prompts.role_of(n.pos)}" for n in nodes),  # type: ignore[arg-type]
                           torch.tensor([n in truth_n for n in nodes]),
                           run=lambda p: _node_scores(model, p, nodes, exact))
    if organism not in SAE_SPECS:
        raise ValueError(f"sae-feature-graph on {organism!r}: expected an organism with SAEs in data/sae "
                         f"({sorted(SAE_SPECS)}), got none for it")
    heads = [(layer, h) for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    truth_h = circuit.heads()
    return _Candidates(level, tuple(f"L{layer}H{h}" for layer, h in heads),
                       torch.tensor([h in truth_h for h in heads]),
                       run=lambda p: _sae_head_scores(model, p, organism, heads))


# -------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class CircuitScore:
    """How well one method's ranking recovers one organism's declared circuit.

    `auc` / `precision` hold the point estimate then the bootstrap values (prompt resamples,
    each a re-run of the method); `baseline_auc` / `baseline_precision` the same statistics of
    random rankings. `scores` are the point-estimate |effects| per candidate (`labels`).
    """

    method: str
    organism: str
    level: str
    labels: tuple[str, ...]
    positive: Tensor
    scores: Tensor
    auc: Tensor
    precision: Tensor
    baseline_auc: Tensor
    baseline_precision: Tensor
    n_prompts: int
    alpha: float = 0.05

    def _ci(self, values: Tensor, point: bool) -> tuple[float, float, float]:
        boot = values[1:] if point else values
        lo, hi = torch.quantile(boot.double(), torch.tensor([self.alpha / 2, 1 - self.alpha / 2],
                                                             dtype=torch.float64)).tolist()
        return (float(values[0]) if point else float(values.mean())), lo, hi

    @property
    def values(self) -> dict[str, float]:
        return {"auc": float(self.auc[0]), "precision_at_k": float(self.precision[0]),
                "random_auc": float(self.baseline_auc.mean()),
                "random_precision_at_k": float(self.baseline_precision.mean())}

    def to_frame(self) -> pd.DataFrame:
        """Tidy: one row per (statistic, ranking) with value, ci_low, ci_high, n."""
        rows = []
        for stat, ours, base in (("auc", self.auc, self.baseline_auc),
                                 ("precision_at_k", self.precision, self.baseline_precision)):
            for ranking, vals, point in ((self.method, ours, True), ("random", base, False)):
                v, lo, hi = self._ci(vals, point)
                rows.append({"organism": self.organism, "method": self.method, "level": self.level,
                             "statistic": stat, "ranking": ranking, "value": v, "ci_low": lo, "ci_high": hi,
                             "n": self.n_prompts if point else len(vals), "n_candidates": len(self.labels),
                             "n_positive": int(self.positive.sum())})
        return pd.DataFrame(rows)

    def plot(self) -> go.Figure:
        return _bars(self.to_frame(), f"{self.method} on {self.organism}: recovery of the declared circuit")


@dataclass(frozen=True)
class Leaderboard:
    """Scores of several methods on several organisms."""

    scores: tuple[CircuitScore, ...]

    def to_frame(self) -> pd.DataFrame:
        return pd.concat([s.to_frame() for s in self.scores], ignore_index=True)

    def plot(self) -> go.Figure:
        return _bars(self.to_frame(), "Circuit discovery: ROC AUC against the declared circuits")

    def markdown(self) -> str:
        """methods x organisms: AUC [CI] (precision at k); the random baseline in the last row."""
        return leaderboard_markdown(self.to_frame())


def leaderboard_markdown(frame: pd.DataFrame) -> str:
    """`Leaderboard.markdown` of a tidy frame (`Leaderboard.to_frame`, or bench/leaderboard.csv read
    back): methods x organisms, AUC [CI] (precision at k), the random baseline in the last row."""
    f = frame[frame["statistic"].isin(["auc", "precision_at_k"])]
    organisms = list(dict.fromkeys(f["organism"]))
    methods = list(dict.fromkeys(f.loc[f["ranking"] != "random", "method"]))
    lines = ["| method (level) | " + " | ".join(f"`{o}`" for o in organisms) + " |",
             "|---|" + "---|" * len(organisms)]

    def cell(sub: pd.DataFrame) -> str:
        if sub.empty:
            return "—"
        a = sub[sub["statistic"] == "auc"].iloc[0]
        p = sub[sub["statistic"] == "precision_at_k"].iloc[0]
        return f"{a['value']:.2f} [{a['ci_low']:.2f}, {a['ci_high']:.2f}] (P@k {p['value']:.2f})"

    for m in methods:
        level = f.loc[f["method"] == m, "level"].iloc[0]
        cells = [cell(f[(f["organism"] == o) & (f["method"] == m) & (f["ranking"] == m)]) for o in organisms]
        lines.append(f"| {m} ({level}) | " + " | ".join(cells) + " |")
    rnd = [cell(f[(f["organism"] == o) & (f["ranking"] == "random")
                  & (f["level"] == "edge")].head(2)) for o in organisms]
    lines.append("| random ranking (edges) | " + " | ".join(rnd) + " |")
    return "\n".join(lines)


def _bars(frame: pd.DataFrame, title: str) -> go.Figure:
    f = frame[frame["statistic"] == "auc"]
    fig = go.Figure()
    for ranking, sub in f.assign(kind=f["ranking"].where(f["ranking"] == "random", "method")).groupby("kind"):
        fig.add_trace(go.Bar(
            x=[f"{o} / {m}" for o, m in zip(sub["organism"], sub["method"], strict=True)], y=sub["value"],
            name="random ranking" if ranking == "random" else "method",
            error_y=dict(type="data", symmetric=False, array=sub["ci_high"] - sub["value"],
                         arrayminus=sub["value"] - sub["ci_low"])))
    fig.add_hline(y=0.9, line_dash="dot", annotation_text="0.9 (the field's bar for exact methods)")
    fig.update_layout(title=title, yaxis_title="ROC AUC", barmode="group", template="plotly_white",
                      yaxis=dict(range=[0, 1.05]))
    return fig


# -------------------------------------------------------------------------------- scoring

def score(method: str, organism: str, *, model: HookedTransformer | None = None, circuit: Circuit | None = None,
          n: int = 32, seed: int = 1, n_boot: int = 10, n_random: int = 1000, alpha: float = 0.05,
          progress: bool = False) -> CircuitScore:
    """Rank the candidates of `organism` with `method` and compare with its declared circuit.

    `n` prompts of `seed` (another seed than the declaration's); `n_boot` bootstrap resamples
    of them, each re-running the method; `n_random` random rankings for the baseline.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    if n < 2 or n_boot < 2:
        raise ValueError(f"score: expected n >= 2 prompts and n_boot >= 2 resamples, got n={n}, n_boot={n_boot}")
    from interp.models import load_model

    model = model if model is not None else load_model(f"organism:{organism}")
    circuit = circuit if circuit is not None else circuit_of(organism)
    prompts = prompts_of(organism, n, seed)
    cand = _candidates(method, organism, model, prompts, circuit)
    g = torch.Generator().manual_seed(seed)
    resamples = [torch.arange(n)] + [torch.randint(0, n, (n,), generator=g) for _ in range(n_boot)]
    if cand.per_example is not None:
        effects = cand.per_example(prompts)
        all_scores = [effects[idx].mean(0).abs() for idx in resamples]
    else:
        assert cand.run is not None
        all_scores = [cand.run(prompts.rows(idx)) for idx in
                      tqdm(resamples, desc=f"{method} on {organism}", disable=not progress)]
    point = all_scores[0]
    aucs = [roc_auc(sc, cand.positive) for sc in all_scores]
    precs = [precision_at_k(sc, cand.positive) for sc in all_scores]
    rnd = [torch.rand(len(cand.labels), generator=g) for _ in range(n_random)]
    return CircuitScore(
        method=method, organism=organism, level=cand.level, labels=cand.labels, positive=cand.positive,
        scores=point, auc=torch.tensor(aucs), precision=torch.tensor(precs),
        baseline_auc=torch.tensor([roc_auc(r, cand.positive) for r in rnd]),
        baseline_precision=torch.tensor([precision_at_k(r, cand.positive) for r in rnd]),
        n_prompts=n, alpha=alpha)


def applicable(method: str, organism: str) -> bool:
    return method != "sae-feature-graph" or organism in SAE_SPECS


def leaderboard(methods: Sequence[str] = METHODS, organisms: Sequence[str] = CIRCUIT_ORGANISMS, **kwargs: Any
                ) -> Leaderboard:
    """`score` for every applicable (method, organism) pair."""
    pairs = [(m, o) for o in organisms for m in methods if applicable(m, o)]
    return Leaderboard(tuple(score(m, o, **kwargs) for m, o in pairs))


# --------------------------------------------------------------------------- seed robustness

def same_circuit(a: Circuit, b: Circuit) -> dict[tuple[int, int], int] | None:
    """A per-layer head permutation mapping `b`'s heads onto `a`'s under which both declare the
    same (layer, head, query role, key role) edges, or None when there is none."""
    def edges(c: Circuit, perm: dict[tuple[int, int], int]) -> set[tuple[int, int, str, str]]:
        return {(e.layer, perm.get((e.layer, e.head), e.head), e.query, e.key) for e in c.edges}

    target = edges(a, {})
    layers = sorted({e.layer for e in a.edges} | {e.layer for e in b.edges})
    b_heads = {layer: sorted({e.head for e in b.edges if e.layer == layer}) for layer in layers}
    a_heads = {layer: sorted({e.head for e in a.edges if e.layer == layer}) for layer in layers}
    if any(len(b_heads[layer]) != len(a_heads[layer]) for layer in layers):
        return None
    options = [list(itertools.permutations(a_heads[layer])) for layer in layers]
    for choice in itertools.product(*options):
        perm = {(layer, h): t for layer, hs, ts in zip(layers, [b_heads[x] for x in layers], choice, strict=True)
                for h, t in zip(hs, ts, strict=True)}
        if edges(b, perm) == target:
            return perm
    return None


__all__ = ["METHODS", "AttentionEdge", "Circuit", "CircuitScore", "DeclaredEdge", "Leaderboard", "candidate_edges",
           "circuit_of", "declare", "edge_shares", "leaderboard", "leaderboard_markdown", "precision_at_k", "roc_auc",
           "same_circuit", "score"]
