"""The batched patching driver shared by every patching method.

Activation patching (Vig et al. 2020; Meng et al. 2022; Zhang & Nanda 2024) replaces an
activation of one run (the *base*) with the same activation from another run (the *source*) and
measures a metric of the output. Denoising patches clean values into the corrupted run
(sufficiency); noising patches corrupted values into the clean run (necessity).

How it is made fast, exactly:
- many patched copies of the base batch are stacked along the batch axis and run in one
  forward pass, in chunks of at most `rows` rows so memory stays bounded;
- a patch at layer l cannot change anything below l, so every copy starts at layer l from the
  base run's cached `resid_pre[l]` (`model(resid, start_at_layer=l)`): the unchanged prefix is
  computed once, in the caching run;
- when the metric declares the positions it reads (`PositionMetric`), only those positions are
  normalised and unembedded.

Plan, then apply: callers turn nodes into `Edit`s (which entries of which hook take which
values) and, to restrict who reads patched keys/values, `EdgeEdit`s (which (query, key) edges
of one layer's attention read them), group them into copies, and `run_copies` owns the loop.
Hooks are attached through TransformerLens's `model.hooks` context, which removes them in
`finally`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.utilities.activation_functions import apply_softcap

from interp.arch import Arch
from interp.graph import Node, Site
from interp.patching.metrics import Metric, check_scalar, evaluate, metric_positions
from interp.tokens import Batch, check_model_tokens

log = logging.getLogger(__name__)

Direction = Literal["denoising", "noising"]

DEFAULT_ROWS = 256  # rows (examples x patched copies) per forward pass


def check_direction(direction: str) -> Direction:
    if direction not in ("denoising", "noising"):
        raise ValueError(f"direction: expected 'denoising' (clean into corrupted) or 'noising' "
                         f"(corrupted into clean), got {direction!r}")
    return direction  # type: ignore[return-value]


def check_rows(rows: int) -> int:
    if not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows: expected a positive int (rows per forward pass), got {rows!r}")
    return rows


def unpadded(tokens: object, name: str) -> object:
    """The token tensor of an unpadded `Batch`; a padded one is refused with the reason."""
    if isinstance(tokens, Batch):
        if bool((tokens.lengths != tokens.tokens.shape[1]).any()):
            raise ValueError(
                f"{name}: expected prompts of one length, got a padded Batch (lengths "
                f"{int(tokens.lengths.min())}..{int(tokens.lengths.max())}, {tokens.side} padding); "
                f"patching pairs position p with position p and the metric reads fixed positions, "
                f"so group prompts by length (or build same-length corruptions) first")
        return tokens.tokens
    return tokens


def check_pair(model: HookedTransformer, clean: Tensor | Batch, corrupt: Tensor | Batch
               ) -> tuple[Tensor, Tensor]:
    """Validate a clean/corrupted token pair and move it to the model's device.

    A raw tensor is taken as unpadded prompts (pad cannot be told from a token); a `Batch` is
    accepted when it holds no padding and refused otherwise.
    """
    clean = check_model_tokens(model, unpadded(clean, "clean tokens"), "clean tokens")
    corrupt = check_model_tokens(model, unpadded(corrupt, "corrupted tokens"), "corrupted tokens")
    if clean.shape != corrupt.shape:
        raise ValueError(
            f"corrupted tokens: expected the clean shape {tuple(clean.shape)}, got "
            f"{tuple(corrupt.shape)}; patching pairs position p with position p, so prompts of "
            f"different lengths need an explicit alignment first (pad with interp.tokens.Batch, "
            f"or build same-length corruptions by symmetric token replacement)"
        )
    if model.cfg.positional_embedding_type == "shortformer":
        raise ValueError("model: expected a positional scheme other than 'shortformer', got "
                         "'shortformer'; starting a forward pass mid-model needs its position "
                         "embeddings, which interp.patching does not thread through")
    device = model.cfg.device
    return clean.to(device), corrupt.to(device)


def check_finite(x: Tensor, what: str) -> Tensor:
    """Raise when `x` (logits or activations, batch first) holds NaN or Inf, naming the rows.

    One isfinite reduction; a NaN would otherwise be averaged into every metric downstream.
    """
    ok = torch.isfinite(x)
    if not bool(ok.all()):
        rows = torch.nonzero(~ok.reshape(x.shape[0], -1).all(dim=1))[:, 0].tolist()
        kinds = "NaN" if bool(torch.isnan(x).any()) else "Inf"
        raise ValueError(f"{what}: expected finite values, got {kinds} in rows {rows[:10]}"
                         + (f" (and {len(rows) - 10} more)" if len(rows) > 10 else "")
                         + "; check the model's weights and the inputs of those prompts")
    return x


def resid_pre_name(layer: int) -> str:
    return Node(layer, Site.RESID_PRE).hook_name


def cached_run(model: HookedTransformer, tokens: Int[Tensor, "batch pos"], names: set[str]
               ) -> tuple[Float[Tensor, "batch pos d_vocab"], dict[str, Tensor]]:
    """One forward pass returning the logits and the activations at `names`."""
    cache: dict[str, Tensor] = {}

    def save(act: Tensor, hook) -> None:
        cache[hook.name] = act

    with torch.inference_mode(), model.hooks(fwd_hooks=[(n, save) for n in sorted(names)]):
        logits = model(tokens)
    missing = names - set(cache)
    if missing:
        raise RuntimeError(f"caching run: expected hooks {sorted(missing)} to fire, they did not")
    return logits, cache


@dataclass(frozen=True)
class Runs:
    """The two runs of a patching experiment: `base` is patched with values from `source`."""

    direction: Direction
    base_tokens: Tensor
    base: dict[str, Tensor]  # hook name -> activation of the base run
    source: dict[str, Tensor]
    clean_metric: float
    corrupt_metric: float
    clean_logits: Tensor
    corrupt_logits: Tensor

    @property
    def base_metric(self) -> float:
        return self.corrupt_metric if self.direction == "denoising" else self.clean_metric

    @property
    def base_logits(self) -> Tensor:
        return self.corrupt_logits if self.direction == "denoising" else self.clean_logits

    @property
    def source_metric(self) -> float:
        return self.clean_metric if self.direction == "denoising" else self.corrupt_metric


def prepare(model: HookedTransformer, clean: Tensor, corrupt: Tensor, metric: Metric | None,
            names: set[str], direction: Direction, kv: bool = True) -> Runs:
    """Run clean and corrupted once each, caching `names` plus every layer's resid_pre (and,
    with `kv`, every layer's keys and values, which let patched runs skip unchanged positions)."""
    check_direction(direction)
    clean, corrupt = check_pair(model, clean, corrupt)
    names = set(names) | {resid_pre_name(layer) for layer in range(model.cfg.n_layers)}
    if kv and can_skip_prefix(model):
        names |= kv_names(model.cfg.n_layers)
    clean_logits, clean_cache = cached_run(model, clean, names)
    corrupt_logits, corrupt_cache = cached_run(model, corrupt, names)
    check_finite(clean_logits, "clean run logits")
    check_finite(corrupt_logits, "corrupted run logits")
    if metric is None:
        m_clean = m_corrupt = float("nan")
    else:
        m_clean = float(check_scalar(metric(clean_logits)))
        m_corrupt = float(check_scalar(metric(corrupt_logits)))
        for m, run in ((m_clean, "clean"), (m_corrupt, "corrupted")):
            if not math.isfinite(m):
                raise ValueError(f"metric on the {run} run: expected a finite number, got {m} "
                                 f"(the logits are finite, so the metric itself produced it)")
    if direction == "denoising":
        base_tokens, base, source = corrupt, corrupt_cache, clean_cache
    else:
        base_tokens, base, source = clean, clean_cache, corrupt_cache
    return Runs(direction, base_tokens, base, source, m_clean, m_corrupt, clean_logits, corrupt_logits)


# ----------------------------------------------------------------------------- edits and copies

@dataclass(frozen=True)
class Edit:
    """Replace the entries of hook `hook` (in block `layer`) selected by `mask` with `source`.

    `mask` covers the per-example axes before the feature axis: [pos] for residual-like hooks,
    [pos head] for per-head hooks. `source` has the activation's per-batch shape.
    """

    layer: int
    hook: str
    mask: Tensor
    source: Tensor


@dataclass(frozen=True)
class EdgeEdit:
    """Per-(query, key) choice, at one layer's attention, between the keys/values this copy's
    `Edit`s write into hook_k / hook_v and the base run's.

    `k_edges[h, q, k]` (`v_edges`) is True where query q of head h reads the copy's key (value) at
    position k; every other edge reads the base run's. Keys are chosen at the attention scores
    (an unmarked score is the base run's, `base_scores`, so the softmax normalises over the mixed
    row); values at the pattern . V product (an unmarked edge's share of the copy's value change
    is taken back out of z). None: no choice for that side (every edge reads the copy's).
    Exact when the layer's queries are the base run's: no edit of this copy below the layer
    and none of its queries.
    """

    layer: int
    k_edges: Bool[Tensor, "head q_pos k_pos"] | None
    v_edges: Bool[Tensor, "head q_pos k_pos"] | None
    base_scores: Float[Tensor, "batch head q_pos k_pos"] | None  # needed with k_edges
    base_values: Float[Tensor, "batch k_pos kv_head d_head"] | None  # needed with v_edges

    def __post_init__(self) -> None:
        if (self.k_edges is None) != (self.base_scores is None):
            raise ValueError("EdgeEdit: expected base_scores exactly when k_edges is given, got "
                             f"k_edges={self.k_edges is not None}, base_scores={self.base_scores is not None}")
        if (self.v_edges is None) != (self.base_values is None):
            raise ValueError("EdgeEdit: expected base_values exactly when v_edges is given, got "
                             f"v_edges={self.v_edges is not None}, base_values={self.base_values is not None}")


AnyEdit = Edit | EdgeEdit


def node_mask(node: Node, seq_len: int, n_heads: int, device: torch.device | str) -> Bool[Tensor, "..."]:
    """The entries a node selects: [pos] or [pos head] booleans."""
    site: Site = node.site  # type: ignore[assignment]
    shape = (seq_len, n_heads) if site.per_head else (seq_len,)
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    pos = slice(None) if node.pos is None else node.pos % seq_len
    if site.per_head:
        mask[pos, slice(None) if node.head is None else node.head] = True
    else:
        mask[pos] = True
    return mask


def heads_at(model: HookedTransformer, site: Site) -> int:
    """Size of the head axis of a per-head hook (KV groups for K/V unless ungrouped)."""
    arch = Arch.of(model)
    if site.per_kv_group and not getattr(model.cfg, "ungroup_grouped_query_attention", False):
        return arch.n_kv_heads
    return arch.n_heads


def validate_node(model: HookedTransformer, node: Node, seq_len: int) -> Node:
    """`Node.validate` against this model, knowing that ungrouped GQA models index K/V by head."""
    arch = Arch.of(model)
    if getattr(model.cfg, "ungroup_grouped_query_attention", False):
        from dataclasses import replace
        arch = replace(arch, n_kv_heads=arch.n_heads)
    return node.validate(arch, seq_len)


def node_edit(model: HookedTransformer, node: Node, source: dict[str, Tensor], seq_len: int) -> Edit:
    """An Edit that writes the source run's value of `node`."""
    node = validate_node(model, node, seq_len)
    site: Site = node.site  # type: ignore[assignment]
    if site in (Site.PATTERN, Site.Q_INPUT, Site.K_INPUT, Site.V_INPUT):
        raise ValueError(f"{node}: expected a patchable site (resid_pre/mid/post, attn_out, mlp_out, "
                         f"head, q, k, v), got {site.value!r}")
    mask = node_mask(node, seq_len, heads_at(model, site), model.cfg.device)
    return Edit(node.layer, node.hook_name, mask, source[node.hook_name])


def merge_edits(edits: Sequence[AnyEdit]) -> list[AnyEdit]:
    """Combine edits of one copy that write the same source tensor into the same hook."""
    out: dict[tuple[str, int], Edit] = {}
    choices = []
    for e in edits:
        if isinstance(e, EdgeEdit):
            choices.append(e)
            continue
        key = (e.hook, id(e.source))
        if key in out:
            prev = out[key]
            out[key] = Edit(e.layer, e.hook, prev.mask | e.mask, e.source)
        else:
            out[key] = e
    return [*out.values(), *choices]


def chunk_hooks(copies: Sequence[Sequence[AnyEdit]], batch: int, p0: int = 0) -> list[tuple[str, object]]:
    """TransformerLens hooks applying copy c's edits to rows [c*batch, (c+1)*batch).

    With `p0 > 0` the forward pass computes positions p0.. only (earlier ones come from a K/V
    cache), so masks and sources are cut to those positions. `EdgeEdit` hooks come after the
    `Edit` hooks, so they see the keys/values those write.
    """
    k = len(copies)
    per_hook: dict[str, list[list[Edit]]] = {}
    per_layer: dict[int, list[EdgeEdit | None]] = {}
    for c, edits in enumerate(copies):
        for e in edits:
            if isinstance(e, EdgeEdit):
                slots = per_layer.setdefault(e.layer, [None] * k)
                if slots[c] is not None:
                    raise ValueError(f"copy {c}: expected at most one EdgeEdit per layer, got two at layer {e.layer}")
                slots[c] = e
            else:
                per_hook.setdefault(e.hook, [[] for _ in range(k)])[c].append(e)
    hooks = []
    for name, lists in per_hook.items():
        depth = max(len(x) for x in lists)
        stages = []
        for i in range(depth):
            chosen = [x[i] if i < len(x) else None for x in lists]
            present = [e for e in chosen if e is not None]
            template = present[0]
            mask = torch.stack([e.mask if e is not None else torch.zeros_like(template.mask)
                                for e in chosen])[:, p0:]  # [k, pos(, head)]
            if all(e.source is template.source for e in present):
                src = template.source[:, p0:].unsqueeze(0)  # [1, batch, ...]
            else:
                src = torch.stack([e.source[:, p0:] if e is not None else template.source[:, p0:]
                                   for e in chosen])
            # broadcast: [k, 1 (batch), pos(, head), 1 (features)]
            stages.append((mask.unsqueeze(1).unsqueeze(-1), src))

        def hook(act: Tensor, hook, stages=stages) -> Tensor:
            v = act.reshape(k, batch, *act.shape[1:])
            for mask, src in stages:
                v = torch.where(mask, src.to(v.dtype), v)
            return v.reshape(act.shape)

        hooks.append((name, hook))
    for layer, slots in per_layer.items():
        v_cols = sorted({int(p) for c, edits in enumerate(copies) if slots[c] is not None for e in edits
                         if isinstance(e, Edit) and e.hook == Node(layer, Site.V).hook_name
                         for p in torch.nonzero(e.mask.reshape(e.mask.shape[0], -1).any(-1))[:, 0]})
        hooks += edge_hooks(layer, slots, batch, p0, v_cols)
    return hooks


def edge_hooks(layer: int, slots: Sequence[EdgeEdit | None], batch: int, p0: int,
               v_cols: list[int]) -> list[tuple[str, object]]:
    """Hooks at `layer`'s attention that apply the copies' shared per-(query, key) K/V choice.

    Keys: unmarked scores are replaced by the base run's (the causal mask is the same in both).
    Values: with the copy's values v' written into hook_v, the wanted output of query q is
    sum_k p[q, k] (E[q, k] v'[k] + (1 - E[q, k]) v[k]) = z - sum_k p[q, k] (1 - E[q, k]) (v'[k] - v[k]),
    where p is this pass's pattern; only key positions `v_cols` (those the copy's value edits
    write) can differ.
    """
    k = len(slots)
    choice = slots[0]
    if choice is None or any(e is not choice for e in slots):
        # path patching gives every copy the same choice; a per-copy one would need stacking
        raise ValueError(f"EdgeEdit at layer {layer}: expected one EdgeEdit shared by every copy of a "
                         f"chunk, got {len({id(e) for e in slots})} different ones (or copies without one)")
    hooks: list[tuple[str, object]] = []
    # queries p0.. are computed in this pass; keys cover every position (earlier ones are cached)
    if choice.k_edges is not None and choice.base_scores is not None:
        k_mask = choice.k_edges[:, p0:]  # [head, q, k_pos], broadcast over copies and batch
        base_scores = choice.base_scores[:, :, p0:]  # [batch, head, q, k_pos]

        def scores_hook(act: Tensor, hook, k_mask=k_mask, base_scores=base_scores) -> Tensor:
            v = act.reshape(k, batch, *act.shape[1:])
            return torch.where(k_mask, v, base_scores.to(v.dtype)).reshape(act.shape)

        hooks.append((Node(layer, Site.ATTN_SCORES).hook_name, scores_hook))
    if choice.v_edges is not None and choice.base_values is not None and v_cols:
        cols = torch.tensor(v_cols, device=choice.v_edges.device)
        off = ~choice.v_edges[:, p0:][..., cols]  # [head, q, cols]: edges that must read base values
        base_at = choice.base_values[:, cols]  # [batch, cols, kv_head, d_head]
        seen: dict[str, Tensor] = {}

        def grab_values(act: Tensor, hook) -> None:
            seen["v"] = act

        def grab_pattern(act: Tensor, hook) -> None:
            seen["pattern"] = act

        def z_hook(act: Tensor, hook) -> Tensor:
            z = act.reshape(k, batch, *act.shape[1:])  # [k, batch, q, head, d_head]
            written = seen.pop("v")
            written = written.reshape(k, batch, *written.shape[1:])[:, :, cols - p0]
            change = written - base_at.to(written.dtype)  # [k, batch, cols, kv_head, d_head]
            change = change.repeat_interleave(z.shape[3] // change.shape[3], dim=3)  # KV groups -> heads
            pattern = seen.pop("pattern")
            pattern = pattern.reshape(k, batch, *pattern.shape[1:])[..., cols]  # [k, batch, head, q, cols]
            wrong = torch.einsum("cbhqk,cbkhd->cbqhd", (pattern * off).to(change.dtype), change)
            return (z - wrong.to(z.dtype)).reshape(act.shape)

        hooks += [(Node(layer, Site.V).hook_name, grab_values), (Node(layer, Site.PATTERN).hook_name, grab_pattern),
                  (Node(layer, Site.HEAD).hook_name, z_hook)]
    return hooks


def final_logits(model: HookedTransformer, resid: Float[Tensor, "rows pos d_model"],
                 positions: list[int] | None) -> Float[Tensor, "rows k d_vocab"]:
    """ln_final + unembedding (+ soft cap) of the final residual, at `positions` only."""
    if positions is not None:
        resid = resid[:, positions]
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    # TransformerLens's Unembed copies W_U.T into a contiguous tensor on every call (d_model x
    # d_vocab: 154 MB for GPT-2, about a third of a small sweep's time); a transposed view is free
    logits = F.linear(resid, model.unembed.W_U.T, model.unembed.b_U)
    return apply_softcap(logits, model.cfg.output_logits_soft_cap)


def forward_from(model: HookedTransformer, resid: Float[Tensor, "rows pos d_model"], start: int,
                 positions: list[int] | None, hooks: list, past_kv: object = None
                 ) -> Float[Tensor, "rows k d_vocab"]:
    """Run blocks start.. on `resid` under `hooks`; the logits at `positions`."""
    with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
        out = model(resid, start_at_layer=start, stop_at_layer=model.cfg.n_layers, past_kv_cache=past_kv)
        return final_logits(model, out, positions)


def can_skip_prefix(model: HookedTransformer) -> bool:
    """Whether positions before every patch can be fed from a K/V cache of the base run.

    Needs the cached keys to be exactly the hook_k/hook_v values (no QK-norm or clipping between
    them and the cache) and causal attention whose positions come from the residual or rotary.
    """
    cfg = model.cfg
    return (cfg.positional_embedding_type in ("standard", "rotary")
            and cfg.attention_dir == "causal"
            and not getattr(cfg, "use_qk_norm", False)
            and getattr(cfg, "clip_qkv", None) is None
            and not getattr(cfg, "use_logn_attn", False)
            and cfg.n_devices == 1)


def kv_names(n_layers: int) -> set[str]:
    return {Node(layer, s).hook_name for layer in range(n_layers) for s in (Site.K, Site.V)}


def _first_pos(edits: Sequence[AnyEdit]) -> int:
    """The first position any edit touches (positions before it are unchanged). An EdgeEdit
    only chooses between the base run's keys/values and those its copy's Edits write."""
    first = None
    for e in edits:
        if isinstance(e, EdgeEdit):
            continue
        m = e.mask if e.mask.ndim == 1 else e.mask.any(-1)
        hit = torch.nonzero(m)
        if hit.numel():
            p = int(hit[0, 0])
            first = p if first is None else min(first, p)
    return 0 if first is None else first


def _past_kv(runs: Runs, start: int, n_layers: int, p0: int, k: int):
    """A frozen TransformerLens K/V cache holding the base run's keys/values of positions < p0."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    entries = []
    for layer in range(n_layers):
        src = max(layer, start)  # blocks below `start` do not run; any entry will do
        keys = runs.base[Node(src, Site.K).hook_name][:, :p0]
        values = runs.base[Node(src, Site.V).hook_name][:, :p0]
        entries.append(TransformerLensKeyValueCacheEntry(
            past_keys=keys.repeat(k, 1, 1, 1), past_values=values.repeat(k, 1, 1, 1), frozen=True))
    mask = torch.ones((k * keys.shape[0], p0), dtype=torch.int, device=keys.device)
    return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask, frozen=True)


# Fixed cost of one extra forward pass, in token-rows. Measured on the bench model (12 layers,
# d_model 768, 16 tokens, CPU): splitting a layer's 16 copies into chunks by first position cost
# more CPU time than one full chunk, so extra passes only pay for themselves on long prefixes.
PASS_OVERHEAD = 256


def plan_chunks(idx: list[int], firsts: list[int], per_chunk: int, batch: int, seq_len: int
                ) -> list[list[int]]:
    """Split copies (sorted by first patched position, descending) into chunks of <= per_chunk.

    A chunk computes positions min(first).. for all its copies, so late-position copies grouped
    together skip more of the prefix, while every extra forward pass costs a fixed overhead.
    Dynamic programming over cut points minimises sum(rows x positions + PASS_OVERHEAD).
    """
    n = len(idx)
    if n == 0:
        return []
    if n > 4096:  # keep planning cheap on huge sweeps: fixed-size chunks
        return [idx[lo:lo + per_chunk] for lo in range(0, n, per_chunk)]
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j copies
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - per_chunk), j):
            # copies i..j-1; the last one has the smallest first position
            cost = best[i] + (j - i) * batch * (seq_len - firsts[j - 1]) + PASS_OVERHEAD
            if cost < best[j]:
                best[j], cut[j] = cost, i
    chunks, j = [], n
    while j > 0:
        chunks.append(idx[cut[j]:j])
        j = cut[j]
    return chunks[::-1]


def run_copies(model: HookedTransformer, runs: Runs, copies: Sequence[Sequence[AnyEdit]], metric: Metric,
               *, rows: int = DEFAULT_ROWS, progress: bool = False, desc: str = "patching",
               labels: Sequence[object] | None = None) -> Float[Tensor, "copies"]:
    """The metric of each patched copy of the base run (one value per copy, float64, CPU).

    Copies are grouped by the layer they start at and, when `runs` holds the base K/V
    (`prepare(..., kv=True)`), by the first position they touch: a chunk whose patches all lie
    at positions >= p0 computes positions p0.. only, reading the base run's keys and values of
    the earlier (unchanged) positions from a frozen K/V cache. A non-finite value raises,
    naming the copy by its entry in `labels`.
    """
    check_rows(rows)
    batch, seq_len = runs.base_tokens.shape
    positions = metric_positions(metric, seq_len)
    merged = [merge_edits(c) for c in copies]
    n_layers = model.cfg.n_layers
    skip = Node(0, Site.K).hook_name in runs.base and can_skip_prefix(model)
    starts = [min((e.layer for e in c), default=n_layers) for c in merged]
    firsts = [_first_pos(c) if skip else 0 for c in merged]
    per_chunk = max(1, rows // batch)
    order: dict[int, list[int]] = {}
    for i, s in enumerate(starts):
        order.setdefault(s, []).append(i)
    out = torch.empty(len(copies), dtype=torch.float64)
    bar = tqdm(total=len(copies), desc=desc, disable=not progress, leave=False)
    try:
        for start in sorted(order):
            idx = sorted(order[start], key=lambda i: -firsts[i])
            for chunk in plan_chunks(idx, [firsts[i] for i in idx], per_chunk, batch, seq_len):
                k = len(chunk)
                if start >= n_layers:  # a copy with no edits is the base run itself
                    logits = runs.base_logits
                    logits = (logits if positions is None else logits[:, positions]).repeat(k, 1, 1)
                else:
                    p0 = min(firsts[i] for i in chunk)
                    if positions is not None:
                        p0 = min(p0, *positions)
                    hooks = chunk_hooks([merged[i] for i in chunk], batch, p0)
                    resid = runs.base[resid_pre_name(start)][:, p0:].repeat(k, 1, 1)
                    past = _past_kv(runs, start, n_layers, p0, k) if p0 > 0 else None
                    rel = None if positions is None else [p - p0 for p in positions]
                    logits = forward_from(model, resid, start, rel, hooks, past)
                    if positions is None and p0 > 0:  # unchanged logits of the skipped prefix
                        logits = torch.cat([runs.base_logits[:, :p0].repeat(k, 1, 1), logits], dim=1)
                logits = logits.reshape(k, batch, *logits.shape[1:])
                for j, i in enumerate(chunk):
                    out[i] = float(evaluate(metric, logits[j], positions))
                bar.update(k)
    finally:
        bar.close()
    bad = torch.nonzero(~torch.isfinite(out))[:, 0].tolist()
    if bad:
        where = [str(labels[i]) if labels is not None else f"copy {i}" for i in bad[:5]]
        raise ValueError(f"{desc}: expected a finite metric for every patched copy, got NaN/Inf for "
                         f"{len(bad)} of {len(copies)} (first: {', '.join(where)}); the clean and "
                         f"corrupted runs are finite, so the patched values overflow there")
    return out
