"""Activation caching over a dataset: in memory, or streamed to a sharded disk store.

`collect` runs the model over token batches and keeps only what was asked for: hook names or
glob patterns (validated against the model; unknown names get the closest valid ones), a layer
filter, positions (all, the last real token, explicit indices, or a mask) and a storage dtype.
Compared with `run_with_cache` it stores no unrequested hooks, selects positions inside the hook,
and stops the forward pass after the last layer it needs.

Padded batches (`interp.tokens.Batch`) are computed right-padded, where each prompt sees exactly
the positions it would see alone, and results are returned in the caller's padding layout.
With `out=DIR` the rows stream into an `interp.store` directory: memory stays bounded by one
batch plus one shard, and an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Bool, Int
from rich.progress import Progress
from torch import Tensor
from transformer_lens import HookedTransformer

from interp.arch import Arch
from interp.graph import Node
from interp.hooks import HookError, hook_layer, resolve_hooks
from interp.models import config_fingerprint, weights_fingerprint
from interp.store import Store, StoreWriter
from interp.tokens import Batch, check_model_tokens, check_tokens

log = logging.getLogger(__name__)

PositionSpec = Literal["all", "last"] | Sequence[int] | Bool[Tensor, "pos"] | Bool[Tensor, "n pos"]


@dataclass
class Cache(Mapping[str, Tensor]):
    """Activations in memory: hook name -> Tensor [n_examples, n_positions, *act_shape].

    Indexable like TransformerLens's ActivationCache: ``cache["resid_post", 3]``.
    """

    acts: dict[str, Tensor]
    lengths: Int[Tensor, "n"]
    positions: Int[Tensor, "n k"] | None = None  # selected positions (right layout); None = all
    meta: dict = field(default_factory=dict)

    def _key(self, key: str | tuple[str, int]) -> str:
        if isinstance(key, tuple):
            from transformer_lens.utilities import get_act_name

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
    return 2 if name.endswith("hook_pattern") or name.endswith("hook_attn_scores") else 1


def check_position_spec(spec: object) -> PositionSpec:
    """`spec` if it is a position spec: 'all', 'last', a bool mask or a non-empty list of ints."""
    if isinstance(spec, str) or isinstance(spec, Tensor) and spec.dtype == torch.bool:
        return spec  # type: ignore[return-value]
    items = list(spec) if isinstance(spec, (Sequence, Tensor)) else None
    if not items or not all(isinstance(i, int) and not isinstance(i, bool)
                            or isinstance(i, Tensor) and i.ndim == 0 and not i.is_floating_point()
                            and i.dtype != torch.bool for i in items):
        raise ValueError(f"positions: expected 'all', 'last', a non-empty list of ints or a bool mask, "
                         f"got {spec!r}")
    return spec  # type: ignore[return-value]


def select_positions(spec: PositionSpec, lengths: Int[Tensor, "b"], width: int,
                     offset: int = 0) -> Int[Tensor, "b k"] | None:
    """Per-example position indices (right-padded layout) for `spec`; None means all positions.

    Integer indices count from each prompt's start; negative ones from its last real token.
    `offset` is the row offset of this batch in the dataset (for per-example masks).
    """
    b = lengths.shape[0]
    if isinstance(spec, str):
        if spec == "all":
            return None
        if spec == "last":
            return (lengths - 1)[:, None]
        raise ValueError(f"positions: expected 'all', 'last', a list of indices or a bool mask, got {spec!r}")
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


def check_finite_acts(acts: Mapping[str, Tensor], offset: int = 0, dtype: torch.dtype | None = None) -> None:
    """Raise if any activation holds NaN or Inf, naming the hook (earliest layer first) and rows.

    One reduction per tensor. Pre-softmax attention scores legitimately hold -inf (the causal
    mask), so only NaN and +inf count there.
    """
    bad: list[tuple[int, str, list[int]]] = []
    for name, t in acts.items():
        if not t.is_floating_point():
            continue
        ok = torch.isfinite(t) if not name.endswith("hook_attn_scores") else ~(torch.isnan(t) | (t == float("inf")))
        if not bool(ok.all()):
            rows = (torch.nonzero(~ok.reshape(t.shape[0], -1).all(dim=1))[:, 0] + offset).tolist()
            layer = hook_layer(name)
            bad.append((-1 if name.startswith("hook_") else (layer if layer is not None else 10**9), name, rows))
    if bad:
        _, name, rows = min(bad)
        hint = (f"; storage dtype {dtype} may overflow: try dtype=None or torch.float32"
                if dtype is not None else "; check the model's weights and these prompts")
        raise ValueError(f"collect: expected finite activations, got NaN/Inf at {name} in rows "
                         f"{rows[:10]}{' ...' if len(rows) > 10 else ''} (earliest of {len(bad)} affected "
                         f"hooks){hint}")


def _gather(act: Tensor, idx: Tensor | None, pos_dim: int) -> Tensor:
    if idx is None:
        return act
    shape = [1] * act.ndim
    shape[0], shape[pos_dim] = idx.shape
    full = list(act.shape)
    full[pos_dim] = idx.shape[1]
    return torch.gather(act, pos_dim, idx.to(act.device).reshape(shape).expand(full))


# ---------------------------------------------------------------------------------------- batches

def _batches(data: Tensor | Batch | Iterable[Tensor], batch_size: int) -> tuple[Iterator[Batch], int | None]:
    """Right-padded batches of `data`; and the row count when it is known."""
    if isinstance(data, Tensor):
        data = Batch.of(check_tokens(data))
    if isinstance(data, Batch):
        right = data.right()
        n = right.tokens.shape[0]

        def gen() -> Iterator[Batch]:
            for i in range(0, n, batch_size):
                yield Batch(right.tokens[i: i + batch_size], right.lengths[i: i + batch_size], "right")
        return gen(), n

    def gen_iter() -> Iterator[Batch]:
        for item in data:  # type: ignore[union-attr]
            yield item.right() if isinstance(item, Batch) else Batch.of(check_tokens(item))
    return gen_iter(), None


def _skip_stored(batches: Iterator[Batch], writer: StoreWriter) -> Iterator[Batch]:
    """The batches after the rows `writer` already holds, checking those rows' tokens on the way."""
    left = writer.rows_done
    for b in batches:
        k = min(b.tokens.shape[0], left)
        if k:
            writer.check_rows(b.tokens[:k], b.lengths[:k])
            left -= k
        if k < b.tokens.shape[0]:
            yield Batch(b.tokens[k:], b.lengths[k:], "right")


def store_meta(model: HookedTransformer, hooks: Sequence[str], positions: PositionSpec,
               dtype: torch.dtype | None) -> dict[str, object]:
    """What identifies a store's content besides its tokens (the model's name is kept, not compared)."""
    return {"model": model.cfg.model_name, "weights": weights_fingerprint(model),
            "config": config_fingerprint(model.cfg), "hooks": list(hooks), "positions": _spec_repr(positions),
            "dtype": str(dtype) if dtype else None}


def _stop_layer(model: HookedTransformer, names: Sequence[str]) -> int | None:
    layers = [hook_layer(n) for n in names]
    if any(layer is None and not n.startswith(("hook_embed", "hook_pos_embed", "hook_tokens"))
           for layer, n in zip(layers, names, strict=True)):
        return None  # final-norm or unembed hooks need the whole forward
    top = max((layer for layer in layers if layer is not None), default=-1) + 1
    return top if top < Arch.of(model).n_layers else None


def collect(
    model: HookedTransformer,
    data: Tensor | Batch | Iterable[Tensor],
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
) -> Cache | Store:
    """Cache the requested activations over `data`; in memory, or streamed to `out`.

    Each result tensor is [n_examples, n_positions, *act_shape] (for attention patterns the
    selected axis is the query position). With positions="all" and padded prompts, padding rows
    hold the values computed at pad positions of the right-padded run and should be masked with
    `lengths`; they are returned in the caller's padding layout.

    An existing store at `out` is resumed (or, when complete, reopened) only if it was built from
    the same weights, config, tokens, hooks, positions and dtype; otherwise the error names the
    field that differs. `overwrite=True` replaces it instead.
    """
    names = resolve_hooks(model, hooks, layers)
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if isinstance(data, (Tensor, Batch)):  # validate everything before any file is written
        whole = data.right() if isinstance(data, Batch) else Batch.of(data)
        check_model_tokens(model, whole.tokens)
        select_positions(check_position_spec(positions), whole.lengths, whole.tokens.shape[1])
    stop = _stop_layer(model, names)
    writer: StoreWriter | None = None
    skip = 0
    batches, n_total = _batches(data, batch_size)
    if out is not None:
        writer = StoreWriter(out, store_meta(model, names, positions, dtype), shard_bytes=shard_bytes,
                             resume=resume, overwrite=overwrite)
        skip = writer.rows_done
        batches = _skip_stored(batches, writer)
        if writer.complete:
            log.info("store %s is complete; checking its tokens and reopening it", out)
            if next(batches, None) is not None:  # every stored row's tokens were checked on the way
                raise writer.more_rows_error()
            return writer.close()
    left_batch = data if isinstance(data, Batch) and data.side == "left" else None

    kept: dict[str, list[Tensor]] = {n: [] for n in names}
    all_lengths: list[Tensor] = []
    all_idx: list[Tensor] = []
    done = skip
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("caching", total=n_total, completed=skip)
        for batch in batches:
            toks = check_model_tokens(model, batch.tokens).to(model.cfg.device)
            idx = select_positions(positions, batch.lengths, toks.shape[1], offset=done)
            got: dict[str, Tensor] = {}

            def keep(act: Tensor, *, hook: object, _idx: Tensor | None = idx,
                     _got: dict[str, Tensor] = got) -> None:
                name = hook.name  # type: ignore[attr-defined]
                sel = _gather(act.detach(), _idx, _pos_dim(name))
                _got[name] = sel.to(dtype) if dtype is not None else sel.clone()

            with torch.inference_mode(), model.hooks(fwd_hooks=[(n, keep) for n in names]):
                model(toks, stop_at_layer=stop)
            missing = [n for n in names if n not in got]
            if missing:
                raise HookError(f"hooks: expected every requested hook to fire, got {missing} never firing")
            check_finite_acts(got, done, dtype)
            if writer is not None:
                writer.append(got, batch.lengths, tokens=batch.tokens)
            else:
                for n in names:
                    kept[n].append(got[n])
                all_lengths.append(batch.lengths)
                if idx is not None:
                    all_idx.append(idx)
            done += toks.shape[0]
            bar.update(task, completed=done)
    if writer is not None:
        return writer.close()
    if not all_lengths:
        raise ValueError("collect: expected at least one example in data, got none")
    lengths = torch.cat(all_lengths)
    acts = {n: _cat_ragged(v) for n, v in kept.items()}
    if left_batch is not None and positions == "all":
        acts = {n: left_batch.to_layout(a, _pos_dim(n)) for n, a in acts.items()}
    return Cache(acts, lengths, torch.cat(all_idx) if all_idx else None,
                 meta={"model": model.cfg.model_name, "positions": _spec_repr(positions)})


def _cat_ragged(parts: list[Tensor]) -> Tensor:
    """Concatenate along the batch axis, zero-padding every other axis to the widest part."""
    shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].ndim)]
    out = []
    for p in parts:
        if list(p.shape[1:]) != shape:
            q = p.new_zeros((p.shape[0], *shape))
            q[tuple(slice(0, s) for s in p.shape)] = p
            p = q
        out.append(p)
    return torch.cat(out)


def _spec_repr(spec: PositionSpec) -> str:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Tensor):  # the mask's content, not only its shape and count
        digest = hashlib.sha256(spec.detach().to("cpu", torch.bool).contiguous().numpy().tobytes()).hexdigest()
        return f"mask{tuple(spec.shape)}:{int(spec.sum())}:{digest[:16]}"
    return "idx:" + ",".join(str(int(i)) for i in spec)
