"""Per-architecture facts in one table, read once from a HookedTransformer's config.

Every module that needs n_layers, n_heads, n_key_value_heads, d_head or the positional scheme
asks `Arch.of(model)` instead of poking at `model.cfg` with per-family `if` ladders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from interp.tl import HookedTransformer, HookedTransformerConfig

Positional = Literal["learned", "rotary", "none", "shortformer", "alibi"]


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

    @property
    def grouped(self) -> bool:
        """True for grouped-query attention (K/V shared by groups of query heads)."""
        return self.n_kv_heads < self.n_heads

    @property
    def group_size(self) -> int:
        """Query heads per KV group."""
        return self.n_heads // self.n_kv_heads

    def kv_group(self, head: int) -> int:
        """The KV group that query head `head` reads."""
        return head // self.group_size

    @staticmethod
    def of(model: HookedTransformer | HookedTransformerConfig) -> Arch:
        cfg = model.cfg if isinstance(model, HookedTransformer) else model
        n_kv = cfg.n_key_value_heads or cfg.n_heads
        scheme = cfg.positional_embedding_type
        positional: Positional
        if scheme == "standard":
            # A NoPE organism is a learned-position model whose position table is frozen at 0;
            # it records that in its config's `original_architecture`.
            nope = (cfg.original_architecture or "").endswith("NoPE")
            positional = "none" if nope else "learned"
        else:
            positional = scheme  # type: ignore[assignment]
        return Arch(
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            n_kv_heads=n_kv,
            d_model=cfg.d_model,
            d_head=cfg.d_head,
            d_vocab=cfg.d_vocab,
            n_ctx=cfg.n_ctx,
            attn_only=cfg.attn_only,
            normalization=cfg.normalization_type,
            positional=positional,
            gated_mlp=bool(cfg.gated_mlp),
        )
