"""The batched patching driver shared by every patching method.

Activation patching (Vig et al. 2020; Meng et al. 2022; Zhang & Nanda 2024) replaces an
activation of one run (the *base*) with the same activation from another run (the *source*) and
measures a metric of the output. Denoising patches clean values into the corrupted run
(sufficiency); noising patches corrupted values into the clean run (necessity).

Inputs are `interp.prompts.Prompts` of any lengths: the clean prompts and their corrupted
partners (`prompts.partner`, or an explicit `corrupt=`), each example's clean and corrupted
prompt of the same length (position p is paired with position p) — unless every patched
position is a span name: then the two prompts may differ in length (cross-position patching:
the source value is read at the source prompt's own span of the name and written at the base
prompt's, and each run's metric is read at that run's own positions, see `read_as`). Everything is computed on the
right-padded layout: under causal attention a pad token after a prompt changes nothing before
it, so each example's values equal running that prompt alone. Positions are in prompt
coordinates (`interp.prompts`): an int (negative counts from each prompt's end), a span name
(`"subject"`, `"last"`: a different position in each prompt) or a per-example tensor. A position
an example does not have (p >= its length) makes that example's value NaN for that cell.

The metric is the per-example contract of `interp.metrics` (`metric(logits, prompts) ->
[batch]`); every method keeps one value per (copy, example).

How it is made fast, exactly:
- many patched copies of the base batch are stacked along the batch axis and run in one
  forward pass, in chunks of at most `rows` rows so memory stays bounded;
- a patch at layer l cannot change anything below l, so every copy starts at layer l from the
  base run's cached `resid_pre[l]` (`model(resid, start_at_layer=l)`): the unchanged prefix is
  computed once, in the caching run;
- positions before the first patched position (over the chunk's copies and examples) and before
  the first position the metric reads are unchanged too: they are fed from a frozen K/V cache of
  the base run and not recomputed; on a TransformerBridge a chunk's copies may instead be packed
  end to end, each from its own first position (`interp.arch.forward_packed`), where that costs
  fewer multiply-adds (`pack_pays`);
- when the metric declares the positions it reads (`interp.metrics.ReadMetric`), only those rows
  of each example are normalised and unembedded, several passes' rows in one product;
- a copy whose every edit writes, bit for bit, the base run's own values (in a denoising sweep
  after a one-token corruption at t: every patch before t, and at layer 0 every patch but t's)
  is the base run: its value is read from the base run's logits, with no forward pass.

Plan, then apply: callers turn nodes into `Edit`s (which entries of which hook take which
values, per example) and, to restrict who reads patched keys/values, `EdgeEdit`s (which
(query, key) edges of one layer's attention read them), group them into copies, and
`run_copies` owns the loop. Hooks are attached through TransformerLens's `model.hooks` context,
which removes them in `finally`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.arch import (
    Arch,
    BlockInputs,
    Model,
    Packing,
    block_inputs,
    can_pack,
    can_skip_prefix,
    can_start_mid,
    device_of,
    forward_packed,
    gather_positions,
    is_bridge,
    unembed,
)
from interp.arch import forward_from as arch_forward_from
from interp.graph import Node, Site, parse_site
from interp.hooks import Intervention, run
from interp.metrics import Metric, ReadMetric, as_metric, check_per_example
from interp.prompts import ANSWER, LAST, Prompts, as_prompts
from interp.tokens import Batch, check_model_tokens

log = logging.getLogger(__name__)

Direction = Literal["denoising", "noising"]

DEFAULT_ROWS = 256  # rows (examples x patched copies) per forward pass

PosSpec = int | str | Tensor | None


def check_direction(direction: str) -> Direction:
    if direction not in ("denoising", "noising"):
        raise ValueError(f"direction: expected 'denoising' (clean into corrupted) or 'noising' "
                         f"(corrupted into clean), got {direction!r}")
    return direction  # type: ignore[return-value]


def check_rows(rows: int) -> int:
    if not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows: expected a positive int (rows per forward pass), got {rows!r}")
    return rows


# ------------------------------------------------------------------------------ places (nodes)

@dataclass(frozen=True)
class At:
    """A node at a per-example position: like `interp.graph.Node(layer, site, pos, head)`, but
    `pos` may also be a span name (``"subject"``, ``"last"``: each prompt's own span, patched
    whole) or a per-example tensor ([batch] indices, or a [batch, pos] mask), in prompt
    coordinates. `node` is the graph node (pos None) that names the hook."""

    layer: int
    site: Site | str = Site.RESID_PRE
    pos: PosSpec = None
    head: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "site", parse_site(self.site))
        p = self.pos
        if not (p is None or isinstance(p, (str, Tensor)) or (isinstance(p, int) and not isinstance(p, bool))):
            raise TypeError(f"At.pos: expected None, an int, a span name or a per-example tensor, got "
                            f"{type(p).__name__} {p!r}")
        Node(self.layer, self.site, None, self.head)  # validates layer, site and head

    @property
    def node(self) -> Node:
        return Node(self.layer, self.site, None, self.head)

    @property
    def hook_name(self) -> str:
        return self.node.hook_name

    def __str__(self) -> str:
        parts = [f"L{self.layer}", self.site.value]  # type: ignore[union-attr]
        if self.head is not None:
            parts.append(f"H{self.head}")
        if self.pos is not None:
            parts.append("@per-example" if isinstance(self.pos, Tensor) else f"@{self.pos}")
        return "Node(" + " ".join(parts) + ")"


Place = Node | At


def as_at(x: object, what: str = "node") -> At:
    """A `Node` or `At` as an `At` (a Node's int position is in prompt coordinates)."""
    if isinstance(x, At):
        return x
    if isinstance(x, Node):
        return At(x.layer, x.site, x.pos, x.head)
    raise TypeError(f"{what}: expected an interp.graph.Node or an interp.patching.At, got {type(x).__name__} {x!r}")


def positions_mask(pos: PosSpec, prompts: Prompts, width: int, what: str = "position"
                   ) -> tuple[Bool[Tensor, "batch pos"], Bool[Tensor, "batch"]]:
    """The positions `pos` selects in each prompt (prompt coordinates = the right-padded layout),
    and which examples have them. None: every real position; an int p: position p of each prompt
    (negative: from each prompt's end), missing where the prompt is shorter; a name: that span;
    a [batch] tensor: one index per example; a [batch, pos] bool tensor: a mask."""
    b = len(prompts)
    lengths = prompts.lengths.cpu()
    ar = torch.arange(width)
    real = ar[None] < lengths[:, None]
    if pos is None:
        return real, torch.ones(b, dtype=torch.bool)
    if isinstance(pos, str):
        if pos not in prompts.spans:
            raise ValueError(f"{what}: expected an int, a per-example tensor or a span name among "
                             f"{sorted(prompts.spans)}, got {pos!r}; add spans with Prompts.with_spans")
        return prompts.span_mask(pos, width), torch.ones(b, dtype=torch.bool)
    if isinstance(pos, Tensor):
        t = pos.detach().cpu()
        if t.dtype == torch.bool:
            if t.ndim != 2 or t.shape[0] != b or t.shape[1] > width:
                raise ValueError(f"{what}: expected a [batch={b}, pos<={width}] mask, got shape {tuple(t.shape)}")
            m = torch.zeros(b, width, dtype=torch.bool)
            m[:, : t.shape[1]] = t
            if bool((m & ~real).any()):
                i = int(torch.nonzero((m & ~real).any(1))[0, 0])
                raise ValueError(f"{what}: expected positions inside each prompt, got one past the "
                                 f"{int(lengths[i])} tokens of prompt {i}")
            return m, m.any(1)
        if t.dtype.is_floating_point or t.shape != (b,):
            raise ValueError(f"{what}: expected a [batch={b}] integer tensor (one index per prompt), got "
                             f"{t.dtype} of shape {tuple(t.shape)}")
        idx = torch.where(t < 0, t + lengths, t).long()
        valid = (idx >= 0) & (idx < lengths)
        return (ar[None] == idx[:, None]) & valid[:, None], valid
    p = int(pos)
    idx = torch.full((b,), p) + (lengths if p < 0 else 0)
    valid = (idx >= 0) & (idx < lengths)
    return (ar[None] == idx[:, None]) & valid[:, None], valid


# ------------------------------------------------------------------------------ prompts, runs

def check_prompts(model: Model, prompts: Prompts | Batch | Tensor,
                  corrupt: Prompts | Batch | Tensor | None, *, cross: bool = False) -> tuple[Prompts, Prompts]:
    """The clean and corrupted prompts, right-padded, each trimmed to its longest prompt, on the
    model's device; the clean prompts carry the corrupted ones as their partner (for metrics such
    as `interp.metrics.logit_diff`). Each example's two prompts must have the same length unless
    `cross` (every patched position is a name, read at each run's own index of it)."""
    if not can_start_mid(model):
        raise ValueError("model: expected a positional scheme other than 'shortformer', got "
                         "'shortformer'; starting a forward pass mid-model needs its position "
                         "embeddings, which interp.patching does not thread through")
    clean = as_prompts(prompts, "clean tokens")
    if corrupt is None:
        if clean.partner is None:
            raise ValueError("corrupted prompts: expected prompts with a partner (prompts.partner, the "
                             "counterfactual run) or corrupt=..., got neither")
        bad = clean.partner
    else:
        bad = as_prompts(corrupt, "corrupted tokens")
    if (not cross and not isinstance(prompts, Batch) and not isinstance(corrupt, Batch) and corrupt is not None
            and tuple(clean.tokens.shape) != tuple(bad.tokens.shape)):
        raise ValueError(
            f"corrupted tokens: expected the clean shape {tuple(clean.tokens.shape)}, got "
            f"{tuple(bad.tokens.shape)}; patching pairs position p with position p, so prompts of "
            f"different lengths need an explicit alignment first (pad with interp.prompts.Prompts, "
            f"or build same-length corruptions by symmetric token replacement)")
    if len(bad) != len(clean):
        raise ValueError(f"corrupted prompts: expected {len(clean)} (one per clean prompt), got {len(bad)}")
    diff = [] if cross else torch.nonzero(clean.lengths != bad.lengths)[:, 0].tolist()
    if diff:
        i = diff[0]
        raise ValueError(
            f"corrupted prompt {i}: expected its clean prompt's length {int(clean.lengths[i])}, got "
            f"{int(bad.lengths[i])} ({len(diff)} rows differ); patching pairs position p with position "
            f"p, so build same-length corruptions (symmetric token replacement), or patch named positions "
            f"only (span names such as 'last': read at each prompt's own index of the name)")
    device = device_of(model)

    def fix(p: Prompts, name: str) -> Prompts:
        r = p.right()
        width = int(r.lengths.max())
        tokens = check_model_tokens(model, r.tokens[:, :width], name).to(device)
        return replace(r, tokens=tokens, partner=None)

    bad = fix(bad, "corrupted tokens")
    clean = fix(clean, "clean tokens").with_partner(bad)
    return clean, bad


def check_single(model: Model, prompts: Prompts | Batch | Tensor) -> Prompts:
    """One run's prompts, right-padded, trimmed to the longest prompt, on the model's device."""

    p = as_prompts(prompts).right()
    width = int(p.lengths.max())
    return replace(p, tokens=check_model_tokens(model, p.tokens[:, :width]).to(device_of(model)))


def check_finite(x: Tensor, what: str) -> Tensor:
    """Raise when `x` (logits or activations, batch first) holds NaN or Inf, naming the rows."""
    ok = torch.isfinite(x)
    if not bool(ok.all()):
        rows = torch.nonzero(~ok.reshape(x.shape[0], -1).all(dim=1))[:, 0].tolist()
        kinds = "NaN" if bool(torch.isnan(x).any()) else "Inf"
        raise ValueError(f"{what}: expected finite values, got {kinds} in rows {rows[:10]}"
                         + (f" (and {len(rows) - 10} more)" if len(rows) > 10 else "")
                         + "; check the model's weights and the inputs of those prompts")
    return x


def real_logits(logits: Tensor, prompts: Prompts) -> Tensor:
    """Logits with every pad position zeroed (pads are never read; a pad's logits may be anything)."""
    return logits.masked_fill(~prompts.mask.to(logits.device)[..., None], 0)  # not `* mask`: inf * 0 is NaN


def check_finite_logits(logits: Float[Tensor, "batch pos d_vocab"], prompts: Prompts, what: str
                        ) -> Float[Tensor, "batch pos d_vocab"]:
    """`check_finite` on the logits at real (non-pad) positions, in one reduction pass: a NaN or
    Inf anywhere makes its position's sum non-finite, so only when some real position's sum is
    not finite (a NaN/Inf, or a float overflow of the sum) is the exact element-wise check run
    (which names the rows). A full `isfinite` over batch x pos x vocab is ~20x slower on large
    vocabularies, and it ran on every clean/corrupt run."""
    sums = logits.sum(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    real = prompts.mask.to(logits.device)
    if bool(torch.isfinite(torch.where(real, sums, 0.0).sum())):
        return logits
    check_finite(real_logits(logits, prompts), what)
    return logits


def resid_pre_name(layer: int) -> str:
    return Node(layer, Site.RESID_PRE).hook_name


def cached_run(model: Model, tokens: Int[Tensor, "batch pos"], names: set[str],
               inputs: BlockInputs | None = None, kv: bool = False,
               edits: Sequence[Intervention] = ()
               ) -> tuple[Float[Tensor, "batch pos d_vocab"], dict[str, Tensor]]:
    """One forward pass returning the logits and the activations at `names`: the toolkit's one
    run path (`interp.hooks.run`; every hook must fire, hooks removed on exit). Finiteness is
    checked by the callers on the logits (a NaN activation reaches them). `inputs`, when given,
    is filled with the blocks' inputs (`interp.arch.block_inputs`: what a Bridge's partial
    forwards replay; with `kv`, also each layer's keys/values, which let a Bridge's replays skip
    unchanged positions). `edits` are applied (e.g. a rollout's continuous inputs at
    hook_embed)."""
    # On a Bridge, a block's recorded input is its resid_pre: read it there rather than through a
    # capture hook (TransformerLens's Bridge rebuilds its hook dictionary for every hook attached,
    # ~2.5 ms each). Not under edits: one could target a resid_pre hook, which the record precedes.
    pre = {resid_pre_name(layer): layer for layer in range(Arch.of(model).n_layers)} if is_bridge(model) and not edits else {}
    with torch.inference_mode(), block_inputs(model, kv=kv) as rec:
        out = run(model, tokens, edits=edits, captures=sorted(n for n in names if n not in pre), check_finite=False)
    acts = dict(out.acts)
    for name in names:
        if name in pre:
            acts[name] = rec.hidden[pre[name]]
    if inputs is not None:
        inputs.batch, inputs.kwargs, inputs.width, inputs.kv = rec.batch, rec.kwargs, rec.width, rec.kv
        inputs.chained, inputs.tokens, inputs.hidden = rec.chained, tokens, rec.hidden
    return out.logits, acts  # type: ignore[return-value]


def metric_values(metric: Metric, logits: Tensor, prompts: Prompts, what: str) -> Float[Tensor, "batch"]:
    """The metric's per-example values (float64, CPU); non-finite values raise, naming the rows."""
    v = check_per_example(as_metric(metric)(logits, prompts), len(prompts), "metric").detach().to("cpu", torch.float64)
    bad = torch.nonzero(~torch.isfinite(v))[:, 0].tolist()
    if bad:
        raise ValueError(f"metric on the {what}: expected a finite value per example, got NaN/Inf for "
                         f"prompts {bad[:10]} (the logits are finite, so the metric itself produced it)")
    return v


@dataclass(frozen=True)
class Runs:
    """The two runs of a patching experiment: `base` is patched with values from `source`.

    `prompts` are the clean prompts (right-padded, partner = the corrupted ones): the metric
    reads them in every run. Metric values are per example (float64, CPU)."""

    direction: Direction
    prompts: Prompts
    base_tokens: Tensor
    base: dict[str, Tensor]  # hook name -> activation of the base run
    source: dict[str, Tensor]
    clean_values: Tensor
    corrupt_values: Tensor
    clean_logits: Tensor
    corrupt_logits: Tensor
    # cross-position runs (prompts of different lengths, named positions): each run's own prompts
    base_prompts: Prompts | None = None
    source_prompts: Prompts | None = None
    # the base run's block inputs (what a Bridge's partial forwards replay; empty on a HookedTransformer)
    base_inputs: BlockInputs | None = None

    @property
    def clean_metric(self) -> float:
        return float(self.clean_values.mean())

    @property
    def corrupt_metric(self) -> float:
        return float(self.corrupt_values.mean())

    @property
    def base_values(self) -> Tensor:
        return self.corrupt_values if self.direction == "denoising" else self.clean_values

    @property
    def base_logits(self) -> Tensor:
        return self.corrupt_logits if self.direction == "denoising" else self.clean_logits

    @property
    def path(self) -> str:
        """How patched copies run from the patched layer: ``"partial"`` (blocks l.. only) or
        ``"hooks"`` (a Bridge whose HF loop acts between blocks: the whole forward under hooks)."""
        return "partial" if self.base_inputs is None else self.base_inputs.path


def read_as(run: Prompts, answers_of: Prompts) -> Prompts | None:
    """`run`'s tokens and named positions carrying `answers_of`'s answers, with `run` (its own
    answers: the counterfactual ones) as the partner: how a metric of the clean prompts reads a
    run of other prompts. None when the answers cannot be teacher-forced in `run` (multi-token
    answers whose tokens differ)."""
    spans = {k: v for k, v in run.spans.items() if k not in (LAST, ANSWER)}
    try:
        return Prompts(run.tokens, run.lengths, "right", run.prompt_lengths, spans, answers_of.answers,
                       answers_of.answer_lengths, partner=replace(run, partner=None))
    except ValueError:
        return None


def prepare(model: Model, clean: Prompts, corrupt: Prompts, metric: Metric | None,
            names: set[str], direction: Direction, kv: bool = True, cross: bool = False,
            clean_edits: Sequence[Intervention] = (), corrupt_edits: Sequence[Intervention] = ()) -> Runs:
    """Run clean and corrupted once each (prompts from `check_prompts`), caching `names` plus every
    layer's resid_pre (and, with `kv`, every layer's keys and values, which let patched runs skip
    unchanged positions).

    `cross` (named positions only; the two prompts of an example may differ in length): the
    metric reads every run at that run's own positions (`read_as`: the corrupted prompts'
    positions with the clean prompts' answers), and edits come from `cross_edit`.

    `clean_edits` / `corrupt_edits`: interventions each caching run is computed under (e.g. a
    rollout's continuous inputs at hook_embed, `interp.rollout`); patched copies start from
    these runs' cached residuals and K/V, so they inherit them."""
    check_direction(direction)
    if cross:
        return _prepare_cross(model, clean, corrupt, metric, names, direction, kv, clean_edits=clean_edits,
                              corrupt_edits=corrupt_edits)
    clean_logits, clean_cache, corrupt_logits, corrupt_cache, inputs = _both_runs(
        model, clean, corrupt, names, kv, direction, clean_edits=clean_edits, corrupt_edits=corrupt_edits)
    if metric is None:
        m_clean = m_corrupt = torch.full((len(clean),), float("nan"), dtype=torch.float64)
    else:
        m_clean = metric_values(metric, clean_logits, clean, "clean run")
        m_corrupt = metric_values(metric, corrupt_logits, clean, "corrupted run")
    if direction == "denoising":
        base_tokens, base, source = corrupt.tokens, corrupt_cache, clean_cache
    else:
        base_tokens, base, source = clean.tokens, clean_cache, corrupt_cache
    return Runs(direction, clean, base_tokens, base, source, m_clean, m_corrupt, clean_logits, corrupt_logits,
                base_inputs=inputs)


def _both_runs(model: Model, clean: Prompts, corrupt: Prompts, names: set[str], kv: bool, direction: Direction,
               clean_edits: Sequence[Intervention] = (), corrupt_edits: Sequence[Intervention] = ()
               ) -> tuple[Tensor, dict[str, Tensor], Tensor, dict[str, Tensor], BlockInputs]:
    """The clean and corrupted caching runs (logits checked finite at real positions), caching
    `names`, every resid_pre and, with `kv` where the prefix can be skipped, every layer's K/V;
    and the base run's block inputs."""
    n_layers = Arch.of(model).n_layers
    names = set(names) | {resid_pre_name(layer) for layer in range(n_layers)}
    if kv and can_skip_prefix(model):
        names |= kv_names(n_layers)
    clean_in, corrupt_in = BlockInputs(), BlockInputs()
    clean_logits, clean_cache = cached_run(model, clean.tokens, names, clean_in, kv and direction == "noising",
                                           edits=clean_edits)
    corrupt_logits, corrupt_cache = cached_run(model, corrupt.tokens, names, corrupt_in, kv and direction == "denoising",
                                               edits=corrupt_edits)
    check_finite_logits(clean_logits, clean, "clean run logits")
    check_finite_logits(corrupt_logits, corrupt, "corrupted run logits")
    base_in = corrupt_in if direction == "denoising" else clean_in
    return clean_logits, clean_cache, corrupt_logits, corrupt_cache, base_in


def _prepare_cross(model: Model, clean: Prompts, corrupt: Prompts, metric: Metric | None,
                   names: set[str], direction: Direction, kv: bool, clean_edits: Sequence[Intervention] = (),
                   corrupt_edits: Sequence[Intervention] = ()) -> Runs:
    clean_logits, clean_cache, corrupt_logits, corrupt_cache, inputs = _both_runs(
        model, clean, corrupt, names, kv, direction, clean_edits=clean_edits, corrupt_edits=corrupt_edits)
    aligned = tuple(clean.tokens.shape) == tuple(corrupt.tokens.shape) and torch.equal(clean.lengths, corrupt.lengths)
    read_bad = read_as(corrupt, clean)
    if read_bad is None and aligned:
        read_bad = clean  # same layout: read the corrupted run at the clean prompts' positions
    nan = torch.full((len(clean),), float("nan"), dtype=torch.float64)
    if metric is None:
        m_clean = m_corrupt = nan
    else:
        m_clean = metric_values(metric, clean_logits, clean, "clean run")
        if read_bad is None:
            log.info("corrupted run: its prompts cannot carry the clean prompts' multi-token answers "
                     "(teacher forcing), so its metric is NaN")
            m_corrupt = nan
        else:
            m_corrupt = metric_values(metric, corrupt_logits, read_bad, "corrupted run")
    if direction == "denoising":
        if read_bad is None:
            raise ValueError("denoising with prompts of different lengths: expected answers the corrupted "
                             "prompts can be read with (single-token, or the same teacher-forced tokens), got "
                             "multi-token answers that differ; patch in the other direction (direction="
                             "'noising' with the partner as the prompts)")
        return Runs(direction, read_bad, corrupt.tokens, corrupt_cache, clean_cache, m_clean, m_corrupt,
                    clean_logits, corrupt_logits, base_prompts=corrupt, source_prompts=clean, base_inputs=inputs)
    return Runs(direction, clean, clean.tokens, clean_cache, corrupt_cache, m_clean, m_corrupt,
                clean_logits, corrupt_logits, base_prompts=clean, source_prompts=corrupt, base_inputs=inputs)


def named_only(positions: object) -> bool:
    """Whether every position is a span name (so patching may pair prompts of different lengths)."""
    if isinstance(positions, str):
        return True
    if positions is None or isinstance(positions, (int, Tensor)):
        return False
    items = list(positions)  # type: ignore[call-overload]
    return bool(items) and all(isinstance(p, str) for p in items)


# ----------------------------------------------------------------------------- edits and copies

@dataclass(frozen=True)
class Edit:
    """Replace the entries of hook `hook` (in block `layer`) selected by `mask` with `source`.

    `mask` covers the per-example axes before the feature axis: [batch, pos] for residual-like
    hooks, [batch, pos, head] for per-head hooks (batch may be 1: the same entries in every
    example). `source` has the activation's shape. `valid` [batch]: the examples that have every
    position the edit asks for (the others get NaN); None: all.
    """

    layer: int
    hook: str
    mask: Tensor
    source: Tensor
    valid: Tensor | None = None


@dataclass(frozen=True)
class EdgeEdit:
    """Per-(query, key) choice, at one layer's attention, between the keys/values this copy's
    `Edit`s write into hook_k / hook_v and the base run's.

    `k_edges[b, h, q, k]` (`v_edges`) is True where, in example b, query q of head h reads the
    copy's key (value) at position k; every other edge reads the base run's. Keys are chosen at
    the attention scores (an unmarked score is the base run's, `base_scores`, so the softmax
    normalises over the mixed row); values at the pattern . V product (an unmarked edge's share
    of the copy's value change is taken back out of z). None: no choice for that side (every
    edge reads the copy's). Exact when the layer's queries are the base run's: no edit of this
    copy below the layer and none of its queries.
    """

    layer: int
    k_edges: Bool[Tensor, "batch head q_pos k_pos"] | None
    v_edges: Bool[Tensor, "batch head q_pos k_pos"] | None
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


def heads_at(model: Model, site: Site) -> int:
    """Size of the head axis of a per-head hook (KV groups for K/V unless ungrouped)."""
    arch = Arch.of(model)
    return arch.kv_hook_heads if site.per_kv_group else arch.n_heads


def validate_node(model: Model, node: Place, seq_len: int) -> Place:
    """`Node.validate` against this model (int positions against the longest prompt), knowing that
    ungrouped GQA models index K/V by head."""
    arch = Arch.of(model)
    if arch.kv_per_head:
        arch = replace(arch, n_kv_heads=arch.n_heads)
    a = as_at(node)
    int_pos = a.pos if isinstance(a.pos, int) else None
    Node(a.layer, a.site, int_pos, a.head).validate(arch, seq_len)
    return node


def place_mask(model: Model, place: Place, prompts: Prompts, width: int
               ) -> tuple[Tensor, Tensor]:
    """The entries a node selects in each example ([batch, pos] or [batch, pos, head] booleans, on
    the model's device) and the examples that have its position ([batch], CPU)."""
    a = as_at(place)
    site: Site = a.site  # type: ignore[assignment]
    mask, valid = positions_mask(a.pos, prompts, width, f"{a} position")
    mask = mask.to(device_of(model))
    if site.per_head:
        n_h = heads_at(model, site)
        heads = torch.zeros(n_h, dtype=torch.bool, device=mask.device)
        heads[slice(None) if a.head is None else a.head] = True
        mask = mask[:, :, None] & heads[None, None]
    return mask, valid


def node_edit(model: Model, place: Place, source: dict[str, Tensor], prompts: Prompts) -> Edit:
    """An Edit that writes the source run's value of `place` (a Node or At)."""
    width = prompts.tokens.shape[1]
    validate_node(model, place, width)
    a = as_at(place)
    site: Site = a.site  # type: ignore[assignment]
    if site in (Site.PATTERN, Site.ATTN_SCORES, Site.Q_INPUT, Site.K_INPUT, Site.V_INPUT):
        raise ValueError(f"{place}: expected a patchable site (resid_pre/mid/post, attn_out, mlp_out, "
                         f"head, q, k, v), got {site.value!r}")
    mask, valid = place_mask(model, a, prompts, width)
    return Edit(a.layer, a.hook_name, mask, source[a.hook_name], valid)


def cross_edit(model: Model, place: Place, runs: Runs) -> Edit:
    """An Edit of a cross-position run: the source run's value of `place`'s span, read at the
    source prompt's own span of that name, written at the base prompt's (aligned token by token;
    both spans of one example must have the same number of tokens)."""
    a = as_at(place)
    name = a.pos
    base_p, src_p = runs.base_prompts, runs.source_prompts
    if not isinstance(name, str) or base_p is None or src_p is None:
        raise ValueError(f"{a}: expected a span-name position in a cross-position run, got {name!r}")
    site: Site = a.site  # type: ignore[assignment]
    if site in (Site.PATTERN, Site.ATTN_SCORES, Site.Q_INPUT, Site.K_INPUT, Site.V_INPUT):
        raise ValueError(f"{a}: expected a patchable site (resid_pre/mid/post, attn_out, mlp_out, "
                         f"head, q, k, v), got {site.value!r}")
    validate_node(model, a, base_p.tokens.shape[1])
    bw, sw = base_p.tokens.shape[1], src_p.tokens.shape[1]
    bmask, _ = positions_mask(name, base_p, bw, f"{a} position (base prompts)")
    if name in src_p.spans:
        smask, _ = positions_mask(name, src_p, sw, f"{a} position (source prompts)")
    elif bw == sw and torch.equal(base_p.lengths, src_p.lengths):
        smask = bmask  # the partner does not name it: same layout, same positions
    else:
        raise ValueError(f"{a} position: expected the span {name!r} in both prompts of each example (they differ "
                         f"in length), got it only in one; add it with Prompts.with_spans on the partner")
    nb, ns = bmask.sum(1), smask.sum(1)
    if not torch.equal(nb, ns):
        i = int(torch.nonzero(nb != ns)[0, 0])
        raise ValueError(f"{a} position: expected span {name!r} to have as many tokens in the source prompt as in "
                         f"the base prompt (they are aligned token by token), got {int(ns[i])} vs {int(nb[i])} in "
                         f"example {i}; name a one-token span (e.g. its last token) instead")
    dev = runs.base[a.hook_name].device
    full = runs.base[a.hook_name].clone()
    full[bmask.to(dev)] = runs.source[a.hook_name][smask.to(dev)]
    mask, valid = place_mask(model, a, base_p, bw)
    return Edit(a.layer, a.hook_name, mask, full, valid)


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
            out[key] = Edit(e.layer, e.hook, prev.mask | e.mask, e.source, _and(prev.valid, e.valid))
        else:
            out[key] = e
    return [*out.values(), *choices]


def _and(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a & b


def copy_valid(edits: Sequence[AnyEdit], batch: int) -> Tensor:
    """[batch] the examples that have every position the copy's edits ask for."""
    v = torch.ones(batch, dtype=torch.bool)
    for e in edits:
        if isinstance(e, Edit) and e.valid is not None:
            v &= e.valid.cpu()
    return v


def chunk_hooks(copies: Sequence[Sequence[AnyEdit]], batch: int, p0: int = 0,
                packing: Packing | None = None) -> list[tuple[str, object]]:
    """TransformerLens hooks applying copy c's edits to rows [c*batch, (c+1)*batch).

    With `p0 > 0` the forward pass computes positions p0.. only (earlier ones come from a K/V
    cache), so masks and sources are cut to those positions. `EdgeEdit` hooks come after the
    `Edit` hooks, so they see the keys/values those write. With `packing` (a Bridge's packed
    replay, `interp.arch.forward_packed`) activations are [batch, packed positions, ...]: copy c's
    edits apply to its positions firsts[c].. there (no EdgeEdit then).
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
            shape = (batch, *template.mask.shape[1:])
            mask = torch.stack([e.mask.expand(shape) if e is not None
                                else torch.zeros(shape, dtype=torch.bool, device=template.mask.device)
                                for e in chosen])[:, :, p0:]  # [k, batch, pos(, head)]
            if all(e.source is template.source for e in present):
                src = template.source[:, p0:].unsqueeze(0)  # [1, batch, ...]
            else:
                src = torch.stack([e.source[:, p0:] if e is not None else template.source[:, p0:]
                                   for e in chosen])
            if packing is not None:  # p0 is 0 then: [k or 1, batch, pos, ...] -> [batch, packed, ...]
                mask, src = packing.pack(mask, copy_axis=True), packing.pack(src, copy_axis=True)
            stages.append((mask.unsqueeze(-1), src))  # broadcast over the feature axis

        def hook(act: Tensor, hook, stages=stages) -> Tensor:
            v = act if packing is not None else act.reshape(k, batch, *act.shape[1:])
            for mask, src in stages:
                v = torch.where(mask, src.to(v.dtype), v)
            return v.reshape(act.shape)

        hooks.append((name, hook))
    if packing is not None and per_layer:
        raise ValueError("chunk_hooks: expected no EdgeEdit in a packed chunk, got one at layer "
                         f"{min(per_layer)}; run EdgeEdits unpacked")
    for layer, slots in per_layer.items():
        v_cols = sorted({int(p) for c, edits in enumerate(copies) if slots[c] is not None for e in edits
                         if isinstance(e, Edit) and e.hook == Node(layer, Site.V).hook_name
                         for p in torch.nonzero(e.mask.reshape(*e.mask.shape[:2], -1).any(-1).any(0))[:, 0]})
        hooks += edge_hooks(layer, slots, batch, p0, v_cols)
    return hooks


def _shared(slots: Sequence[EdgeEdit | None], field: str, layer: int) -> Tensor:
    """The base-run tensor (scores or values) every copy's EdgeEdit at `layer` compares with."""
    got = [getattr(e, field) for e in slots if e is not None and getattr(e, field) is not None]
    if any(t is not got[0] for t in got):
        raise ValueError(f"EdgeEdit at layer {layer}: expected every copy of a chunk to compare with the same "
                         f"base run ({field}), got different tensors")
    return got[0]


def edge_hooks(layer: int, slots: Sequence[EdgeEdit | None], batch: int, p0: int,
               v_cols: list[int]) -> list[tuple[str, object]]:
    """Hooks at `layer`'s attention that apply each copy's per-(query, key) K/V choice (a copy
    without an EdgeEdit there reads its own keys and values on every edge).

    Keys: unmarked scores are replaced by the base run's (the causal mask is the same in both).
    Values: with the copy's values v' written into hook_v, the wanted output of query q is
    sum_k p[q, k] (E[q, k] v'[k] + (1 - E[q, k]) v[k]) = z - sum_k p[q, k] (1 - E[q, k]) (v'[k] - v[k]),
    where p is this pass's pattern; only key positions `v_cols` (those the copies' value edits
    write) can differ.
    """
    k = len(slots)
    # copies that share one choice (one path-patching request) are handled together, so no mask
    # is ever repeated per copy
    uniq: dict[int, tuple[EdgeEdit, list[int]]] = {}
    for c, e in enumerate(slots):
        if e is not None:
            uniq.setdefault(id(e), (e, []))[1].append(c)
    groups = [(e, torch.tensor(cs)) for e, cs in uniq.values()]
    hooks: list[tuple[str, object]] = []
    # queries p0.. are computed in this pass; keys cover every position (earlier ones are cached)
    k_groups = [(e.k_edges[:, :, p0:], cs) for e, cs in groups if e.k_edges is not None]  # type: ignore[index]
    if k_groups:
        base_scores = _shared(slots, "base_scores", layer)[:, :, p0:]  # [batch, head, q, k_pos]

        def scores_hook(act: Tensor, hook, k_groups=k_groups, base_scores=base_scores) -> Tensor:
            v = act.reshape(k, batch, *act.shape[1:])
            if len(k_groups) == 1 and len(k_groups[0][1]) == k:
                return torch.where(k_groups[0][0], v, base_scores.to(v.dtype)).reshape(act.shape)
            v = v.clone()
            for mask, cs in k_groups:  # mask [batch, head, q, k_pos], broadcast over the group's copies
                cs = cs.to(v.device)
                v[cs] = torch.where(mask, v[cs], base_scores.to(v.dtype))
            return v.reshape(act.shape)

        hooks.append((Node(layer, Site.ATTN_SCORES).hook_name, scores_hook))
    v_groups = [(e.v_edges, cs) for e, cs in groups if e.v_edges is not None]
    if v_groups and v_cols:
        base_values = _shared(slots, "base_values", layer)
        cols = torch.tensor(v_cols, device=v_groups[0][0].device)
        v_groups = [(~edges[:, :, p0:][..., cols], cs) for edges, cs in v_groups]  # [batch, head, q, cols]
        base_at = base_values[:, cols]  # [batch, cols, kv_head, d_head]
        seen: dict[str, Tensor] = {}

        def grab_values(act: Tensor, hook) -> None:
            seen["v"] = act

        def grab_pattern(act: Tensor, hook) -> None:
            seen["pattern"] = act

        def z_hook(act: Tensor, hook) -> Tensor:
            z = act.reshape(k, batch, *act.shape[1:])  # [k, batch, q, head, d_head]
            written = seen.pop("v")
            written = written.reshape(k, batch, *written.shape[1:])[:, :, cols - p0]
            pattern = seen.pop("pattern")
            pattern = pattern.reshape(k, batch, *pattern.shape[1:])[..., cols]  # [k, batch, head, q, cols]
            z = z.clone()
            for off, cs in v_groups:  # edges that must read the base values, per group of copies
                cs = cs.to(z.device)
                change = written[cs] - base_at.to(written.dtype)  # [c, batch, cols, kv_head, d_head]
                change = change.repeat_interleave(z.shape[3] // change.shape[3], dim=3)  # KV groups -> heads
                wrong = torch.einsum("cbhqk,cbkhd->cbqhd", (pattern[cs] * off).to(change.dtype), change)
                z[cs] = z[cs] - wrong.to(z.dtype)
            return z.reshape(act.shape)

        hooks += [(Node(layer, Site.V).hook_name, grab_values), (Node(layer, Site.PATTERN).hook_name, grab_pattern),
                  (Node(layer, Site.HEAD).hook_name, z_hook)]
    return hooks


# ------------------------------------------------------------------------------ forward passes

def final_logits(model: Model, resid: Float[Tensor, "rows pos d_model"],
                 index: Int[Tensor, "rows k"] | None = None) -> Float[Tensor, "rows k d_vocab"]:
    """Final norm + unembedding (+ soft cap) of the final residual, at each row's `index` only
    (`interp.arch.unembed`)."""
    return unembed(model, resid, index)


def forward_from(model: Model, resid: Float[Tensor, "rows pos d_model"], start: int,
                 index: Tensor | None, hooks: list, past_kv: object = None, inputs: BlockInputs | None = None,
                 p0: int = 0, logits: bool = True) -> Float[Tensor, "rows k d_vocab"]:
    """Run blocks start.. on `resid` under `hooks`; the logits at each row's `index` (None: all;
    ``logits=False``: the final residual there). A Bridge replays the base run's block `inputs`
    (`interp.arch.forward_from`; from position `p0` on, the earlier keys/values recorded)."""
    return arch_forward_from(model, resid, start, index=index, hooks=hooks, inputs=inputs, past_kv=past_kv, p0=p0,
                             logits=logits)


def kv_names(n_layers: int) -> set[str]:
    return {Node(layer, s).hook_name for layer in range(n_layers) for s in (Site.K, Site.V)}


def _first_pos(edits: Sequence[AnyEdit]) -> int:
    """The first position any edit touches in any example (positions before it are unchanged).
    An EdgeEdit only chooses between the base run's keys/values and those its copy's Edits write."""
    first = None
    for e in edits:
        if isinstance(e, EdgeEdit):
            continue
        m = e.mask.reshape(*e.mask.shape[:2], -1).any(-1).any(0)  # [pos]
        hit = torch.nonzero(m)
        if hit.numel():
            p = int(hit[0, 0])
            first = p if first is None else min(first, p)
    return 0 if first is None else first


def _past_kv(runs: Runs, start: int, n_layers: int, p0: int, k: int):
    """A frozen TransformerLens K/V cache holding the base run's keys/values of positions < p0."""
    from interp.tl import KVCache as TransformerLensKeyValueCache
    from interp.tl import KVCacheEntry as TransformerLensKeyValueCacheEntry

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


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def writes_base(edits: Sequence[AnyEdit], base: dict[str, Tensor], same: dict[tuple[str, int], Tensor]) -> bool:
    """Whether every edit of a copy writes, at every entry it selects, bit for bit the base run's
    own value there: then the copy is the base run (no forward needed). In a denoising sweep
    after a symmetric token replacement at position t, this holds for every patch at a position
    before t (and at layer 0 for every position but t): the two runs agree there bit for bit.
    An `EdgeEdit` never counts as one. `same` caches, per (hook, source), where source and base agree."""
    if not edits:
        return False
    for e in edits:
        if isinstance(e, EdgeEdit):
            return False
        b = base.get(e.hook)
        src = e.source
        if (b is None or b.shape != src.shape or b.dtype != src.dtype or b.device != src.device
                or src.element_size() not in _BITS or e.mask.ndim != src.ndim - 1):
            return False
        key = (e.hook, id(src))
        if key not in same:
            bits = _BITS[src.element_size()]  # bits, not values: -0.0 and 0.0 differ, NaN never matches
            same[key] = (src.view(bits) == b.view(bits)).all(-1)  # [batch, pos(, head)]
        if e.mask.shape[1:] != same[key].shape[1:] or bool((e.mask & ~same[key]).any()):
            return False
    return True


def input_edits(hooks: list[tuple[str, object]], resid: Tensor, start: int) -> tuple[list[tuple[str, object]], Tensor]:
    """Apply the hooks at layer `start`'s resid_pre to `resid` itself (a partial forward's input
    is that activation), returning the other hooks and the edited input: a forward with no hook
    left skips attaching any (on a Bridge, rebuilding its hook dictionary)."""
    name = resid_pre_name(start)
    for hook_name, fn in hooks:
        if hook_name == name:
            resid = fn(resid, None)  # type: ignore[operator]
    return [(n, fn) for n, fn in hooks if n != name], resid


def block_macs(model: Model, layer: int) -> int:
    """Multiply-adds per position of block `layer`'s weight matrices (its parameters of rank >= 2)."""
    return sum(p.numel() for p in model.blocks[layer].parameters() if p.ndim >= 2)


def pack_pays(model: Model, start: int, firsts: Sequence[int], batch: int, width: int,
              copies: Sequence[Sequence[AnyEdit]]) -> bool:
    """Whether one packed pass (`interp.arch.forward_packed`) over these copies costs fewer
    multiply-adds than one pass of them padded to the earliest first position. Per position
    and block: the weight matrices, plus 2 x heads x d_head per key attended (a packed query
    is scored against the base run's `width` keys and every packed key; most are masked). And
    the attention must stay under a quarter of the weight matrices' work per position: it grows
    with the packed length squared (time and the [heads, n, width + n] scores' memory)."""
    if any(isinstance(e, EdgeEdit) for c in copies for e in c):
        return False
    arch = Arch.of(model)
    lin, att = block_macs(model, start), 2 * arch.n_heads * arch.d_head
    n = sum(width - f for f in firsts)
    padded = len(firsts) * (width - min(firsts)) * (lin + att * width)
    return 4 * att * (width + n) <= lin and n * (lin + att * (width + n)) < padded


def read_index(metric: Metric, prompts: Prompts) -> Tensor | None:
    """[batch, k] positions a `ReadMetric` reads (right-padded layout), or None (full logits)."""
    if not isinstance(metric, ReadMetric):
        return None
    idx = torch.as_tensor(metric.positions(prompts)).long().cpu()
    if idx.ndim != 2 or idx.shape[0] != len(prompts):
        raise ValueError(f"metric {metric.name} positions: expected a [batch={len(prompts)}, k] index, got "
                         f"shape {tuple(idx.shape)}")
    bad = (idx < 0) | (idx >= prompts.lengths[:, None])
    if bool(bad.any()):
        i = int(torch.nonzero(bad.any(1))[0, 0])
        raise ValueError(f"metric {metric.name} positions: expected positions inside each prompt, got "
                         f"{idx[i].tolist()} for prompt {i} of length {int(prompts.lengths[i])}")
    return idx


def run_copies(model: Model, runs: Runs, copies: Sequence[Sequence[AnyEdit]], metric: Metric,
               *, rows: int = DEFAULT_ROWS, progress: bool = False, desc: str = "patching",
               labels: Sequence[object] | None = None) -> Float[Tensor, "copies batch"]:
    """The metric of each patched copy of the base run, per example ([copies, batch], float64, CPU).

    Copies are grouped by the layer they start at and, when `runs` holds the base K/V
    (`prepare(..., kv=True)`), by the first position they touch: a chunk whose patches all lie
    at positions >= p0 (and whose metric reads positions >= p0) computes positions p0.. only,
    reading the base run's keys and values of the earlier (unchanged) positions from a frozen
    K/V cache. An example that lacks a position one of the copy's edits asks for gets NaN. A
    non-finite value elsewhere raises, naming the copy by its entry in `labels`.
    """
    check_rows(rows)
    metric = as_metric(metric)
    prompts = runs.prompts
    batch, seq_len = runs.base_tokens.shape
    index = read_index(metric, prompts)
    merged = [merge_edits(c) for c in copies]
    n_layers = Arch.of(model).n_layers
    same: dict[tuple[str, int], Tensor] = {}
    noop = [writes_base(c, runs.base, same) for c in merged]
    if any(noop):
        log.debug("%s: %d of %d copies write the base run's own values (answered from the base run)",
                  desc, sum(noop), len(merged))
    bridge_skip = is_bridge(model) and can_skip_prefix(model, runs.base_inputs)
    # a Bridge whose blocks take a recorded 4D mask: copies of different first positions share a pass
    packable = bridge_skip and index is not None and can_pack(model, runs.base_inputs)
    direct = runs.path == "partial"  # resid_pre edits at the start layer go into the input itself
    skip = bridge_skip or (Node(0, Site.K).hook_name in runs.base and can_skip_prefix(model))
    starts = [n_layers if nop else min((e.layer for e in c), default=n_layers) for c, nop in zip(merged, noop, strict=True)]
    firsts = [_first_pos(c) if skip else 0 for c in merged]
    if index is not None and skip:
        lowest = int(index.min())
        firsts = [min(f, lowest) for f in firsts]
    per_chunk = max(1, rows // batch)
    order: dict[int, list[int]] = {}
    for i, s in enumerate(starts):
        order.setdefault(s, []).append(i)
    out = torch.empty(len(copies), batch, dtype=torch.float64)
    bar = tqdm(total=len(copies), desc=desc, disable=not progress, leave=False)
    # A metric reading a few positions: passes return final residuals, unembedded together once
    # `rows` of them wait (one d_model x d_vocab product over many rows instead of one per pass:
    # with few rows per pass that product is bound by reading W_U, not by its arithmetic)
    defer = index is not None and runs.path == "partial"
    pending: list[tuple[list[int], Tensor]] = []

    def record(chunk: list[int], logits: Tensor) -> None:
        k = len(chunk)
        logits = logits.reshape(k, batch, *logits.shape[1:])
        for j, i in enumerate(chunk):
            v = metric.read(logits[j], prompts) if index is not None else metric(logits[j], prompts)
            out[i] = check_per_example(v, batch, "metric").detach().to("cpu", torch.float64)
        bar.update(k)

    def flush() -> None:
        if pending:
            logits, o = final_logits(model, torch.cat([x for _, x in pending])), 0
            for chunk, x in pending:
                record(chunk, logits[o:o + x.shape[0]])
                o += x.shape[0]
            pending.clear()

    try:
        for start in sorted(order):
            idx = sorted(order[start], key=lambda i: -firsts[i])
            for chunk in plan_chunks(idx, [firsts[i] for i in idx], per_chunk, batch, seq_len):
                k = len(chunk)
                if start >= n_layers:  # a copy with no edits is the base run itself
                    logits = gather_positions(runs.base_logits, index).repeat(k, 1, 1)
                elif packable and index is not None and pack_pays(model, start, [firsts[i] for i in chunk], batch,
                                                                   seq_len, [merged[i] for i in chunk]):
                    packing = Packing.of([firsts[i] for i in chunk], seq_len, device_of(model))
                    hooks = chunk_hooks([merged[i] for i in chunk], batch, packing=packing)
                    resid = packing.pack(runs.base[resid_pre_name(start)])
                    hooks, resid = input_edits(hooks, resid, start)
                    logits = forward_packed(model, resid, start, packing, index, inputs=runs.base_inputs,  # type: ignore[arg-type]
                                            hooks=hooks, logits=not defer)
                else:
                    p0 = min(firsts[i] for i in chunk)
                    hooks = chunk_hooks([merged[i] for i in chunk], batch, p0)
                    resid = runs.base[resid_pre_name(start)][:, p0:].repeat(k, 1, 1)
                    if direct:
                        hooks, resid = input_edits(hooks, resid, start)
                    past = _past_kv(runs, start, n_layers, p0, k) if p0 > 0 and not bridge_skip else None
                    rel = None if index is None else (index - p0).repeat(k, 1)
                    logits = forward_from(model, resid, start, rel, hooks, past, runs.base_inputs,
                                          p0 if bridge_skip else 0, logits=not defer)
                    if index is None and p0 > 0:  # unchanged logits of the skipped prefix
                        logits = torch.cat([runs.base_logits[:, :p0].repeat(k, 1, 1), logits], dim=1)
                if defer and start < n_layers:
                    pending.append((chunk, logits))
                    if sum(x.shape[0] for _, x in pending) >= rows:
                        flush()
                else:
                    record(chunk, logits)
        flush()
    finally:
        bar.close()
    valid = torch.stack([copy_valid(c, batch) for c in merged]) if merged else torch.ones(0, batch, dtype=torch.bool)
    bad = torch.nonzero((~torch.isfinite(out) & valid).any(1))[:, 0].tolist()
    if bad:
        where = [str(labels[i]) if labels is not None else f"copy {i}" for i in bad[:5]]
        raise ValueError(f"{desc}: expected a finite metric for every patched copy, got NaN/Inf for "
                         f"{len(bad)} of {len(copies)} (first: {', '.join(where)}); the clean and "
                         f"corrupted runs are finite, so the patched values overflow there")
    return out.masked_fill(~valid, float("nan"))


def positional(what: str, metric: object, args: tuple, slots: dict[str, object]
               ) -> tuple[object | None, object, dict[str, object]]:
    """Sort a patching function's positional arguments: ``f(model, prompts, metric, *args)`` where
    `args` fill the named `slots` in order (each also a keyword; None: not given). The
    TransformerLens-era order ``f(model, clean, corrupt, metric, ...)`` still works: when the
    argument after the prompts is tokens (a tensor, `Batch` or `Prompts`) it is the corrupted
    run. Returns (corrupt or None, metric, the slots)."""
    corrupt = None
    if isinstance(metric, (Tensor, Batch)):
        if not args:
            raise TypeError(f"{what}: expected a metric after the corrupted tokens, got none")
        corrupt, metric, args = metric, args[0], args[1:]
    if len(args) > len(slots):
        raise TypeError(f"{what}: expected at most {len(slots)} positional arguments after the metric "
                        f"({', '.join(slots) or 'none'}), got {len(args)}")
    slots = dict(slots)
    for name, value in zip(list(slots), args, strict=False):
        if slots[name] is not None:
            raise TypeError(f"{what}: {name} given twice (positionally and as {name}=)")
        slots[name] = value
    return corrupt, metric, slots
