"""The model adapter: one interface to both model kinds the toolkit runs.

TransformerLens 3 offers two model classes: `HookedTransformer` (TransformerLens's own
re-implementation; the organisms are these) and `TransformerBridge` (a wrapper around the native
Hugging Face model, with the legacy hook names such as ``blocks.0.hook_resid_pre`` kept as
aliases; the only model class left in TransformerLens 4). Every fact a method needs about a model
(`Arch.of(model)`: layers, heads, KV groups, d_head, positional scheme, norms, ...) and every
operation that differs between the two kinds (running from layer l on a frozen prefix, unembedding
a residual, embedding tokens, the device, dtype and tokenizer) live here, so no other module tests
`isinstance` or reads a `cfg` field one kind lacks.

Partial forwards: a HookedTransformer runs ``model(resid, start_at_layer=l)``. A Bridge cannot
(its blocks are Hugging Face decoder layers driven by the HF model's own loop, which needs the
rotary cos/sin, the causal mask and the position ids), so `block_inputs` records, during a full
forward, the keyword arguments the HF model passes to each block, and `forward_from` calls the
blocks l.. with those (repeated over the stacked copies). This is exact: the blocks see the
same inputs as in the full forward (checked bit for bit in tests/test_bridge.py). With
``block_inputs(model, kv=True)`` each layer's keys and values are recorded as the attention used
them (after rotary and any QK-norm; through a recording ``layer_past`` that returns them
unchanged), and `forward_from(..., p0=p)` computes positions p.. only, the earlier ones read from
that record (the engine's prefix skipping, as on a HookedTransformer with its K/V cache).
`forward_packed` runs several copies that start at different positions in one pass, laid end
to end along the position axis: each packed query reads the recorded keys before its copy's
first position and its own copy's after, through a packed attention mask (`Packing.mask`, built
from each block's recorded mask; `can_pack`). Where the HF model acts between its blocks (a
block's input is not the previous block's output), replaying blocks is not exact:
`BlockInputs.chained` is False and `forward_from` reruns the recorded tokens whole under the
same hooks (``path="hooks"`` in the patching results).

On a Bridge the legacy hook names (``blocks.0.attn.hook_z``) are aliases: the `hook.name` a hook
function receives is the canonical one (``blocks.0.attn.o.hook_in``), so hooks here bind names in
closures. Masked attention scores hold the dtype's minimum, not -inf.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

# interp.tl gives both names on every TransformerLens version (on TL 4 `HookedTransformer` is the
# stand-in type every TransformerBridge passes).
from interp.native_attn import attach_hooks
from interp.tl import HookedTransformer, TransformerBridge

Model: TypeAlias = HookedTransformer | TransformerBridge  # type: ignore[valid-type]
# Either model kind: public signatures take a `Model`.

Positional = Literal["learned", "rotary", "none", "shortformer", "alibi"]
Kind = Literal["hooked", "bridge"]


def is_bridge(model: object) -> bool:
    """Whether `model` is a TransformerBridge (the Hugging Face wrapper)."""
    return isinstance(model, TransformerBridge)


def kind_of(model: object) -> Kind:
    """``"bridge"`` for a TransformerBridge, ``"hooked"`` for a HookedTransformer."""
    if is_bridge(model):
        return "bridge"
    if isinstance(model, HookedTransformer):
        return "hooked"
    raise TypeError(f"model: expected a transformer_lens HookedTransformer or TransformerBridge, got "
                    f"{type(model).__name__}; load one with interp.load_model")


@dataclass(frozen=True, kw_only=True)
class Arch:
    """The shape facts of a model: what every node-addressing function validates against."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_vocab: int
    n_ctx: int
    attn_only: bool
    normalization: str | None
    positional: Positional
    gated_mlp: bool
    kind: Kind = "hooked"
    parallel: bool = False  # attention and MLP read the same residual (GPT-NeoX, GPT-J)
    final_norm: bool = True  # a norm (with a hook_scale) before the unembedding
    softcap: float | None = None  # output logits soft cap (Gemma 2), None: none
    kv_per_head: bool = False  # K/V hooks hold one entry per query head (ungrouped GQA)
    rotary_dim: int | None = None  # dimensions rotated per head (partial rotary), None: no rotary
    name: str = "model"

    @property
    def grouped(self) -> bool:
        """True for grouped-query attention (K/V shared by groups of query heads)."""
        return self.n_kv_heads < self.n_heads

    @property
    def group_size(self) -> int:
        """Query heads per KV group."""
        return self.n_heads // self.n_kv_heads

    @property
    def kv_hook_heads(self) -> int:
        """The size of the head axis of the K/V hooks (KV groups, or heads when ungrouped)."""
        return self.n_heads if self.kv_per_head else self.n_kv_heads

    def kv_group(self, head: int) -> int:
        """The KV group that query head `head` reads."""
        return head // self.group_size

    @staticmethod
    def of(model: Any) -> Arch:
        """The facts of a HookedTransformer, a TransformerBridge or a HookedTransformerConfig."""
        bridge = is_bridge(model)
        cfg = getattr(model, "cfg", model)
        n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        scheme = cfg.positional_embedding_type
        positional: Positional
        if scheme == "standard":
            # A NoPE organism is a learned-position model whose position table is frozen at 0;
            # it records that in its config's `original_architecture`.
            nope = (getattr(cfg, "original_architecture", None) or "").endswith("NoPE")
            positional = "none" if nope else "learned"
        else:
            positional = scheme  # type: ignore[assignment]
        cap = getattr(cfg, "output_logits_soft_cap", None)
        rot = getattr(cfg, "rotary_dim", None) if positional == "rotary" else None
        return Arch(
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            n_kv_heads=n_kv,
            d_model=cfg.d_model,
            d_head=cfg.d_head,
            d_vocab=cfg.d_vocab,
            n_ctx=cfg.n_ctx,
            attn_only=bool(cfg.attn_only),
            normalization=cfg.normalization_type,
            positional=positional,
            gated_mlp=bool(cfg.gated_mlp),
            kind="bridge" if bridge else "hooked",
            parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
            final_norm=cfg.normalization_type is not None,
            softcap=float(cap) if cap is not None and cap > 0 else None,
            kv_per_head=bool(getattr(cfg, "ungroup_grouped_query_attention", False)) and not bridge,
            rotary_dim=int(rot or cfg.d_head) if positional == "rotary" else None,
            name=str(getattr(cfg, "model_name", None) or "model"),
        )


# --------------------------------------------------------------------------- device, dtype, names

def device_of(model: Model) -> torch.device:
    """The device of the model's weights (where its inputs must go)."""
    return next(model.parameters()).device


def dtype_of(model: Model) -> torch.dtype:
    """The dtype of the model's floating-point weights (its compute dtype)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def model_name(model: Model) -> str:
    """The model's name (TransformerLens name, HF path or organism name)."""
    return Arch.of(model).name


def tokenizer_of(model: Model) -> Any | None:
    """The model's own tokenizer (a Hugging Face tokenizer), or None."""
    return getattr(model, "tokenizer", None)


def config_of(model: Model) -> Any:
    """The model's config object (HookedTransformerConfig or TransformerBridgeConfig): for
    fingerprints and manifests only; methods read `Arch.of(model)`."""
    return model.cfg


# --------------------------------------------------------------------------------------- weights

def W_E(model: Model) -> Float[Tensor, "d_vocab d_model"]:
    """The token embedding matrix."""
    return model.W_E


def W_U(model: Model) -> Float[Tensor, "d_model d_vocab"]:
    """The unembedding matrix."""
    return model.W_U


def b_U(model: Model) -> Float[Tensor, "d_vocab"] | None:
    """The unembedding bias (None when the model has none)."""
    b = getattr(model, "b_U", None)
    return b if isinstance(b, Tensor) else None


def W_O(model: Model, layer: int) -> Float[Tensor, "head d_head d_model"]:
    """Layer `layer`'s output projection, per head."""
    return model.blocks[layer].attn.W_O


def post_attn_norm(model: Model, layer: int) -> torch.nn.Module | None:
    """The norm applied to block `layer`'s attention output before it joins the residual
    (Gemma 2's sandwich norms), or None: then a head's residual contribution is linear in its z."""
    blk = model.blocks[layer]
    if is_bridge(model):
        return getattr(blk, "ln1_post", None)
    return getattr(blk, "ln1_post", None) if getattr(model.cfg, "use_normalization_before_and_after", False) else None


def heads_out(model: Model, layer: int, z: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos d_model"]:
    """What block `layer`'s attention adds to the residual for head outputs `z` (hook_z values):
    W_O, b_O and, where the model has one, the post-attention norm (`post_attn_norm`)."""
    out = torch.einsum("bphd,hdm->bpm", z, W_O(model, layer).to(z.dtype))
    b = getattr(model.blocks[layer].attn, "b_O", None)
    if isinstance(b, Tensor):
        out = out + b.to(out.dtype)
    norm = post_attn_norm(model, layer)
    return norm(out) if norm is not None else out


def qkv_weights(model: Model, layer: int, site: str) -> tuple[Tensor, Tensor | None]:
    """The (weight [head, d_model, d_head], bias [head, d_head] or None) that turn layer `layer`'s
    normalised residual into its queries (``site="q"``), keys or values; K/V on the axis of the
    K/V hooks (KV groups under grouped-query attention, unless the model ungroups them)."""
    attn = model.blocks[layer].attn
    arch = Arch.of(model)
    s = site.upper()
    if s not in ("Q", "K", "V"):
        raise ValueError(f"qkv site: expected 'q', 'k' or 'v', got {site!r}")
    if s != "Q" and arch.kind == "hooked" and hasattr(attn, f"_W_{s}") and not arch.kv_per_head:
        w, b = getattr(attn, f"_W_{s}"), getattr(attn, f"_b_{s}")
    else:
        w, b = getattr(attn, f"W_{s}"), getattr(attn, f"b_{s}", None)
    return w, b if isinstance(b, Tensor) else None


def norm_in(model: Model, layer: int, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
    """Block `layer`'s attention-input norm (ln1) applied to a residual."""
    return model.blocks[layer].ln1(resid)


def attn_input(model: Model, layer: int, resid: Float[Tensor, "batch pos d_model"], site: str
               ) -> Float[Tensor, "batch pos head d_head"]:
    """The queries / keys / values (pre-rotary, as the q/k/v hooks hold them) that block `layer`
    computes from the residual `resid` (its resid_pre)."""
    x = norm_in(model, layer, resid)
    w, b = qkv_weights(model, layer, site)
    out = torch.einsum("bpm,hmd->bphd", x, w.to(x.dtype))
    return out + b.to(out.dtype) if b is not None else out


# --------------------------------------------------------------------------------- embed / unembed

def embed(model: Model, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
    """Token embeddings (what ``hook_embed`` holds: no position embedding)."""
    return model.embed(tokens.to(device_of(model)))


def gather_positions(x: Float[Tensor, "rows pos d"], index: Int[Tensor, "rows k"] | None
                     ) -> Float[Tensor, "rows k d"]:
    """Each row's positions `index` of `x` (None: all of them)."""
    if index is None:
        return x
    return x.gather(1, index.to(x.device)[..., None].expand(-1, -1, x.shape[-1]))


def unembed(model: Model, resid: Float[Tensor, "rows pos d_model"],
            index: Int[Tensor, "rows k"] | None = None) -> Float[Tensor, "rows k d_vocab"]:
    """Logits of a final residual: final norm + W_U (+ b_U) + the output soft cap, at each row's
    `index` positions only (None: all). The final norm is per position, so gathering first is exact."""
    resid = gather_positions(resid, index)
    if is_bridge(model):
        return model.adapter.apply_output_logits_transform(model.unembed(model.ln_final(resid)))
    from interp.tl import apply_softcap

    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    # TransformerLens's Unembed copies W_U.T into a contiguous tensor on every call (d_model x
    # d_vocab: 154 MB for GPT-2, about a third of a small sweep's time); a transposed view is free
    logits = F.linear(resid, model.unembed.W_U.T, model.unembed.b_U)
    return apply_softcap(logits, model.cfg.output_logits_soft_cap)


# ----------------------------------------------------------------------------- partial forwards

_DROP = frozenset({"cache", "past_key_values", "past_key_value", "layer_past"})


# Block inputs that carry a position axis, and which axis: sliced when a replay starts at p0 > 0
_POS_AXIS = {"position_ids": -1, "cache_position": -1}


class _KV:
    """A duck-typed Hugging Face cache handed to the Bridge's attention as ``layer_past``.

    Recording (`frozen` None): `update` keeps each layer's keys/values exactly as the attention
    uses them (after rotary / QK-norm, [batch, kv_head, pos, d_head]) and returns them unchanged.
    Replaying: `update` puts the recorded positions < p0 before the computed ones."""

    def __init__(self, frozen: dict[int, tuple[Tensor, Tensor]] | None = None) -> None:
        self.frozen = frozen
        self.seen: dict[int, tuple[Tensor, Tensor]] = {}

    def update(self, k: Tensor, v: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self.frozen is None:
            self.seen[layer_idx] = (k, v)
            return k, v
        # a replay's cache serves one block: its own entry, whatever index its attention uses
        pk, pv = self.frozen[layer_idx] if layer_idx in self.frozen else next(iter(self.frozen.values()))
        return torch.cat([pk.to(k.dtype), k], dim=-2), torch.cat([pv.to(v.dtype), v], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:  # asked by some HF code paths
        return 0 if self.frozen is None else int(self.frozen[layer_idx][0].shape[-2])


@dataclass
class BlockInputs:
    """The keyword arguments each block received in a full forward (Bridge only; empty for a
    HookedTransformer), that forward's batch size and width, and (with ``kv=True``) each layer's
    keys and values as its attention used them: what `forward_from` replays."""

    batch: int = 0
    kwargs: dict[int, dict[str, Any]] = field(default_factory=dict)
    width: int = 0
    kv: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    # whether each block's input was the previous block's output (the HF loop does nothing between
    # blocks): only then is replaying blocks l.. exact; else `forward_from` reruns `tokens` whole
    chained: bool = True
    tokens: Tensor | None = None
    # each block's input hidden state in the recorded forward (its resid_pre, before any hook on it)
    hidden: dict[int, Tensor] = field(default_factory=dict)

    @property
    def path(self) -> Literal["partial", "hooks"]:
        """How `forward_from` runs a Bridge from a middle layer: ``"partial"`` (replaying blocks l..)
        or ``"hooks"`` (the whole forward on the recorded tokens, under the same hooks)."""
        return "partial" if self.chained else "hooks"

    def can_skip(self, n_layers: int) -> bool:
        """Whether a replay may start at a position p0 > 0: every layer's keys/values recorded in
        the expected layout and every positional input of a known kind (else positions are never skipped)."""
        if not self.chained or self.batch < 1 or len(self.kv) < n_layers or len(self.kwargs) < n_layers:
            return False
        for layer in range(n_layers):
            k, v = self.kv[layer]
            if k.ndim != 4 or k.shape[-2] != self.width or v.shape[-2] != self.width or k.shape[0] != self.batch:
                return False
            for name, x in self.kwargs[layer].items():
                if name == "position_embeddings":
                    if not (isinstance(x, tuple) and all(isinstance(t, Tensor) and t.ndim == 3
                                                          and t.shape[1] == self.width for t in x)):
                        return False
                elif name == "attention_mask":
                    if x is not None and not (isinstance(x, Tensor) and x.ndim == 4 and x.shape[-2] == self.width):
                        return False
                elif name in _POS_AXIS:
                    if not (isinstance(x, Tensor) and x.shape[-1] == self.width):
                        return False
                elif isinstance(x, (Tensor, tuple, list, dict)):
                    return False  # an input of unknown layout: never sliced, so never skipped
        return True


def can_pack(model: Model, inputs: BlockInputs | None) -> bool:
    """Whether copies of a Bridge that start at different positions can share one replay
    (`forward_packed`, which rewrites each block's attention mask): `can_skip_prefix`, and at
    every layer the attention mask recorded as a 4D tensor, or none recorded where the HF block
    takes an ``attention_mask`` argument and its attention is causal (the Bridge's attention then
    builds a plain causal mask itself, which the packed replay passes explicitly instead)."""
    if inputs is None or not is_bridge(model) or not can_skip_prefix(model, inputs):
        return False
    for layer, blk in enumerate(model.blocks):
        mask = inputs.kwargs[layer].get("attention_mask")
        if isinstance(mask, Tensor):
            continue
        hf = getattr(blk, "original_component", None)
        attn = getattr(blk, "attn", None)
        try:
            takes = "attention_mask" in inspect.signature(hf.forward).parameters  # type: ignore[union-attr]
        except (TypeError, ValueError, AttributeError):
            takes = False
        if mask is not None or not takes or not getattr(attn, "is_causal", False) or getattr(attn, "is_cross_attention", False):
            return False
    return True


def _slice_inputs(kwargs: dict[str, Any], p0: int) -> dict[str, Any]:
    """Block inputs for query positions p0.. (keys still cover every position)."""
    out = dict(kwargs)
    for name, x in kwargs.items():
        if name == "position_embeddings":
            out[name] = tuple(t[:, p0:] for t in x)
        elif name == "attention_mask" and x is not None:
            out[name] = x[..., p0:, :]
        elif name in _POS_AXIS:
            out[name] = x[..., p0:]
    return out


@dataclass(frozen=True)
class Packing:
    """Copies laid end to end along the position axis: copy c computes positions firsts[c]..
    (the earlier ones are the base run's, read from its recorded keys and values). `pos` [n]
    is each packed row's position in the prompt and `copy` [n] its copy."""

    firsts: tuple[int, ...]
    width: int
    pos: Tensor
    copy: Tensor

    @staticmethod
    def of(firsts: Sequence[int], width: int, device: torch.device | str = "cpu") -> Packing:
        bad = [f for f in firsts if not 0 <= f < width]
        if not firsts or bad:
            raise ValueError(f"packed copies: expected first positions in [0, {width}), got {list(firsts)}")
        pos = torch.cat([torch.arange(f, width) for f in firsts])
        copy = torch.cat([torch.full((width - f,), c) for c, f in enumerate(firsts)])
        return Packing(tuple(int(f) for f in firsts), width, pos.to(device), copy.to(device))

    @property
    def n(self) -> int:
        """Packed rows (positions computed, over all copies)."""
        return int(self.pos.shape[0])

    @property
    def offsets(self) -> list[int]:
        """Where each copy's rows begin."""
        out, o = [], 0
        for f in self.firsts:
            out.append(o)
            o += self.width - f
        return out

    def pack(self, x: Tensor, copy_axis: bool = False) -> Tensor:
        """[batch, width, ...] (or, with `copy_axis`, [copies or 1, batch, width, ...]) -> [batch, n, ...]."""
        if not copy_axis:
            return x.index_select(1, self.pos.to(x.device))
        if x.shape[0] == 1:
            return x[0].index_select(1, self.pos.to(x.device))
        return torch.cat([x[c, :, f:] for c, f in enumerate(self.firsts)], dim=1)

    def rows(self, index: Int[Tensor, "batch k"]) -> Int[Tensor, "copies batch k"]:
        """The packed rows of each copy's positions `index` (prompt coordinates, >= its first)."""
        off = torch.tensor([o - f for o, f in zip(self.offsets, self.firsts, strict=True)], device=index.device)
        return index[None] + off[:, None, None]

    def mask(self, rec: Tensor) -> Tensor:
        """The packed attention mask from the recorded one ([b, 1, width, width], additive or
        boolean): packed query (c, q) sees the base run's key j < firsts[c] and its own copy's
        keys j >= firsts[c], each where the recorded mask lets q see j; keys are [the base run's
        width positions, then the n packed ones] ([b, 1, n, width + n])."""
        pos, copy = self.pos.to(rec.device), self.copy.to(rec.device)
        first = torch.tensor(self.firsts, device=rec.device)[copy]  # [n]
        rows = rec.index_select(-2, pos)  # [b, 1, n, width]
        base_ok = torch.arange(self.width, device=rec.device)[None] < first[:, None]  # [n, width]
        own_ok = copy[:, None] == copy[None]  # [n, n]
        off = False if rec.dtype == torch.bool else torch.finfo(rec.dtype).min
        base = rows.masked_fill(~base_ok, off)
        own = rows.index_select(-1, pos).masked_fill(~own_ok, off)
        return torch.cat([base, own], dim=-1)

    def inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A block's recorded inputs for the packed rows (positional inputs gathered, mask packed;
        with no mask recorded, the plain causal one packed: see `can_pack`)."""
        out = dict(kwargs)
        if kwargs.get("attention_mask") is None:
            causal = torch.ones(self.width, self.width, dtype=torch.bool, device=self.pos.device).tril()
            out["attention_mask"] = self.mask(causal[None, None])
        for name, x in kwargs.items():
            if name == "position_embeddings":
                out[name] = tuple(t.index_select(1, self.pos.to(t.device)) for t in x)
            elif name == "attention_mask":
                out[name] = self.mask(x)
            elif name in _POS_AXIS:
                out[name] = x.index_select(x.ndim - 1, self.pos.to(x.device))
        return out


@contextmanager
def block_inputs(model: Model, *, kv: bool = False) -> Iterator[BlockInputs]:
    """Record, for the forwards run in the block, the keyword arguments every block receives
    (rotary cos/sin, causal mask, position ids) and, with `kv`, every layer's keys and values as
    its attention used them (through a recording ``layer_past`` that changes nothing). A no-op on
    a HookedTransformer. The forward pre-hooks are removed in `finally`."""
    rec = BlockInputs()
    if not is_bridge(model):
        yield rec
        return
    handles = []
    recorder = _KV() if kv else None
    ins: dict[int, Tensor] = {}
    outs: dict[int, Tensor] = {}

    def post(layer: int):
        def fn(module: torch.nn.Module, args: tuple, output: Any) -> None:
            outs[layer] = output[0] if isinstance(output, tuple) else output
        return fn

    def grab(layer: int):
        def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            ins[layer] = hidden
            rec.batch, rec.width = int(hidden.shape[0]), int(hidden.shape[1])
            kept = {k: v for k, v in kwargs.items() if k not in _DROP and k != "hidden_states"}
            if "use_cache" in kept:
                kept["use_cache"] = False  # replays must not append to (or need) a K/V cache
            rec.kwargs[layer] = kept
            if recorder is not None:  # (GPT-NeoX's own cache argument is `layer_past` too: record instead)
                return args, {**kwargs, "layer_past": recorder}
            return None
        return pre

    try:
        for i, blk in enumerate(model.blocks):
            handles.append(blk.register_forward_pre_hook(grab(i), with_kwargs=True))
            handles.append(blk.register_forward_hook(post(i)))
        yield rec
    finally:
        for h in handles:
            h.remove()
    if recorder is not None:
        rec.kv = dict(recorder.seen)
    rec.chained = _chained(ins, outs)
    rec.hidden = dict(ins)


def _chained(ins: dict[int, Tensor], outs: dict[int, Tensor]) -> bool:
    """Whether every block's input was the previous block's output, unchanged."""
    for layer in sorted(ins)[1:]:
        prev = outs.get(layer - 1)
        x = ins[layer]
        if prev is None or not (prev is x or (prev.shape == x.shape and torch.equal(prev, x))):
            return False
    return True


def _repeat(x: Any, batch: int, k: int) -> Any:
    """`x` with every tensor whose first axis is the batch repeated `k` times along it."""
    if isinstance(x, Tensor):
        return x.repeat(k, *([1] * (x.ndim - 1))) if x.ndim and x.shape[0] == batch and batch > 1 else x
    if isinstance(x, tuple):
        return tuple(_repeat(v, batch, k) for v in x)
    if isinstance(x, list):
        return [_repeat(v, batch, k) for v in x]
    if isinstance(x, dict):
        return {key: _repeat(v, batch, k) for key, v in x.items()}
    return x


def can_start_mid(model: Model) -> bool:
    """Whether `forward_from` can run this model from a middle layer."""
    return Arch.of(model).positional != "shortformer"


def can_skip_prefix(model: Model, inputs: BlockInputs | None = None) -> bool:
    """Whether positions before every patch can be fed from a K/V cache of the base run.

    HookedTransformer: needs the cached keys to be exactly the hook_k/hook_v values (no QK-norm
    or clipping between them and the cache) and causal attention whose positions come from the
    residual or rotary. Bridge: needs the base run's `inputs` recorded with ``kv=True`` in a
    layout `BlockInputs.can_skip` knows (the keys/values are then the attention's own, after
    rotary and any QK-norm).
    """
    if is_bridge(model):
        return (inputs is not None and Arch.of(model).positional in ("rotary", "learned", "none")
                and inputs.can_skip(Arch.of(model).n_layers))
    cfg = model.cfg
    return (cfg.positional_embedding_type in ("standard", "rotary")
            and cfg.attention_dir == "causal"
            and not getattr(cfg, "use_qk_norm", False)
            and getattr(cfg, "clip_qkv", None) is None
            and not getattr(cfg, "use_logn_attn", False)
            and cfg.n_devices == 1)


def forward_packed(model: Model, resid: Float[Tensor, "batch n d_model"], start: int, packing: Packing,
                   index: Int[Tensor, "batch k"], *, inputs: BlockInputs, hooks: Sequence[tuple[str, Any]] = (),
                   logits: bool = True) -> Float[Tensor, "rows k d_vocab"] | Float[Tensor, "rows k d_model"]:
    """Run blocks start.. of a Bridge on several copies of the recorded batch laid end to end
    (`packing`: copy c holds positions firsts[c]..; `resid` is layer `start`'s resid_pre in that
    layout, hooks see that layout) and unembed each copy's positions `index` (prompt coordinates);
    rows of the result are copy-major (copy c, example b at c * batch + b), as in `forward_from`.

    One pass computes what `forward_from(..., p0=firsts[c])` computes per copy, and nothing
    more: each packed query reads the base run's recorded keys/values before its copy's first
    position and its own copy's after (a packed attention mask, `Packing.mask`). Needs
    `can_pack(model, inputs)`. ``logits=False``: the final residual at those positions instead (to
    unembed later, several passes' rows at once)."""
    arch = Arch.of(model)
    if not can_pack(model, inputs):
        raise ValueError("forward_packed: expected a Bridge's block inputs recorded with kv=True and an attention "
                         "mask every block can take (interp.arch.can_pack), got inputs that cannot be packed")
    if tuple(resid.shape[:2]) != (inputs.batch, packing.n):
        raise ValueError(f"forward_packed: expected resid of shape (batch={inputs.batch}, n={packing.n}, d_model), "
                         f"got {tuple(resid.shape)}")
    if index.ndim != 2 or index.shape[0] != inputs.batch or index.numel() == 0 or not (
            max(packing.firsts) <= int(index.min()) and int(index.max()) < packing.width):
        raise ValueError(f"forward_packed: expected a [batch={inputs.batch}, k] index of positions in "
                         f"[{max(packing.firsts)}, {packing.width}) (every copy computes them), got "
                         f"{index.tolist() if index.numel() <= 16 else tuple(index.shape)}")
    with torch.inference_mode(), attach_hooks(model, hooks):
        x = resid
        for layer in range(start, arch.n_layers):
            kw = packing.inputs(inputs.kwargs[layer])
            kw["layer_past"] = _KV({layer: inputs.kv[layer]})
            out = model.blocks[layer](x, **kw)
            x = out[0] if isinstance(out, tuple) else out
        rows = packing.rows(index.to(x.device))  # [copies, batch, k]
        k = rows.shape[0]
        picked = gather_positions(x, rows.permute(1, 0, 2).reshape(x.shape[0], -1))
        picked = picked.reshape(x.shape[0], k, index.shape[1], -1).transpose(0, 1).reshape(k * x.shape[0], index.shape[1], -1)
        return unembed(model, picked) if logits else picked


def forward_from(model: Model, resid: Float[Tensor, "rows pos d_model"], start: int, *,
                 index: Int[Tensor, "rows k"] | None = None, hooks: Sequence[tuple[str, Any]] = (),
                 inputs: BlockInputs | None = None, past_kv: object = None, p0: int = 0, logits: bool = True,
                 ) -> Float[Tensor, "rows k d_vocab"] | Float[Tensor, "rows k d_model"]:
    """Run blocks start.. on `resid` (layer `start`'s resid_pre) under `hooks` and unembed at
    each row's `index` (None: every position; positions count from p0). ``logits=False``: the
    final residual at those positions, not unembedded (not on a Bridge whose blocks are not chained).

    A Bridge needs `inputs` (recorded by `block_inputs` on a forward of `inputs.batch` prompts of
    the same width); `resid` may stack several copies of that batch (rows = copies x batch).
    With `p0` > 0 `resid` holds positions p0.. only and the earlier positions' keys/values come
    from the recorded run (Bridge: `inputs` recorded with ``kv=True``; HookedTransformer: a frozen
    TransformerLens K/V cache in `past_kv`).
    """
    arch = Arch.of(model)
    with torch.inference_mode(), attach_hooks(model, hooks):
        if arch.kind == "hooked":
            out = model(resid, start_at_layer=start, stop_at_layer=arch.n_layers, past_kv_cache=past_kv)
            return unembed(model, out, index) if logits else gather_positions(out, index)
        if past_kv is not None:
            raise ValueError("forward_from: expected no K/V cache on a TransformerBridge, got one")
        if inputs is None or inputs.batch < 1:
            raise ValueError("forward_from on a TransformerBridge: expected the block inputs of a full forward "
                             "(interp.arch.block_inputs), got none")
        if resid.shape[0] % inputs.batch:
            raise ValueError(f"forward_from: expected rows a multiple of the recorded batch {inputs.batch}, "
                             f"got {resid.shape[0]}")
        k = resid.shape[0] // inputs.batch
        if not inputs.chained:
            # the HF model does something between its blocks: rerun the whole forward on the
            # recorded tokens under the same hooks (edits sit at layers >= start, so the layers
            # below recompute the recorded resid exactly)
            if inputs.tokens is None or p0 or not logits:
                raise ValueError("forward_from on a TransformerBridge whose blocks are not chained: expected the "
                                 "recorded tokens, p0=0 and logits, got " + (f"p0={p0}" if p0 else "logits=False"
                                                                              if inputs.tokens is not None else "no tokens"))
            return gather_positions(model(inputs.tokens.repeat(k, 1)), index)
        if p0 and not can_skip_prefix(model, inputs):
            raise ValueError(f"forward_from: expected p0=0 on this Bridge (its block inputs do not allow "
                             f"skipping positions), got p0={p0}")
        x = resid
        for layer in range(start, arch.n_layers):
            kw = _repeat(inputs.kwargs[layer], inputs.batch, k)
            if p0:
                pk, pv = inputs.kv[layer]
                kw = {**_slice_inputs(kw, p0), "layer_past": _KV({layer: (
                    pk[..., :p0, :].repeat(k, 1, 1, 1), pv[..., :p0, :].repeat(k, 1, 1, 1))})}
            out = model.blocks[layer](x, **kw)
            x = out[0] if isinstance(out, tuple) else out
        return unembed(model, x, index) if logits else gather_positions(x, index)
