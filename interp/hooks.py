"""The one run path: run a model on prompts with edits (interventions) and captures.

Research code says *what* to do to *which* node, not how to write hook plumbing:

    out = run(model, prompts, edits=[Zero(Node(1, "head", head=3)), Add(Node(0, "resid_post"), v)],
              captures=[Node(1, "resid_pre")])
    out.logits, out.acts["blocks.1.hook_resid_pre"]

`run` is the single internal way the toolkit runs a model with hooks (caching, lenses, SAEs):
padded prompts are computed right-padded (`Prompts.right()`: each prompt sees exactly what it
sees alone, positions count from its first token), tokens go to the model's device, captures
may keep only selected positions (gathered inside the hook) or stay in the autograd graph, every
hook must fire, captured activations are checked for NaN/Inf, and the hooks are always removed.
`intervene` is the context-manager form for code that runs the forward itself.

Targets are `Node`s (layer, site, pos, head) or raw TransformerLens hook names, validated once
against the model's hook points (an unknown name gets the closest valid ones in the error).
Every hook is attached through TransformerLens's `model.hooks` context, which removes exactly the
hooks it added in `finally` — also when a hook function or the caller's code raises. An
intervention or capture whose hook never fired in the block raises instead of silently doing
nothing.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interp.arch import Arch, Model
from interp.graph import EMBED_HOOKS, Node, Site, site_of
from interp.native_attn import attach_hooks
from interp.prompts import Prompts, as_prompts
from interp.tokens import Batch, check_model_tokens


@runtime_checkable
class HookFn(Protocol):
    def __call__(self, act: Tensor, *, hook: object) -> Tensor | None: ...


class HookError(ValueError):
    """A hook name, node or intervention that does not fit the model."""


# ------------------------------------------------------------------------------ name resolution

def hook_names(model: Model) -> list[str]:
    return list(model.hook_dict.keys())


def resolve_hook(model: Model, target: str | Node, known: Collection[str] | None = None) -> str:
    """The validated TransformerLens hook name of `target` (a Node or a raw hook name).

    `known`: the model's hook names, when the caller already has them (a TransformerBridge
    rebuilds `hook_dict`, with its aliases, on every access: milliseconds each)."""
    if known is None:
        known = model.hook_dict.keys()
    if isinstance(target, Node):
        try:
            target.validate(Arch.of(model))
        except ValueError as e:
            raise HookError(str(e)) from None
        name = target.hook_name
        if name not in known:
            hint = ("; set model.set_use_split_qkv_input(True) for q/k/v_input sites"
                    if target.site in (Site.Q_INPUT, Site.K_INPUT, Site.V_INPUT) else "")
            raise HookError(f"{target}: expected hook {name!r} in the model, got no such hook point{hint}")
        return name
    if not isinstance(target, str):
        raise HookError(f"hook target: expected a Node or a hook-name string, got {type(target).__name__}")
    if target not in known:
        close = difflib.get_close_matches(target, list(known), n=5, cutoff=0.5)
        raise HookError(f"hook name: expected one of the model's {len(known)} hook points, "
                        f"got {target!r}" + (f"; closest: {close}" if close else ""))
    return target


def resolve_hooks(model: Model, targets: Sequence[str | Node] | str | Node,
                  layers: Sequence[int] | None = None, known: Collection[str] | None = None) -> list[str]:
    """Expand names, glob patterns (``blocks.*.hook_resid_post``) and Nodes into hook names.

    `layers` keeps only per-layer hooks of those layers. A pattern or filter that matches
    nothing raises: it is never a silent empty result. `known`: as in `resolve_hook`.
    """
    if isinstance(targets, (str, Node)):
        targets = [targets]
    names: list[str] = []
    all_names = list(known) if known is not None else hook_names(model)
    known = dict.fromkeys(all_names)
    for t in targets:
        if isinstance(t, str) and any(ch in t for ch in "*?["):
            hits = [n for n in all_names if fnmatch.fnmatchcase(n, t)]
            if not hits:
                raise HookError(f"hook pattern {t!r}: expected it to match some of the model's hook "
                                f"points, got no match; e.g. {all_names[:4]}")
            names.extend(hits)
        else:
            names.append(resolve_hook(model, t, known))
    if layers is not None:
        n_layers = Arch.of(model).n_layers
        bad = [layer for layer in layers if not 0 <= layer < n_layers]
        if bad:
            raise HookError(f"layers: expected values in [0, {n_layers}), got {bad}")
        keep = set(layers)
        names = [n for n in names if n.startswith("blocks.") and int(n.split(".")[1]) in keep]
        if not names:
            raise HookError(f"layers {sorted(keep)}: expected them to select some of the requested "
                            f"hooks, got none (hooks outside blocks have no layer)")
    seen: set[str] = set()
    return [n for n in names if not (n in seen or seen.add(n))]  # type: ignore[func-returns-value]


def hook_layer(name: str) -> int | None:
    """The block index of a per-layer hook name; None for embed/final hooks."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" and len(parts) > 2 and parts[1].isdigit() else None


# ---------------------------------------------------------------------------------- selections

def selector(name: str, pos: int | Sequence[int] | None, head: int | None) -> tuple:
    """An index tuple into the activation of hook `name` selecting positions and a head."""
    site = site_of(name)
    idx: list = [slice(None)]  # batch
    if site in (Site.PATTERN, Site.ATTN_SCORES):  # [batch head q_pos k_pos]
        idx += [slice(None) if head is None else head, slice(None) if pos is None else pos]
        return tuple(idx)
    idx.append(slice(None) if pos is None else pos)
    if head is not None:
        if site is None or not site.per_head:
            raise HookError(f"hook {name!r}: expected a per-head hook for head={head}, got a site with no heads")
        idx.append(head)
    return tuple(idx)


# ------------------------------------------------------------------------------- interventions

@dataclass(frozen=True)
class Target:
    """Where an intervention applies: a hook name plus optional position(s) and head."""

    name: str
    pos: int | tuple[int, ...] | None = None
    head: int | None = None


def _target(model: Model, where: str | Node, pos: object, head: object,
            known: Collection[str] | None = None) -> Target:
    if isinstance(where, Node):
        name = resolve_hook(model, where, known)
        if pos is None:
            pos = where.pos
        if head is None:
            head = where.head
    else:
        name = resolve_hook(model, where, known)
    n_ctx = Arch.of(model).n_ctx
    pos = _check_pos(pos, name, n_ctx)
    if head is not None and (isinstance(head, bool) or not isinstance(head, int)):
        raise HookError(f"hook {name!r}: head expected an int, got {head!r}")
    if head is not None:
        site = site_of(name)
        arch = Arch.of(model)
        if site is None or not site.per_head:
            raise HookError(f"hook {name!r}: expected a per-head site for head={head}, got a site with no heads")
        limit = arch.n_kv_heads if site.per_kv_group else arch.n_heads
        if not 0 <= head < limit:
            raise HookError(f"hook {name!r}: head expected in [0, {limit}), got {head}")
    return Target(name, pos, head)


def _check_pos(pos: object, name: str, n_ctx: int) -> int | tuple[int, ...] | None:
    """Positions of an intervention: None, an int or a non-empty sequence of ints within n_ctx."""
    if pos is None:
        return None
    if isinstance(pos, Tensor) and not pos.dtype.is_floating_point and pos.dtype != torch.bool and pos.ndim <= 1:
        pos = pos.tolist()
    items = pos if isinstance(pos, Sequence) and not isinstance(pos, str) else [pos]
    if not items or not all(isinstance(p, int) and not isinstance(p, bool) for p in items):
        raise HookError(f"hook {name!r}: positions expected None, an int or a non-empty list of ints, "
                        f"got {pos!r}")
    bad = [p for p in items if not -n_ctx <= p < n_ctx]
    if bad:
        raise HookError(f"hook {name!r}: positions expected in [-{n_ctx}, {n_ctx}) (n_ctx), got {bad}")
    return tuple(items) if isinstance(pos, Sequence) else items[0]


def _check_pos_in(target: Target, act: Tensor) -> None:
    """Positions of `target` against the activation's position axis (known only when it fires)."""
    if target.pos is None:
        return
    site = site_of(target.name)
    n = act.shape[2 if site in (Site.PATTERN, Site.ATTN_SCORES) else 1]
    bad = [p for p in (target.pos if isinstance(target.pos, tuple) else (target.pos,)) if not -n <= p < n]
    if bad:
        raise HookError(f"hook {target.name!r}: positions expected in [-{n}, {n}) for a sequence of {n} "
                        f"positions, got {bad}")


def _check_values(iv: Intervention, name: str) -> None:
    """NaN/Inf in a Set/Add/MeanAblate value would be written into every forward it touches."""
    for field_name in ("value", "mean", "factor"):
        v = getattr(iv, field_name, None)
        if v is None:
            continue
        t = v if isinstance(v, Tensor) else torch.as_tensor(v)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise HookError(f"{type(iv).__name__} at {name}: expected a finite {field_name}, got NaN/Inf")


@dataclass(frozen=True)
class Intervention:
    """Base: something done to the activation at `where` (selected by `pos`/`head`)."""

    where: str | Node
    pos: int | Sequence[int] | None = field(default=None, kw_only=True)
    head: int | None = field(default=None, kw_only=True)

    def apply(self, sel: Tensor, act: Tensor, target: Target) -> Tensor:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class Set(Intervention):
    """Replace the selected activation by `value` (broadcast against the selection)."""

    value: Tensor | float = 0.0

    def apply(self, sel: Tensor, act: Tensor, target: Target) -> Tensor:
        return torch.as_tensor(self.value, device=sel.device, dtype=sel.dtype).expand_as(sel)


@dataclass(frozen=True)
class SetAt(Intervention):
    """Write `values[i]` at position `index[i]` of example `i` (the right-padded layout the toolkit
    runs on); every other position keeps its value. `values`: [batch, *rest] for an activation
    [batch, pos, *rest]. The per-example form of `Set` at one position (e.g. a prompt's own last token)."""

    index: Tensor | None = None
    values: Tensor | None = None

    def apply(self, sel: Tensor, act: Tensor, target: Target) -> Tensor:
        if self.index is None or self.values is None or self.values.shape[0] != act.shape[0]:
            raise ValueError(f"SetAt at {target.name}: expected index and values for {act.shape[0]} examples, "
                             f"got {None if self.values is None else tuple(self.values.shape)}")
        out = sel.clone()
        rows = torch.arange(act.shape[0], device=act.device)
        out[rows, self.index.to(act.device)] = self.values.to(act.device, act.dtype)
        return out


@dataclass(frozen=True)
class Add(Intervention):
    """Add `value` (e.g. a steering vector) to the selected activation."""

    value: Tensor | float = 0.0

    def apply(self, sel: Tensor, act: Tensor, target: Target) -> Tensor:
        return sel + torch.as_tensor(self.value, device=sel.device, dtype=sel.dtype)


@dataclass(frozen=True)
class Scale(Intervention):
    """Multiply the selected activation by `factor`."""

    factor: float = 1.0

    def apply(self, sel: Tensor, act: Tensor, target: Target) -> Tensor:
        return sel * self.factor


@dataclass(frozen=True)
class Zero(Intervention):
    """Zero-ablate the selected activation."""

    def apply(self, sel: Tensor, act: Tensor, target: Target) -> Tensor:
        return torch.zeros_like(sel)


@dataclass(frozen=True)
class MeanAblate(Intervention):
    """Replace by `mean` (precomputed over a reference set, broadcast against the selection)."""

    mean: Tensor | None = None

    def apply(self, sel: Tensor, act: Tensor, target: Target) -> Tensor:
        if self.mean is None:
            raise HookError(f"MeanAblate at {target.name}: expected a reference mean tensor, got None")
        return self.mean.to(sel.device, sel.dtype).expand_as(sel)


@dataclass(frozen=True)
class ResampleAblate(Intervention):
    """Replace by the activation of another input: `source` holds the same hook's activation on a
    reference batch (full shape); each example takes a row chosen with `seed`."""

    source: Tensor | None = None
    seed: int = 0

    def apply(self, sel: Tensor, act: Tensor, target: Target) -> Tensor:
        if self.source is None:
            raise HookError(f"ResampleAblate at {target.name}: expected a source activation, got None")
        g = torch.Generator().manual_seed(self.seed)
        rows = torch.randint(0, self.source.shape[0], (act.shape[0],), generator=g)
        src = self.source[rows.to(self.source.device)]
        return src[selector(target.name, target.pos, target.head)].to(sel.device, sel.dtype)


@dataclass(frozen=True)
class Patch(Intervention):
    """Replace by the same hook's activation from another run: `source` is a tensor of the full
    activation shape, or a mapping (e.g. an ActivationCache) indexed by hook name."""

    source: object = None

    def apply(self, sel: Tensor, act: Tensor, target: Target) -> Tensor:
        src = self.source[target.name] if not isinstance(self.source, Tensor) else self.source  # type: ignore[index]
        if src.shape != act.shape:
            raise HookError(f"Patch at {target.name}: expected a source of shape {tuple(act.shape)}, "
                            f"got {tuple(src.shape)}")
        return src[selector(target.name, target.pos, target.head)].to(sel.device, sel.dtype)


@dataclass(frozen=True)
class Map(Intervention):
    """Replace the selected activation by `fn(selection)` (any differentiable function; e.g. an
    SAE spliced in, or a masked edit). `fn` must return the selection's shape."""

    fn: Callable[[Tensor], Tensor] | None = None

    def apply(self, sel: Tensor, act: Tensor, target: Target) -> Tensor:
        if self.fn is None:
            raise HookError(f"Map at {target.name}: expected a function, got None")
        out = self.fn(sel)
        if not isinstance(out, Tensor) or out.shape != sel.shape:
            raise HookError(f"Map at {target.name}: expected fn to return shape {tuple(sel.shape)}, got "
                            f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
        return out.to(sel.dtype)


@dataclass(frozen=True)
class BlockAttention(Intervention):
    """Attention knockout (Geva et al. 2023): query position `pos` may not read key positions
    `sources` in layer `where` (an attn_scores Node / hook name). Set on the pre-softmax scores,
    so the remaining edges are renormalised. `head` restricts it to one head.

    Per example: `queries` [batch] (one query position per prompt) with `source_mask`
    [batch, k_pos] (the keys each prompt's query may not read), in prompt coordinates (the
    right-padded layout `run` computes on); then `pos` and `sources` are unused.
    """

    sources: Sequence[int] = ()
    queries: Int[Tensor, "batch"] | None = None
    source_mask: Bool[Tensor, "batch k_pos"] | None = None

    def apply(self, sel: Tensor, act: Tensor, target: Target) -> Tensor:
        if self.queries is not None and self.source_mask is not None:
            # sel: [batch (head) q_pos k_pos], every query position
            b, q_len, k_len = act.shape[0], act.shape[-2], act.shape[-1]
            if self.queries.shape != (b,) or self.source_mask.shape[0] != b or self.source_mask.shape[1] > k_len:
                raise HookError(f"BlockAttention at {target.name}: expected queries ({b},) and a source mask ({b}, <= "
                                f"{k_len}), got {tuple(self.queries.shape)} and {tuple(self.source_mask.shape)}")
            q = torch.arange(q_len, device=sel.device)[None, :, None] == self.queries.to(sel.device)[:, None, None]
            m = torch.zeros(b, 1, k_len, dtype=torch.bool, device=sel.device)
            m[:, 0, : self.source_mask.shape[1]] = self.source_mask.to(sel.device)
            block = q & m  # [batch q k]
            return sel.masked_fill(block if sel.ndim == 3 else block[:, None], float("-inf"))
        # sel: [batch (head) k_pos] scores of the query position(s)
        k_len = act.shape[-1]
        src = torch.as_tensor([s % k_len for s in self.sources], dtype=torch.long, device=sel.device)
        out = sel.clone()
        out[..., src] = float("-inf")
        return out


def block_attention(layer: int, target: int | Int[Tensor, "batch"], sources: Sequence[int] | Bool[Tensor, "batch k_pos"],
                    head: int | None = None) -> BlockAttention:
    """Block attention from query position `target` to key positions `sources` at `layer`.

    The low-level intervention (one layer, one edge set); `interp.patching.knockout` is the
    method built on it (blocked from a start layer on, swept over start layers, with a metric).
    `target` may be one query position per example ([batch] tensor, prompt coordinates) with
    `sources` a bool [batch, k_pos] mask of the keys each example's query may not read.
    """
    if isinstance(target, Tensor):
        if not isinstance(sources, Tensor) or sources.dtype != torch.bool or sources.ndim != 2 \
                or target.ndim != 1 or sources.shape[0] != target.shape[0]:
            raise HookError(f"block_attention at layer {layer}: per-example targets expected with a bool source mask "
                            f"(batch={tuple(target.shape)[:1]}, k_pos), got {type(sources).__name__}")
        t = target.long().cpu()
        mask = sources.cpu()
        if not bool(mask.any(1).all()):
            raise HookError(f"block_attention at layer {layer}: expected at least one source position per example, "
                            f"got none for rows {torch.nonzero(~mask.any(1))[:, 0].tolist()}")
        late = mask & (torch.arange(mask.shape[1])[None] > t[:, None])
        if bool(late.any()):
            i = int(torch.nonzero(late)[0, 0])
            raise HookError(f"block_attention: expected sources at or before each target (causal), got "
                            f"{torch.nonzero(mask[i])[:, 0].tolist()} for target {int(t[i])} (row {i})")
        return BlockAttention(Node(layer, Site.ATTN_SCORES), head=head, queries=t, source_mask=mask)
    if not len(sources):
        raise HookError(f"block_attention at layer {layer}: expected at least one source position, got none")
    if any(s >= 0 and target >= 0 and s > target for s in sources):
        raise HookError(f"block_attention: expected sources at or before the target {target} (causal), "
                        f"got {list(sources)}")
    return BlockAttention(Node(layer, Site.ATTN_SCORES), pos=target, head=head, sources=tuple(sources))


def _make_hook(iv: Intervention, target: Target, fired: set[str]) -> HookFn:
    idx = selector(target.name, target.pos, target.head)

    def hook(act: Tensor, *, hook: object) -> Tensor:
        fired.add(target.name)
        _check_pos_in(target, act)
        new = iv.apply(act[idx], act, target)
        out = act.clone()
        out[idx] = new
        return out

    return hook


@dataclass(frozen=True)
class Capture:
    """An activation to keep from a run: hook `where`; `index` ([batch, k] positions of the run's
    layout) keeps only those positions, gathered inside the hook (the position axis is the query
    axis of attention patterns/scores); `grad` keeps it in the autograd graph (runs with grad)."""

    where: str | Node
    index: Int[Tensor, "batch k"] | None = None
    grad: bool = False


@dataclass
class Run:
    """What `intervene` yields: the captured activations (filled as the forward runs)."""

    captured: dict[str, Tensor] = field(default_factory=dict)
    fired: set[str] = field(default_factory=set)


def pos_dim(name: str) -> int:
    """The position axis of hook `name`'s activation (the query axis of patterns and scores)."""
    return 2 if site_of(name) in (Site.PATTERN, Site.ATTN_SCORES) else 1


def gather_positions(act: Tensor, idx: Tensor | None, dim: int) -> Tensor:
    """`act` at per-example positions `idx` [batch, k] along axis `dim` (all of it when None)."""
    if idx is None:
        return act
    shape = [1] * act.ndim
    shape[0], shape[dim] = idx.shape
    full = list(act.shape)
    full[dim] = idx.shape[1]
    return torch.gather(act, dim, idx.to(act.device).reshape(shape).expand(full))


def _capture_hook(name: str, cap: Capture, run: Run) -> HookFn:
    def hook(act: Tensor, *, hook: object) -> None:
        run.fired.add(name)
        x = act if cap.grad else act.detach()
        if cap.index is not None:
            if cap.index.shape[0] != act.shape[0]:
                raise HookError(f"capture {name}: expected index rows for {act.shape[0]} examples, got "
                                f"{tuple(cap.index.shape)}")
            x = gather_positions(x, cap.index, pos_dim(name))
        run.captured[name] = x

    return hook


@contextmanager
def intervene(
    model: Model,
    interventions: Sequence[Intervention] = (),
    *,
    capture: Sequence[str | Node | Capture] = (),
    capture_grad: bool = False,
    strict: bool = True,
) -> Iterator[Run]:
    """Apply several interventions (and capture activations) for the forwards run in the block.

    Interventions on the same hook apply in the order given. Captures record the activation
    *after* the interventions at that hook. Hooks are removed on exit, even on error. With
    `strict`, a hook that never fired in the block raises.
    """
    run = Run()
    fwd: list[tuple[str, Callable]] = []
    known = dict.fromkeys(model.hook_dict) if interventions or capture else None  # one snapshot
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise HookError(f"interventions: expected Intervention objects (Set, Add, Scale, Zero, Map, "
                            f"MeanAblate, ResampleAblate, Patch, BlockAttention), got {type(iv).__name__}")
        target = _target(model, iv.where, iv.pos, iv.head, known)
        _check_values(iv, target.name)
        fwd.append((target.name, _make_hook(iv, target, run.fired)))
    caps: dict[str, Capture] = {}
    for c in capture:
        spec = c if isinstance(c, Capture) else Capture(c, grad=capture_grad)
        names = (resolve_hooks(model, spec.where, known=known) if not isinstance(spec.where, Node)
                 else [resolve_hook(model, spec.where, known)])
        for name in names:
            caps[name] = spec
    for name, spec in caps.items():
        fwd.append((name, _capture_hook(name, spec, run)))
    with attach_hooks(model, fwd):
        yield run
    if strict:
        expected = {n for n, _ in fwd}
        missing = sorted(expected - run.fired)
        if missing:
            raise HookError(f"hooks: expected every requested hook to fire in the forward pass, got "
                            f"{missing} never firing (stop_at_layer too low, or no forward ran?)")


def stop_layer(model: Model, names: Sequence[str]) -> int | None:
    """The `stop_at_layer` that still runs every hook in `names` (None: the whole forward)."""
    layers = [hook_layer(n) for n in names]
    if any(layer is None and n not in EMBED_HOOKS for layer, n in zip(layers, names, strict=True)):
        return None  # final-norm or unembed hooks need the whole forward
    top = max((layer for layer in layers if layer is not None), default=-1) + 1
    return top if top < Arch.of(model).n_layers else None


def check_finite_acts(acts: Mapping[str, Tensor], offset: int = 0, dtype: torch.dtype | None = None,
                      what: str = "collect") -> None:
    """Raise if any activation holds NaN or Inf, naming the hook (earliest layer first) and rows
    (counted from `offset`, the batch's first row in the dataset).

    One reduction per tensor. Pre-softmax attention scores legitimately hold -inf (the causal
    mask), so only NaN and +inf count there.
    """
    bad: list[tuple[int, str, list[int]]] = []
    for name, t in acts.items():
        if not t.is_floating_point():
            continue
        ok = torch.isfinite(t) if site_of(name) != Site.ATTN_SCORES else ~(torch.isnan(t) | (t == float("inf")))
        if not bool(ok.all()):
            rows = (torch.nonzero(~ok.reshape(t.shape[0], -1).all(dim=1))[:, 0] + offset).tolist()
            layer = hook_layer(name)
            bad.append((-1 if name.startswith("hook_") else (layer if layer is not None else 10**9), name, rows))
    if bad:
        _, name, rows = min(bad)
        hint = (f"; storage dtype {dtype} may overflow: try dtype=None or torch.float32"
                if dtype is not None else "; check the model's weights and these prompts")
        raise ValueError(f"{what}: expected finite activations, got NaN/Inf at {name} in rows "
                         f"{rows[:10]}{' ...' if len(rows) > 10 else ''} (earliest of {len(bad)} affected "
                         f"hooks){hint}")


@dataclass(frozen=True)
class RunOutput:
    """One run: `logits` [batch, pos, d_vocab] in the layout of `prompts` (the right-padded prompts
    the run computed on; None when the run stopped early), and the captured activations by hook
    name (positions as captured: all of the right-padded layout, or the capture's `index`)."""

    logits: Float[Tensor, "batch pos d_vocab"] | None
    acts: dict[str, Tensor]
    prompts: Prompts


def run(
    model: Model,
    prompts: Prompts | Batch | Tensor,
    *,
    edits: Sequence[Intervention] = (),
    captures: Sequence[str | Node | Capture] = (),
    logits: bool = True,
    stop_at_layer: int | None = None,
    grad: bool = False,
    check_finite: bool = True,
    row_offset: int = 0,
) -> RunOutput:
    """Run `model` once on `prompts` with `edits` applied, keeping `captures`.

    `prompts`: `Prompts`, a padded `Batch` or a token tensor (unpadded prompts); computed on the
    right-padded layout, so positions in edits and capture indices are prompt coordinates and
    each prompt's values equal running it alone. With ``logits=False`` the forward stops after
    the last block an edit or capture needs (`stop_layer`) and no logits are returned;
    `stop_at_layer` sets that layer explicitly. ``grad=True`` runs with autograd (for
    attribution); otherwise under `torch.no_grad`. Every hook must fire; captured
    activations must be finite (rows in the error count from `row_offset`). Hooks are removed on
    exit, also on error.
    """
    p = as_prompts(prompts).right()
    tokens = check_model_tokens(model, p.tokens, "prompts.tokens").to(_device(model))
    if stop_at_layer is None and not logits:
        names = [_target(model, e.where, e.pos, e.head).name for e in edits if isinstance(e, Intervention)]
        for c in captures:
            where = c.where if isinstance(c, Capture) else c
            names += [resolve_hook(model, where)] if isinstance(where, Node) else resolve_hooks(model, where)
        stop_at_layer = stop_layer(model, names)
    ctx = torch.enable_grad() if grad else torch.no_grad()  # not inference_mode: results may feed autograd
    with ctx, intervene(model, edits, capture=captures) as r:
        out = model(tokens, stop_at_layer=stop_at_layer, return_type="logits" if logits else None)
    if check_finite:
        check_finite_acts(r.captured, row_offset, what="run")
    return RunOutput(out if logits and stop_at_layer is None else None, r.captured, p)


def _device(model: Model) -> torch.device:
    return next(model.parameters()).device


def run_with_interventions(
    model: Model,
    tokens: Tensor | Batch,
    interventions: Sequence[Intervention],
    *,
    capture: Sequence[str | Node] = (),
    **forward_kwargs: object,
) -> tuple[Float[Tensor, "batch pos d_vocab"], dict[str, Tensor]]:
    """One forward with `interventions` applied; returns the logits and captured activations.

    `tokens`: validated by `interp.tokens.check_tokens` (ids in the vocabulary, at most n_ctx
    positions). A raw tensor is run as unpadded prompts; padded prompts come as a right-padded
    `interp.tokens.Batch` (each prompt then sees exactly what it sees alone, positions count from
    its start, and values at pad positions should be masked with `Batch.mask`); a left-padded
    Batch is refused (pass `batch.right()`). Prefer `run` (which takes any padding).
    """
    if isinstance(tokens, Batch):
        if tokens.side != "right" and bool((tokens.lengths != tokens.tokens.shape[1]).any()):
            raise HookError("tokens: expected unpadded or right-padded prompts, got a left-padded Batch; "
                            "pass batch.right() (positions then count from each prompt's start)")
    if forward_kwargs:
        toks = check_model_tokens(model, tokens.tokens if isinstance(tokens, Batch) else tokens).to(_device(model))
        with intervene(model, interventions, capture=capture) as r:
            logits = model(toks, **forward_kwargs)
        return logits, r.captured
    out = run(model, tokens, edits=interventions, captures=capture, grad=torch.is_grad_enabled(),
              check_finite=False)
    return out.logits, out.acts  # type: ignore[return-value]


AblationKind = Literal["zero", "mean", "resample"]


def ablation(kind: AblationKind, where: str | Node, *, reference: Tensor | None = None,
             pos: int | Sequence[int] | None = None, head: int | None = None, seed: int = 0
             ) -> Intervention:
    """Zero, mean or resample ablation of `where`; `reference` is that hook's activation on a
    reference batch (needed for mean and resample)."""
    if kind == "zero":
        return Zero(where, pos=pos, head=head)
    if reference is None:
        raise HookError(f"{kind} ablation: expected a reference activation batch, got None")
    if kind == "mean":
        mean = reference.mean(dim=0, keepdim=True)
        sel = selector(where.hook_name if isinstance(where, Node) else where, pos, head)
        return MeanAblate(where, pos=pos, head=head, mean=mean[sel])
    if kind == "resample":
        return ResampleAblate(where, pos=pos, head=head, source=reference, seed=seed)
    raise HookError(f"ablation kind: expected 'zero', 'mean' or 'resample', got {kind!r}")
