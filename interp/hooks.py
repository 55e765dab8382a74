"""A reusable hook API: resolve hook names, and compose interventions that are always removed.

Research code says *what* to do to *which* node, not how to write hook plumbing:

    with intervene(model, [Zero(Node(1, "head", head=3)), Add("blocks.0.hook_resid_post", v)],
                   capture=["blocks.1.hook_resid_pre"]) as run:
        logits = model(tokens)
    run.captured["blocks.1.hook_resid_pre"]

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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.arch import Arch
from interp.graph import Node, Site, node_from_hook_name
from interp.tokens import Batch, check_model_tokens


@runtime_checkable
class HookFn(Protocol):
    def __call__(self, act: Tensor, *, hook: object) -> Tensor | None: ...


class HookError(ValueError):
    """A hook name, node or intervention that does not fit the model."""


# ------------------------------------------------------------------------------ name resolution

def hook_names(model: HookedTransformer) -> list[str]:
    return list(model.hook_dict.keys())


def resolve_hook(model: HookedTransformer, target: str | Node) -> str:
    """The validated TransformerLens hook name of `target` (a Node or a raw hook name)."""
    if isinstance(target, Node):
        try:
            target.validate(Arch.of(model))
        except ValueError as e:
            raise HookError(str(e)) from None
        name = target.hook_name
        if name not in model.hook_dict:
            hint = ("; set model.set_use_split_qkv_input(True) for q/k/v_input sites"
                    if target.site in (Site.Q_INPUT, Site.K_INPUT, Site.V_INPUT) else "")
            raise HookError(f"{target}: expected hook {name!r} in the model, got no such hook point{hint}")
        return name
    if not isinstance(target, str):
        raise HookError(f"hook target: expected a Node or a hook-name string, got {type(target).__name__}")
    if target not in model.hook_dict:
        close = difflib.get_close_matches(target, hook_names(model), n=5, cutoff=0.5)
        raise HookError(f"hook name: expected one of the model's {len(model.hook_dict)} hook points, "
                        f"got {target!r}" + (f"; closest: {close}" if close else ""))
    return target


def resolve_hooks(model: HookedTransformer, targets: Sequence[str | Node] | str | Node,
                  layers: Sequence[int] | None = None) -> list[str]:
    """Expand names, glob patterns (``blocks.*.hook_resid_post``) and Nodes into hook names.

    `layers` keeps only per-layer hooks of those layers. A pattern or filter that matches
    nothing raises: it is never a silent empty result.
    """
    if isinstance(targets, (str, Node)):
        targets = [targets]
    names: list[str] = []
    all_names = hook_names(model)
    for t in targets:
        if isinstance(t, str) and any(ch in t for ch in "*?["):
            hits = [n for n in all_names if fnmatch.fnmatchcase(n, t)]
            if not hits:
                raise HookError(f"hook pattern {t!r}: expected it to match some of the model's hook "
                                f"points, got no match; e.g. {all_names[:4]}")
            names.extend(hits)
        else:
            names.append(resolve_hook(model, t))
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

def _site_of(name: str) -> Site | None:
    try:
        return node_from_hook_name(name).site  # type: ignore[return-value]
    except ValueError:
        return None


def selector(name: str, pos: int | Sequence[int] | None, head: int | None) -> tuple:
    """An index tuple into the activation of hook `name` selecting positions and a head."""
    site = _site_of(name)
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


def _target(model: HookedTransformer, where: str | Node, pos: object, head: object) -> Target:
    if isinstance(where, Node):
        name = resolve_hook(model, where)
        if pos is None:
            pos = where.pos
        if head is None:
            head = where.head
    else:
        name = resolve_hook(model, where)
    n_ctx = Arch.of(model).n_ctx
    pos = _check_pos(pos, name, n_ctx)
    if head is not None and (isinstance(head, bool) or not isinstance(head, int)):
        raise HookError(f"hook {name!r}: head expected an int, got {head!r}")
    if head is not None:
        site = _site_of(name)
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
    site = _site_of(target.name)
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
class BlockAttention(Intervention):
    """Attention knockout (Geva et al. 2023): query position `pos` may not read key positions
    `sources` in layer `where` (an int layer, or an attn_scores Node / hook name). Set on the
    pre-softmax scores, so the remaining edges are renormalised. `head` restricts it to one head."""

    sources: Sequence[int] = ()

    def apply(self, sel: Tensor, act: Tensor, target: Target) -> Tensor:
        # sel: [batch (head) k_pos] scores of the query position(s)
        k_len = act.shape[-1]
        src = torch.as_tensor([s % k_len for s in self.sources], dtype=torch.long, device=sel.device)
        out = sel.clone()
        out[..., src] = float("-inf")
        return out


def block_attention(layer: int, target: int, sources: Sequence[int], head: int | None = None
                    ) -> BlockAttention:
    """Block attention from query position `target` to key positions `sources` at `layer`."""
    if not sources:
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


@dataclass
class Run:
    """What `intervene` yields: the captured activations (filled as the forward runs)."""

    captured: dict[str, Tensor] = field(default_factory=dict)
    fired: set[str] = field(default_factory=set)


@contextmanager
def intervene(
    model: HookedTransformer,
    interventions: Sequence[Intervention] = (),
    *,
    capture: Sequence[str | Node] = (),
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
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise HookError(f"interventions: expected Intervention objects (Set, Add, Scale, Zero, "
                            f"MeanAblate, ResampleAblate, Patch, BlockAttention), got {type(iv).__name__}")
        target = _target(model, iv.where, iv.pos, iv.head)
        _check_values(iv, target.name)
        fwd.append((target.name, _make_hook(iv, target, run.fired)))
    cap_names = resolve_hooks(model, list(capture)) if capture else []
    for name in cap_names:
        def cap(act: Tensor, *, hook: object, _name: str = name) -> None:
            run.fired.add(_name)
            run.captured[_name] = act if capture_grad else act.detach()
        fwd.append((name, cap))
    with model.hooks(fwd_hooks=fwd):
        yield run
    if strict:
        expected = {n for n, _ in fwd}
        missing = sorted(expected - run.fired)
        if missing:
            raise HookError(f"hooks: expected every requested hook to fire in the forward pass, got "
                            f"{missing} never firing (stop_at_layer too low, or no forward ran?)")


def run_with_interventions(
    model: HookedTransformer,
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
    Batch is refused (pass `batch.right()`).
    """
    if isinstance(tokens, Batch):
        if tokens.side != "right" and bool((tokens.lengths != tokens.tokens.shape[1]).any()):
            raise HookError("tokens: expected unpadded or right-padded prompts, got a left-padded Batch; "
                            "pass batch.right() (positions then count from each prompt's start)")
        tokens = tokens.tokens
    tokens = check_model_tokens(model, tokens).to(model.cfg.device)
    with intervene(model, interventions, capture=capture) as run:
        logits = model(tokens, **forward_kwargs)
    return logits, run.captured


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
