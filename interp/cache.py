"""Activation caching over a dataset: in memory, or streamed to a sharded disk store.

`collect` runs the model over prompts (`interp.prompts.Prompts`, a padded `Batch` or tokens)
through the one run path (`interp.hooks.run`) and keeps only what was asked for: hook names or
glob patterns (validated against the model; unknown names get the closest valid ones), a layer
filter, positions (all, each prompt's last token, a named span of the prompts, explicit indices,
or a mask) and a storage dtype. `rows(cache, prompts, name)` reads each prompt's named position
back (e.g. probe rows).
Compared with `run_with_cache` it stores no unrequested hooks, selects positions inside the hook,
and stops the forward pass after the last layer it needs.

Padded prompts are computed right-padded, where each prompt sees exactly
the positions it would see alone, and results are returned in the caller's padding layout.
With `out=DIR` the rows stream into an `interp.store` directory: memory stays bounded by one
batch plus one shard, and an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Bool, Int
from rich.progress import Progress
from torch import Tensor

from interp.arch import Model, config_of, model_name
from interp.graph import Node
from interp.hooks import (
    Capture,
    Intervention,
    check_finite_acts,
    gather_positions,
    pos_dim,
    resolve_hooks,
    run,
)
from interp.models import config_fingerprint, weights_fingerprint
from interp.prompts import Prompts, as_prompts
from interp.store import Store, StoreWriter
from interp.tokens import Batch, check_model_tokens, check_tokens

log = logging.getLogger(__name__)

PositionSpec = Literal["all", "last"] | str | Sequence[int] | Bool[Tensor, "pos"] | Bool[Tensor, "n pos"]

__all__ = ["Cache", "check_finite_acts", "check_position_spec", "collect", "rows", "select_positions",
           "span_positions", "store_meta"]


@dataclass
class Cache(Mapping[str, Tensor]):
    """Activations in memory: hook name -> Tensor [n_examples, n_positions, *act_shape].

    Indexable like TransformerLens's ActivationCache: ``cache["resid_post", 3]``.
    """

    acts: dict[str, Tensor]
    lengths: Int[Tensor, "n"]
    positions: Int[Tensor, "n k"] | None = None  # selected positions (prompt coordinates, -1: none); None = all
    meta: dict = field(default_factory=dict)
    side: str = "right"  # the padding layout of position-"all" activations

    def _key(self, key: str | tuple[str, int]) -> str:
        if isinstance(key, tuple):
            from interp.tl import get_act_name

            key = get_act_name(*key)
        if key not in self.acts:
            import difflib

            close = difflib.get_close_matches(str(key), list(self.acts), n=3)
            raise KeyError(f"cache: expected one of the cached hooks {list(self.acts)}, got {key!r}"
                           + (f"; did you mean {close}?" if close else ""))
        return key

    def __getitem__(self, key: str | tuple[str, int]) -> Tensor:  # type: ignore[override]
        return self.acts[self._key(key)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.acts)

    def __len__(self) -> int:
        return len(self.acts)

    @property
    def hook_names(self) -> list[str]:
        return list(self.acts)

    @property
    def n_examples(self) -> int:
        return int(self.lengths.shape[0])

    def iter_batches(self, key: str | tuple[str, int], batch_size: int, *, shuffle: bool = False,
                     seed: int = 0) -> Iterator[Tensor]:
        x = self[key]
        order = (torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed)) if shuffle
                 else torch.arange(x.shape[0]))
        for i in range(0, x.shape[0], batch_size):
            yield x[order[i: i + batch_size].to(x.device)]


# ------------------------------------------------------------------------------------ positions

def _pos_dim(name: str) -> int:
    return pos_dim(name)


def check_position_spec(spec: object) -> PositionSpec:
    """`spec` if it is a position spec: 'all', 'last', a span name, a bool mask or a non-empty list of ints."""
    if isinstance(spec, str):
        if not spec:
            raise ValueError("positions: expected 'all', a span name, a list of ints or a bool mask, got ''")
        return spec
    if isinstance(spec, Tensor) and spec.dtype == torch.bool:
        return spec  # type: ignore[return-value]
    items = list(spec) if isinstance(spec, (Sequence, Tensor)) else None
    if not items or not all(isinstance(i, int) and not isinstance(i, bool)
                            or isinstance(i, Tensor) and i.ndim == 0 and not i.is_floating_point()
                            and i.dtype != torch.bool for i in items):
        raise ValueError(f"positions: expected 'all', 'last', a span name, a non-empty list of ints or a bool mask, "
                         f"got {spec!r}")
    return spec  # type: ignore[return-value]


def span_positions(prompts: Prompts, name: str) -> Int[Tensor, "batch k"]:
    """Each prompt's token indices of span `name` (prompt coordinates), [batch, k] for the longest
    span; -1 after a shorter span's end (a cell that example does not have)."""
    s = prompts.span(name)
    k = int((s[:, 1] - s[:, 0]).max())
    idx = s[:, :1] + torch.arange(k)[None]
    return torch.where(idx < s[:, 1:], idx, -1)


def select_positions(spec: PositionSpec, lengths: Int[Tensor, "b"] | Prompts, width: int,
                     offset: int = 0) -> Int[Tensor, "b k"] | None:
    """Per-example position indices (right-padded layout = prompt coordinates) for `spec`; None means all.

    Integer indices count from each prompt's start; negative ones from its last real token.
    A name ('last' or a span of `Prompts`) gives each prompt's tokens of that span, padded with
    -1 where a prompt's span is shorter than the longest. `offset` is the row offset of this
    batch in the dataset (for per-example masks and errors).
    """
    prompts = lengths if isinstance(lengths, Prompts) else None
    lengths = prompts.lengths if prompts is not None else lengths
    b = lengths.shape[0]
    if isinstance(spec, str):
        if spec == "all":
            return None
        if prompts is not None:
            try:
                return span_positions(prompts, spec)
            except KeyError as e:
                raise ValueError(f"positions: expected 'all' or a named position of the prompts {sorted(prompts.names)}, "
                                 f"got {spec!r}; span names need Prompts built with spans=...") from e
        if spec == "last":
            return (lengths - 1)[:, None]
        raise ValueError(f"positions: expected 'all', 'last', a list of indices or a bool mask, got {spec!r}; "
                         f"span names need Prompts (interp.prompts.Prompts)")
    if isinstance(spec, Tensor) and spec.dtype == torch.bool:
        if spec.ndim not in (1, 2) or spec.ndim == 2 and spec.shape[0] < offset + b:
            raise ValueError(f"positions mask: expected shape (pos,) or (n_examples, pos) covering rows "
                             f"up to {offset + b}, got {tuple(spec.shape)}")
        mask = spec if spec.ndim == 2 else spec[None].expand(b, -1)
        if spec.ndim == 2:
            mask = spec[offset: offset + b]
        if mask.shape[1] != width:
            raise ValueError(f"positions mask: expected {width} positions, got {mask.shape[1]}")
        counts = mask.sum(dim=1)
        if int(counts.min()) != int(counts.max()) or int(counts.min()) == 0:
            raise ValueError(f"positions mask: expected the same non-zero number of True per example, got "
                             f"counts in [{int(counts.min())}, {int(counts.max())}]")
        idx = torch.nonzero(mask)[:, 1].reshape(b, -1)
    else:
        idx = torch.as_tensor([int(i) for i in check_position_spec(spec)], dtype=torch.long)
        if idx.ndim != 1 or idx.numel() == 0:
            raise ValueError(f"positions: expected a non-empty list of ints, got {spec!r}")
        idx = torch.where(idx[None, :] < 0, lengths[:, None] + idx[None, :], idx[None, :].expand(b, -1))
    bad = (idx < 0) | (idx >= lengths[:, None])
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"positions: expected indices within each prompt's length, got "
                         f"{idx[row].tolist()} for a prompt of length {int(lengths[row])} (row {offset + row})")
    return idx


def _gather(act: Tensor, idx: Tensor | None, pos_dim: int) -> Tensor:
    return gather_positions(act, idx, pos_dim)


def _nan_missing(acts: dict[str, Tensor], idx: Tensor | None) -> dict[str, Tensor]:
    """NaN in the cells of positions a prompt does not have (idx -1)."""
    if idx is None or not bool((idx < 0).any()):
        return acts
    out = {}
    for name, a in acts.items():
        miss = (idx < 0).to(a.device)
        shape = [1] * a.ndim
        shape[0], shape[pos_dim(name)] = miss.shape
        out[name] = a.masked_fill(miss.reshape(shape), float("nan")) if a.is_floating_point() else a
    return out


# ---------------------------------------------------------------------------------------- batches

def _batches(data: Tensor | Batch | Iterable[Tensor], batch_size: int, positions: PositionSpec
             ) -> tuple[Iterator[tuple[Batch, Tensor | None]], int | None]:
    """Right-padded batches of `data` with their selected positions; and the row count when known."""
    if isinstance(data, (Tensor, Batch)):
        prompts = as_prompts(data).right()
        n = len(prompts)
        idx = select_positions(positions, prompts, prompts.tokens.shape[1])

        def gen() -> Iterator[tuple[Batch, Tensor | None]]:
            for i in range(0, n, batch_size):
                sl = slice(i, i + batch_size)
                yield (Batch(prompts.tokens[sl], prompts.lengths[sl], "right"),
                       None if idx is None else idx[sl])
        return gen(), n

    def gen_iter() -> Iterator[tuple[Batch, Tensor | None]]:
        done = 0
        for item in data:  # type: ignore[union-attr]
            p = as_prompts(item if isinstance(item, Batch) else check_tokens(item)).right()
            idx = select_positions(positions, p, p.tokens.shape[1], offset=done)
            yield Batch(p.tokens, p.lengths, "right"), idx
            done += len(p)
    return gen_iter(), None


def _skip_stored(batches: Iterator[tuple[Batch, Tensor | None]], writer: StoreWriter
                 ) -> Iterator[tuple[Batch, Tensor | None]]:
    """The batches after the rows `writer` already holds, checking those rows' tokens on the way."""
    left = writer.rows_done
    for b, idx in batches:
        k = min(b.tokens.shape[0], left)
        if k:
            writer.check_rows(b.tokens[:k], b.lengths[:k])
            left -= k
        if k < b.tokens.shape[0]:
            yield Batch(b.tokens[k:], b.lengths[k:], "right"), None if idx is None else idx[k:]


def store_meta(model: Model, hooks: Sequence[str], positions: PositionSpec,
               dtype: torch.dtype | None, prompts: Prompts | None = None) -> dict[str, object]:
    """What identifies a store's content besides its tokens (the model's name is kept, not compared)."""
    return {"model": model_name(model), "weights": weights_fingerprint(model),
            "config": config_fingerprint(config_of(model)), "hooks": list(hooks),
            "positions": _spec_repr(positions, prompts), "dtype": str(dtype) if dtype else None}


def collect(
    model: Model,
    prompts: Prompts | Tensor | Batch | Iterable[Tensor],
    *,
    hooks: Sequence[str | Node] | str,
    layers: Sequence[int] | None = None,
    positions: PositionSpec = "all",
    dtype: torch.dtype | None = None,
    batch_size: int = 64,
    out: str | Path | None = None,
    shard_bytes: int = 64 << 20,
    progress: bool = True,
    resume: bool = True,
    overwrite: bool = False,
    edits: Sequence[Intervention] | Callable[[slice], Sequence[Intervention]] = (),
) -> Cache | Store:
    """Cache the requested activations over `prompts`; in memory, or streamed to `out`.

    `prompts`: `Prompts`, a padded `Batch`, a token tensor (unpadded prompts) or an iterable of
    them (streamed). `positions`: "all"; "last" (each prompt's last token); a span name of the
    prompts (each prompt's tokens of that span: the result has the longest span's width and is
    NaN where a prompt's span is shorter, `Cache.positions` -1 there); a list of indices (from
    each prompt's start; negative from its end); or a bool mask. Each result tensor is
    [n_examples, n_positions, *act_shape] (for attention patterns the selected axis is the query
    position). With positions="all" and padded prompts, padding rows hold the values computed
    at pad positions of the right-padded run and should be masked with `lengths`; they are
    returned in the caller's padding layout (`Cache.side`). Computed with `interp.hooks.run`.

    An existing store at `out` is resumed (or, when complete, reopened) only if it was built from
    the same weights, config, tokens, hooks, positions and dtype; otherwise the error names the
    field that differs. `overwrite=True` replaces it instead.

    `edits`: interventions applied in every batch's run (`interp.hooks.run`), or a function of
    the batch's rows (a slice of `prompts`) returning that batch's edits, for per-example edits
    such as a rollout's continuous inputs (`interp.rollout.Rollout.edits_for`). In memory only:
    a store does not record edits, so `out` with edits is refused.
    """
    names = resolve_hooks(model, hooks, layers)
    if out is not None and (callable(edits) or len(edits)):
        raise ValueError("collect: expected no edits when streaming to a store (out=...), got edits; a store's "
                         "identity records no edits, so collect edited runs in memory")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    positions = check_position_spec(positions)
    whole: Prompts | None = None
    if isinstance(prompts, (Tensor, Batch)):  # validate everything before any file is written
        whole = as_prompts(prompts).right()
        check_model_tokens(model, whole.tokens)
        select_positions(positions, whole, whole.tokens.shape[1])
    writer: StoreWriter | None = None
    skip = 0
    batches, n_total = _batches(prompts, batch_size, positions)
    if out is not None:
        writer = StoreWriter(out, store_meta(model, names, positions, dtype, whole), shard_bytes=shard_bytes,
                             resume=resume, overwrite=overwrite)
        skip = writer.rows_done
        batches = _skip_stored(batches, writer)
        if writer.complete:
            log.info("store %s is complete; checking its tokens and reopening it", out)
            if next(batches, None) is not None:  # every stored row's tokens were checked on the way
                raise writer.more_rows_error()
            return writer.close()
    left_batch = prompts if isinstance(prompts, Batch) and prompts.side == "left" else None

    kept: dict[str, list[Tensor]] = {n: [] for n in names}
    all_lengths: list[Tensor] = []
    all_idx: list[Tensor] = []
    done = skip
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("caching", total=n_total, completed=skip)
        for batch, idx in batches:
            check_model_tokens(model, batch.tokens)
            gather = None if idx is None else idx.clamp_min(0)  # -1: a cell this prompt lacks (NaN below)
            batch_edits = edits(slice(done, done + batch.tokens.shape[0])) if callable(edits) else edits
            res = run(model, batch, edits=batch_edits, captures=[Capture(n, gather) for n in names], logits=False,
                      row_offset=done)
            got = {n: (res.acts[n].to(dtype) if dtype is not None else res.acts[n].clone()) for n in names}
            if dtype is not None:
                check_finite_acts(got, done, dtype)
            got = _nan_missing(got, idx)
            if writer is not None:
                writer.append(got, batch.lengths, tokens=batch.tokens)
            else:
                for n in names:
                    kept[n].append(got[n])
                all_lengths.append(batch.lengths)
                if idx is not None:
                    all_idx.append(idx)
            done += batch.tokens.shape[0]
            bar.update(task, completed=done)
    if writer is not None:
        return writer.close()
    if not all_lengths:
        raise ValueError("collect: expected at least one example in prompts, got none")
    lengths = torch.cat(all_lengths)
    acts = {n: _cat_ragged(v) for n, v in kept.items()}
    side = "right"
    if left_batch is not None and positions == "all":
        acts = {n: left_batch.to_layout(a, _pos_dim(n)) for n, a in acts.items()}
        side = "left"
    return Cache(acts, lengths, _cat_ragged(all_idx, -1) if all_idx else None,
                 meta={"model": model_name(model), "positions": _spec_repr(positions, whole)}, side=side)


def rows(
    acts: Cache | Mapping[str, Tensor] | Tensor,
    prompts: Prompts,
    name: str = "last",
    hook: str | Node | None = None,
) -> Tensor:
    """The activation at each prompt's position `name` (a span's last token): [batch, *act_shape].

    For probes and other per-example readers. `acts`: a `Cache` (collected with positions="all",
    in either padding layout, or with the positions that include `name`'s index), a mapping of
    hook name -> [batch, pos, ...] tensors in the right-padded layout, or one such tensor.
    `hook` picks the hook of a cache holding several.
    """
    if isinstance(acts, Tensor):
        x, sel, side = acts, None, "right"
        hname = None
    else:
        keys = list(acts)
        hname = (hook.hook_name if isinstance(hook, Node) else hook) if hook is not None else None
        if hname is None:
            if len(keys) != 1:
                raise ValueError(f"rows: expected hook=... for a cache of several hooks {keys}, got None")
            hname = keys[0]
        x = acts[hname]
        sel = getattr(acts, "positions", None)
        side = getattr(acts, "side", "right")
    if x.shape[0] != len(prompts):
        raise ValueError(f"rows: expected activations of {len(prompts)} examples (one per prompt), got {x.shape[0]}")
    dim = pos_dim(hname) if hname is not None else 1
    want = prompts.index(name)
    if sel is None:
        col = want + (prompts.to_side(side).shift() if side == "left" else 0)  # type: ignore[arg-type]
        if int(col.max()) >= x.shape[dim]:
            raise ValueError(f"rows: expected activations covering position {int(col.max())}, got {x.shape[dim]}")
    else:
        hit = sel == want[:, None]
        if not bool(hit.any(1).all()):
            i = int(torch.nonzero(~hit.any(1))[0, 0])
            raise ValueError(f"rows {name!r}: expected the cache's positions to include each prompt's index, got "
                             f"{sel[i].tolist()} for prompt {i} (wants {int(want[i])}); collect with positions='all' "
                             f"or positions={name!r}")
        col = hit.float().argmax(1)
    return gather_positions(x, col[:, None], dim).squeeze(dim)


def _cat_ragged(parts: list[Tensor], fill: float | int = 0) -> Tensor:
    """Concatenate along the batch axis, padding every other axis to the widest part with `fill`."""
    shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].ndim)]
    out = []
    for p in parts:
        if list(p.shape[1:]) != shape:
            q = p.new_full((p.shape[0], *shape), fill)
            q[tuple(slice(0, s) for s in p.shape)] = p
            p = q
        out.append(p)
    return torch.cat(out)


def _spec_repr(spec: PositionSpec, prompts: Prompts | None = None) -> str:
    if isinstance(spec, str):
        if spec == "all" or prompts is None:
            return spec
        if spec == "last" and torch.equal(prompts.index(spec), prompts.lengths - 1):
            return spec  # each row's last token: what "last" means for plain tokens too
        table = span_positions(prompts, spec)  # a span's content, not only its name
        digest = hashlib.sha256(table.contiguous().numpy().tobytes()).hexdigest()
        return f"span:{spec}:{digest[:16]}"
    if isinstance(spec, Tensor):  # the mask's content, not only its shape and count
        digest = hashlib.sha256(spec.detach().to("cpu", torch.bool).contiguous().numpy().tobytes()).hexdigest()
        return f"mask{tuple(spec.shape)}:{int(spec.sum())}:{digest[:16]}"
    return "idx:" + ",".join(str(int(i)) for i in spec)
