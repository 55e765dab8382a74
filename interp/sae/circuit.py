"""Cross-layer feature tracing: which upstream features and attention heads drive a feature.

For a target feature of a downstream SAE (its activation at one position per example), each
upstream SAE feature and each attention head between the two hooks gets an activation x gradient
attribution (Marks et al. 2024, "Sparse feature circuits"; Syed et al. 2023): the upstream SAE is
spliced in with its error term (so the forward pass is unchanged) and its feature activations
are leaves; a head's score is z . d target / d z summed over positions. Scores estimate
target(clean) - target(node ablated), and `FeatureGraph.check` verifies them by exact ablation
(upstream feature zeroed at every position; head output hook_z zeroed).

With a chain of SAEs (ordered by depth) the tracing recurses: the top sources of the target
become targets one level up, giving a small attribution graph for small models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor

from interp.graph import Node, Site, node_from_hook_name
from interp.hooks import Capture, Map, Zero, run
from interp.prompts import Prompts
from interp.sae.checks import check_sae
from interp.sae.data import as_batch
from interp.sae.evaluation import splice_edit
from interp.sae.tracing import zero_features
from interp.stats import pearson
from interp.tl import HookedTransformer
from interp.tokens import Batch


def _order(name: str) -> tuple[int, int]:
    """(layer, stage) of a per-layer residual-side hook: where it sits in the forward pass."""
    node = node_from_hook_name(name)
    stage = {Site.RESID_PRE: 0, Site.ATTN_OUT: 1, Site.RESID_MID: 2, Site.MLP_OUT: 3, Site.RESID_POST: 4}
    if node.site not in stage:
        raise ValueError(f"cross-layer tracing: expected SAEs at residual-side hooks ({[s.value for s in stage]}), "
                         f"got {name}")
    return node.layer, stage[node.site]  # type: ignore[index]


def heads_between(model: HookedTransformer, up: str, down: str) -> list[int]:
    """Layers whose attention heads run after hook `up` and before hook `down`."""
    (lu, su), (ld, sd) = _order(up), _order(down)
    layers = []
    for layer in range(model.cfg.n_layers):
        after = layer > lu or (layer == lu and su == 0)
        before = layer < ld or (layer == ld and sd >= 1)
        if after and before:
            layers.append(layer)
    return layers


@dataclass(frozen=True)
class Sources:
    """Attributions of one target to upstream features and heads, per example."""

    features: Float[Tensor, "batch d_sae"]
    heads: Float[Tensor, "batch layer head"]
    head_layers: tuple[int, ...]
    target: Float[Tensor, "batch"]


def _target_positions(batch: Prompts, pos: int | Tensor | str) -> Tensor:
    """Each example's read-out position (right-padded layout): a name of the prompts ("last", a
    span: its last token), an int (negative: from each prompt's end) or a [batch] tensor."""
    if isinstance(pos, str):
        return batch.index(pos)
    if isinstance(pos, Tensor):
        return pos.long().cpu()
    return torch.where(torch.tensor(pos) < 0, batch.lengths + pos, torch.full_like(batch.lengths, pos))


def _head_node(layer: int) -> Node:
    return Node(layer, Site.HEAD)


def attribute_sources(
    model: HookedTransformer, upstream: SAE, downstream: SAE, feature: int, prompts: Tensor | Batch | Prompts,
    pos: int | Tensor | str = -1, *, allow_mismatch: bool = False,
) -> Sources:
    """Activation x gradient of downstream `feature` (at `pos`: an int, a [batch] tensor or a
    position name such as "last") w.r.t. upstream features and heads, per example."""
    up = check_sae(model, upstream, allow_mismatch=allow_mismatch)
    down = check_sae(model, downstream, allow_mismatch=allow_mismatch)
    if _order(up) >= _order(down):
        raise ValueError(f"cross-layer tracing: expected the upstream SAE's hook before the downstream one's, "
                         f"got {up} and {down}")
    layers = heads_between(model, up, down)
    batch = as_batch(prompts, model.cfg.d_vocab)
    p = _target_positions(batch, pos)
    saved: dict[str, Tensor] = {}

    def up_fn(act: Tensor) -> Tensor:
        x = act.to(upstream.dtype).to(upstream.device)
        f = upstream.encode(x).detach().requires_grad_(True)
        saved["f"] = f
        rec = upstream.decode(f)
        return (rec + (x - rec).detach()).to(act.dtype).to(act.device)

    heads = [_head_node(layer) for layer in layers]
    out = run(model, batch, edits=[Map(up, fn=up_fn)], captures=[Capture(down, p[:, None], grad=True)]
              + [Capture(h, grad=True) for h in heads], logits=False, grad=True)
    with torch.enable_grad():
        x_down = out.acts[down][:, 0]
        target = downstream.encode(x_down.to(downstream.dtype).to(downstream.device))[:, feature]
        zs = [out.acts[h.hook_name] for h in heads]
        grads = torch.autograd.grad(target.sum(), [saved["f"], *zs], allow_unused=True)
    f = saved["f"].detach()
    gf = grads[0] if grads[0] is not None else torch.zeros_like(f)
    feat = (f * gf).sum(1).float().cpu()
    head_scores = []
    for z, g in zip(zs, grads[1:], strict=True):
        head_scores.append((z.detach() * g).sum((1, 3)).float().cpu() if g is not None
                           else torch.zeros(z.shape[0], z.shape[2]))
    n = len(batch)
    head_t = torch.stack(head_scores, dim=1) if head_scores else torch.zeros(n, 0, model.cfg.n_heads)
    return Sources(feat, head_t, tuple(layers), target.detach().float().cpu())


def _target_value(model: HookedTransformer, downstream: SAE, down: str, feature: int, batch: Prompts,
                  p: Tensor, edits: Sequence[Any] = ()) -> Tensor:
    x = run(model, batch, edits=edits, captures=[Capture(down, p[:, None])], logits=False).acts[down][:, 0]
    with torch.no_grad():
        return downstream.encode(x.to(downstream.dtype).to(downstream.device))[:, feature].float().cpu()


def exact_source_effects(
    model: HookedTransformer, upstream: SAE, downstream: SAE, feature: int, prompts: Tensor | Batch | Prompts,
    *, features: Sequence[int] = (), heads: Sequence[tuple[int, int]] = (), pos: int | Tensor | str = -1,
    allow_mismatch: bool = False,
) -> tuple[Float[Tensor, "batch n_feat"], Float[Tensor, "batch n_head"]]:
    """target(clean) - target(ablated) for each upstream feature (zeroed at all positions, error
    term kept) and each head (its hook_z zeroed), per example."""
    up = check_sae(model, upstream, allow_mismatch=allow_mismatch)
    down = check_sae(model, downstream, allow_mismatch=allow_mismatch)
    batch = as_batch(prompts, model.cfg.d_vocab)
    p = _target_positions(batch, pos)
    clean = _target_value(model, downstream, down, feature, batch, p)
    fe = [clean - _target_value(model, downstream, down, feature, batch, p,
                                [splice_edit(upstream, up, error_term=True, edit=zero_features(torch.tensor([int(i)])))])
          for i in features]
    he = [clean - _target_value(model, downstream, down, feature, batch, p, [Zero(Node(layer, Site.HEAD, head=head))])
          for layer, head in heads]
    n = len(batch)
    return (torch.stack(fe, 1) if fe else torch.zeros(n, 0), torch.stack(he, 1) if he else torch.zeros(n, 0))


@dataclass(frozen=True)
class FeatureGraph:
    """A small attribution graph: nodes are SAE features ("L{level}F{i}") and heads ("L{layer}H{h}").

    ``edges`` columns: source, target, weight (mean attribution over examples), exact (mean exact
    ablation effect, when checked), source_kind ("feature" | "head").
    """

    nodes: pd.DataFrame
    edges: pd.DataFrame
    hook_names: tuple[str, ...]
    correlation: float

    @property
    def values(self) -> pd.DataFrame:
        return self.edges

    def to_frame(self) -> pd.DataFrame:
        return self.edges.copy()

    def plot(self) -> go.Figure:
        """Nodes by depth (x) and rank (y); edges coloured by sign, width by |weight|."""
        nodes = self.nodes.set_index("id")
        fig = go.Figure()
        wmax = float(self.edges["weight"].abs().max() or 1.0) if len(self.edges) else 1.0
        for _, e in self.edges.iterrows():
            a, b = nodes.loc[e["source"]], nodes.loc[e["target"]]
            fig.add_trace(go.Scatter(x=[a["x"], b["x"]], y=[a["y"], b["y"]], mode="lines", hoverinfo="text",
                                     text=f"{e['source']} -> {e['target']}: {e['weight']:.3g}",
                                     line=dict(width=1 + 6 * abs(e["weight"]) / wmax,
                                               color="#2166ac" if e["weight"] > 0 else "#b2182b"),
                                     showlegend=False))
        fig.add_trace(go.Scatter(x=self.nodes["x"], y=self.nodes["y"], mode="markers+text", text=self.nodes["id"],
                                 textposition="top center", marker=dict(size=12, color=[
                                     "#444" if k == "feature" else "#e08214" for k in self.nodes["kind"]]),
                                 showlegend=False))
        fig.update_layout(title=f"Feature attribution graph (attribution vs exact r = {self.correlation:.3f})",
                          xaxis_title="depth", yaxis=dict(visible=False), template="plotly_white")
        return fig


def feature_graph(
    model: HookedTransformer, saes: Sequence[SAE], feature: int, prompts: Tensor | Batch | Prompts, *,
    pos: int | Tensor | str = -1, top_k: int = 5, check: bool = True, allow_mismatch: bool = False,
) -> FeatureGraph:
    """Trace `feature` of the last SAE in `saes` (ordered by depth) back through the others.

    At each level the `top_k` upstream features and `top_k` heads by |mean attribution| become
    edges; the features recurse one level up. With `check`, every edge's exact ablation effect
    is measured and the Pearson correlation of attribution vs exact over edges is reported.
    Every SAE's recorded hook and model are checked (`check_sae`; `allow_mismatch` skips that).
    """
    if len(saes) < 2:
        raise ValueError(f"feature_graph: expected at least 2 SAEs (upstream ... target), got {len(saes)}")
    names = tuple(check_sae(model, s, allow_mismatch=allow_mismatch) for s in saes)
    if any(_order(a) >= _order(b) for a, b in zip(names, names[1:], strict=False)):
        raise ValueError(f"feature_graph: expected SAEs ordered by depth, got hooks {list(names)}")
    last = len(saes) - 1
    node_rows: dict[str, dict[str, Any]] = {}

    def fid(level: int, i: int) -> str:
        return f"S{level}F{i}"

    node_rows[fid(last, feature)] = {"id": fid(last, feature), "kind": "feature", "level": last, "index": feature,
                                     "hook": names[last], "x": float(last), "y": 0.0}
    edges: list[dict[str, Any]] = []
    frontier = [feature]
    for level in range(last, 0, -1):
        nxt: list[int] = []
        for tgt in frontier:
            src = attribute_sources(model, saes[level - 1], saes[level], tgt, prompts, pos,
                                    allow_mismatch=allow_mismatch)
            fmean = src.features.mean(0)
            top_f = [int(i) for i in fmean.abs().topk(min(top_k, fmean.numel())).indices if float(fmean[i]) != 0]
            hmean = src.heads.mean(0)
            flat = hmean.flatten()
            top_h = [(src.head_layers[int(j) // hmean.shape[1]], int(j) % hmean.shape[1])
                     for j in flat.abs().topk(min(top_k, flat.numel())).indices if float(flat[j]) != 0] \
                if flat.numel() else []
            exact_f = exact_h = None
            if check:
                ef, eh = exact_source_effects(model, saes[level - 1], saes[level], tgt, prompts, features=top_f,
                                              heads=top_h, pos=pos, allow_mismatch=allow_mismatch)
                exact_f, exact_h = ef.mean(0), eh.mean(0)
            for r, i in enumerate(top_f):
                node_rows.setdefault(fid(level - 1, i), {"id": fid(level - 1, i), "kind": "feature",
                                                         "level": level - 1, "index": i, "hook": names[level - 1],
                                                         "x": float(level - 1), "y": 0.0})
                edges.append({"source": fid(level - 1, i), "target": fid(level, tgt), "weight": float(fmean[i]),
                              "exact": float(exact_f[r]) if exact_f is not None else float("nan"),
                              "source_kind": "feature"})
                if i not in nxt:
                    nxt.append(i)
            for r, (layer, h) in enumerate(top_h):
                hid = f"L{layer}H{h}"
                node_rows.setdefault(hid, {"id": hid, "kind": "head", "level": level - 0.5, "index": h,
                                           "hook": _head_node(layer).hook_name, "x": level - 0.5, "y": 0.0})
                j = src.head_layers.index(layer)
                edges.append({"source": hid, "target": fid(level, tgt), "weight": float(hmean[j, h]),
                              "exact": float(exact_h[r]) if exact_h is not None else float("nan"),
                              "source_kind": "head"})
        frontier = nxt
    nodes = pd.DataFrame(list(node_rows.values()))
    for _, grp in nodes.groupby("x"):
        nodes.loc[grp.index, "y"] = list(range(len(grp)))
    edge_frame = pd.DataFrame(edges, columns=["source", "target", "weight", "exact", "source_kind"])
    corr = (pearson(torch.tensor(edge_frame["weight"].to_numpy()), torch.tensor(edge_frame["exact"].to_numpy()))
            if check and len(edge_frame) > 1 else float("nan"))
    return FeatureGraph(nodes, edge_frame, names, corr)


__all__ = ["FeatureGraph", "Sources", "attribute_sources", "exact_source_effects", "feature_graph", "heads_between"]

