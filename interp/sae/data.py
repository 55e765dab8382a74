"""Activation batches for SAE training and evaluation: from a model and tokens, or from a store.

sae-lens's `SAETrainer` consumes any iterator of activation batches ([batch, d_in] tensors of a
fixed size). `ActivationBatches` turns a re-iterable source of activation chunks (a model run in
chunks over a token tensor, a toolkit cache/store's ``iter_batches``, or plain tensors) into that
iterator: it fills a buffer, shuffles it with an explicit seed, and yields fixed-size batches,
cycling through the source for as many epochs as the trainer asks for.

Memory: the buffer holds `buffer_size` activation vectors (default 64 batches).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from interp.cache import collect
from interp.graph import Node
from interp.hooks import resolve_hook
from interp.prompts import Prompts, as_prompts
from interp.tl import HookedTransformer
from interp.tokens import Batch, check_tokens

ChunkSource = Callable[[], Iterable[Tensor]]
Positions = str | list[int] | Tensor


def hook_name_of(model: HookedTransformer, hook: str | Node) -> str:
    """The TransformerLens hook name of `hook`, validated against `model` (closest names on error)."""
    return resolve_hook(model, hook)


def as_batch(tokens: Tensor | Batch | Prompts, d_vocab: int | None = None) -> Prompts:
    """Right-padded `Prompts` from `Prompts`, a padded `Batch` or a token tensor (unpadded prompts)."""
    if not isinstance(tokens, Batch):
        check_tokens(tokens, d_vocab)
    return as_prompts(tokens).right()


def chunks(prompts: Prompts, batch_size: int) -> Iterator[tuple[slice, Prompts]]:
    """(rows, prompts of those rows) of at most `batch_size` prompts, same width and side."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    n = len(prompts)
    for start in range(0, n, batch_size):
        sl = slice(start, min(n, start + batch_size))
        yield sl, prompts if sl == slice(0, n) else prompts.rows(sl)


def position_mask(batch: Batch, positions: Positions = "all") -> Bool[Tensor, "batch pos"]:
    """Bool [batch, pos]: which (real, right-padded) positions an SAE reads.

    `positions`: "all" real positions, "last" (each prompt's last token), a span name of
    `Prompts` (every token of that span), a list of position indices (negative ones count from
    each prompt's end), or a bool mask over positions.
    """
    batch = batch.right()  # the layout the toolkit computes on (= prompt coordinates)
    real = batch.mask
    n, width = batch.tokens.shape
    if isinstance(positions, str):
        if positions == "all":
            return real
        if isinstance(batch, Prompts):
            try:
                return batch.span_mask(positions, width).to(real.device) & real
            except KeyError as e:
                raise ValueError(f"positions: expected 'all' or a named position of the prompts "
                                 f"{sorted(batch.names)}, got {positions!r}") from e
        if positions == "last":
            out = torch.zeros_like(real)
            out[torch.arange(n), batch.lengths - 1] = True
            return out
        raise ValueError(f"positions: expected 'all', 'last', a list of ints or a bool mask, got {positions!r}; "
                         f"span names need Prompts")
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        if positions.shape not in ((width,), (n, width)):
            raise ValueError(f"positions mask: expected shape ({width},) or ({n}, {width}), got "
                             f"{tuple(positions.shape)}")
        return real & positions.to(real.device).expand(n, width)
    out = torch.zeros_like(real)
    for p in list(positions):
        idx = torch.where(torch.tensor(p) < 0, batch.lengths + p, torch.full_like(batch.lengths, p))
        if bool(((idx < 0) | (idx >= batch.lengths)).any()):
            raise ValueError(f"positions: expected indices within every prompt's length "
                             f"(min length {int(batch.lengths.min())}), got {p}")
        out[torch.arange(n), idx] = True
    return out


def collect_activations(
    model: HookedTransformer,
    prompts: Tensor | Batch | Prompts,
    hook: str | Node,
    *,
    positions: Positions = "all",
    batch_size: int = 64,
) -> Float[Tensor, "n_act d_in"]:
    """The activations at `hook` for the selected real positions, one row per token.

    Cached with `interp.cache.collect`; pad positions are dropped; rows in prompt order, then
    position order.
    """
    name = hook_name_of(model, hook)
    batch = as_batch(prompts, model.cfg.d_vocab)
    mask = position_mask(batch, positions)
    cache = collect(model, batch, hooks=[name], positions="all", batch_size=batch_size, progress=False)
    act = cache[name]
    if act.ndim != 3:
        raise ValueError(f"SAE hook {name}: expected activations of shape (batch, pos, d_in), got "
                         f"{tuple(act.shape)}; per-head hooks are not supported, use a residual, "
                         f"attn_out or mlp_out hook")
    return act[mask.to(act.device)]


class ActivationBatches(Iterator[Tensor]):
    """Shuffled fixed-size activation batches, cycling through a re-iterable source (for SAETrainer).

    `source` is called once per epoch and returns an iterable of activation chunks whose last
    axis is d_in (any leading axes are flattened).
    """

    def __init__(self, source: ChunkSource, batch_size: int, *, buffer_batches: int = 64,
                 seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"ActivationBatches.batch_size: expected >= 1, got {batch_size}")
        self.source = source
        self.batch_size = batch_size
        self.buffer_size = batch_size * max(1, buffer_batches)
        self.generator = torch.Generator().manual_seed(seed)
        self._chunks: Iterator[Tensor] = iter(())
        self._buffer: Tensor | None = None
        self._out: list[Tensor] = []
        self.epochs = 0

    def _next_chunk(self) -> Tensor:
        for _ in range(2):
            for chunk in self._chunks:
                if chunk.numel():
                    return chunk.reshape(-1, chunk.shape[-1])
            self._chunks = iter(self.source())
            self.epochs += 1
        raise ValueError("activation source: expected at least one activation vector, got an empty source")

    def _refill(self) -> None:
        parts = [] if self._buffer is None else [self._buffer]
        have = sum(p.shape[0] for p in parts)
        while have < self.buffer_size:
            chunk = self._next_chunk()
            parts.append(chunk)
            have += chunk.shape[0]
        buf = torch.cat(parts)
        perm = torch.randperm(buf.shape[0], generator=self.generator).to(buf.device)
        buf = buf[perm]
        n_out = buf.shape[0] // self.batch_size
        self._out = list(buf[: n_out * self.batch_size].split(self.batch_size))
        self._buffer = buf[n_out * self.batch_size:]

    def __iter__(self) -> ActivationBatches:
        return self

    def __next__(self) -> Tensor:
        if not self._out:
            self._refill()
        return self._out.pop()


def source_of(data: Any, *, hook: str | None = None, batch_size: int = 1024) -> ChunkSource:
    """A re-iterable chunk source from a tensor, a list of tensors, or a cache/store.

    A store/cache is anything with ``iter_batches(name, batch_size, shuffle=..., seed=...)``
    (interp.cache.Cache / interp.store.Store); `hook` names the activation to read.
    """
    if isinstance(data, Tensor):
        return lambda: data.split(batch_size)
    if hasattr(data, "iter_batches"):
        names = list(getattr(data, "hook_names", []))
        if hook is None:
            if len(names) != 1:
                raise ValueError(f"activation store: expected a hook name to read (store holds {names}), got None")
            hook = names[0]
        return lambda: data.iter_batches(hook, batch_size)
    if isinstance(data, (list, tuple)) and all(isinstance(t, Tensor) for t in data):
        return lambda: iter(data)
    raise TypeError(f"activation source: expected a Tensor, a list of Tensors or a store with iter_batches, "
                    f"got {type(data).__name__}")
