"""Nodes, sites and routes: the vocabulary of the two information highways.

A transformer moves information two ways. The residual stream is vertical: position p at layer l
feeds position p at layer l+1. The K/V stream is horizontal: at layer l, an earlier position i
contributes keys and values that the attention of a later position j reads. A *node* is
(layer, site, position, head); a *route* is a sequence of grid steps, each "up" (residual) or
"right" (K/V).

This module is the only place that turns a node into a TransformerLens hook name (and that names
the few hook points outside the blocks: the embeddings and the final norm).

Two route models are offered (`routes`, `count_routes`):
- ``"lattice"``: unit steps on the layer x position grid, up or right in any order. From
  (l, p) to (l + n, p + m) there are C(m + n, n) of them. This is the schematic picture.
- ``"physical"``: the routes a transformer can realise. Within one layer a position reads
  earlier positions once (its attention), so between consecutive layers a route moves right by
  any amount d >= 0, once. There are C(m + n - 1, n - 1) of these for n >= 1 (m right-moves
  split over n layers), and each names the layers whose attention carries the information
  sideways, which is what path patching and knockout restrict.
"""

from __future__ import annotations

import difflib
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from interp.arch import Arch


class Site(StrEnum):
    """Where in a layer a node sits."""

    RESID_PRE = "resid_pre"
    RESID_MID = "resid_mid"
    RESID_POST = "resid_post"
    ATTN_OUT = "attn_out"
    MLP_OUT = "mlp_out"
    HEAD = "head"  # a head's output before W_O: hook_z, [batch pos head d_head]
    Q = "q"
    K = "k"  # per KV group under grouped-query attention
    V = "v"  # per KV group under grouped-query attention
    PATTERN = "pattern"  # [batch head q_pos k_pos]; pos indexes the query position
    ATTN_SCORES = "attn_scores"  # pre-softmax scores [batch head q_pos k_pos] (attention knockout)
    Q_INPUT = "q_input"  # residual read by a head's query (needs use_split_qkv_input)
    K_INPUT = "k_input"
    V_INPUT = "v_input"

    @property
    def per_head(self) -> bool:
        return self in _HEAD_SITES

    @property
    def per_kv_group(self) -> bool:
        """K and V live on KV groups (== heads when the model is not grouped)."""
        return self in (Site.K, Site.V)


_HEAD_SITES = {Site.HEAD, Site.Q, Site.K, Site.V, Site.PATTERN, Site.ATTN_SCORES, Site.Q_INPUT, Site.K_INPUT,
               Site.V_INPUT}

_HOOK_SUFFIX = {
    Site.RESID_PRE: "hook_resid_pre",
    Site.RESID_MID: "hook_resid_mid",
    Site.RESID_POST: "hook_resid_post",
    Site.ATTN_OUT: "hook_attn_out",
    Site.MLP_OUT: "hook_mlp_out",
    Site.HEAD: "attn.hook_z",
    Site.Q: "attn.hook_q",
    Site.K: "attn.hook_k",
    Site.V: "attn.hook_v",
    Site.PATTERN: "attn.hook_pattern",
    Site.ATTN_SCORES: "attn.hook_attn_scores",
    Site.Q_INPUT: "hook_q_input",
    Site.K_INPUT: "hook_k_input",
    Site.V_INPUT: "hook_v_input",
}
_SUFFIX_SITE = {v: k for k, v in _HOOK_SUFFIX.items()}

# Hook points outside the blocks (no layer, so no Node): named here and nowhere else.
HOOK_EMBED = "hook_embed"
HOOK_POS_EMBED = "hook_pos_embed"
HOOK_TOKENS = "hook_tokens"
EMBED_HOOKS = (HOOK_EMBED, HOOK_POS_EMBED, HOOK_TOKENS)  # before block 0
FINAL_NORM_SCALE = "ln_final.hook_scale"  # the final norm's divisor, [batch pos 1]
FINAL_NORM_OUT = "ln_final.hook_normalized"


def parse_site(site: Site | str) -> Site:
    """A Site from its name, with the valid names in the error."""
    if isinstance(site, Site):
        return site
    try:
        return Site(site)
    except ValueError:
        valid = [s.value for s in Site]
        close = difflib.get_close_matches(str(site), valid, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"site: expected one of {valid}, got {site!r}{hint}") from None


@dataclass(frozen=True)
class Node:
    """A place in the computation: (layer, site, position, head).

    `pos=None` means every position; `head=None` every head. For K/V sites `head` indexes a KV
    group (0 <= head < n_key_value_heads) under grouped-query attention.
    """

    layer: int
    site: Site | str = Site.RESID_PRE
    pos: int | None = None
    head: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "site", parse_site(self.site))
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise TypeError(f"Node.layer: expected int, got {type(self.layer).__name__}")
        for name in ("pos", "head"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise TypeError(f"Node.{name}: expected None or an int, got {type(v).__name__} {v!r}")
        if self.head is not None and not self.site.per_head:  # type: ignore[union-attr]
            raise ValueError(
                f"Node.head: site {self.site.value!r} has no heads, got head={self.head}; "  # type: ignore[union-attr]
                f"per-head sites are {sorted(s.value for s in _HEAD_SITES)}"
            )

    @property
    def hook_name(self) -> str:
        """The TransformerLens hook name of this node."""
        return f"blocks.{self.layer}.{_HOOK_SUFFIX[self.site]}"  # type: ignore[index]

    def validate(self, arch: Arch, seq_len: int | None = None) -> Node:
        """Raise a clear error if this node does not exist in a model of shape `arch`."""
        site: Site = self.site  # type: ignore[assignment]
        if not 0 <= self.layer < arch.n_layers:
            raise ValueError(f"{self}: layer expected in [0, {arch.n_layers}), got {self.layer}")
        if arch.attn_only and site in (Site.RESID_MID, Site.MLP_OUT):
            raise ValueError(f"{self}: site {site.value!r} does not exist in an attention-only model")
        if self.head is not None:
            limit = arch.n_kv_heads if site.per_kv_group else arch.n_heads
            what = "KV group" if site.per_kv_group and arch.grouped else "head"
            if not 0 <= self.head < limit:
                hint = (f"; K/V sites index KV groups (n_key_value_heads={arch.n_kv_heads}), "
                        f"query head h reads group h // {arch.group_size}") if arch.grouped else ""
                raise ValueError(f"{self}: {what} expected in [0, {limit}), got {self.head}{hint}")
        if self.pos is not None and seq_len is not None and not -seq_len <= self.pos < seq_len:
            raise ValueError(f"{self}: position expected in [0, {seq_len}), got {self.pos}")
        return self

    def __str__(self) -> str:
        parts = [f"L{self.layer}", self.site.value]  # type: ignore[union-attr]
        if self.head is not None:
            parts.append(f"H{self.head}")
        if self.pos is not None:
            parts.append(f"@{self.pos}")
        return "Node(" + " ".join(parts) + ")"


def node_from_hook_name(name: str) -> Node:
    """The node of a per-layer TransformerLens hook name (`blocks.L.<suffix>`)."""
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in _SUFFIX_SITE:
        return Node(int(parts[1]), _SUFFIX_SITE[parts[2]])
    raise ValueError(
        f"hook name: expected 'blocks.<layer>.<one of {sorted(_SUFFIX_SITE)}>', got {name!r}"
    )


def site_of(name: str) -> Site | None:
    """The site of a per-layer hook name; None for hooks outside the blocks or without a Site."""
    try:
        return node_from_hook_name(name).site  # type: ignore[return-value]
    except ValueError:
        return None


RESIDUAL_WRITERS = (Site.RESID_PRE, Site.RESID_MID, Site.RESID_POST, Site.ATTN_OUT, Site.MLP_OUT)  # d_model, add to the stream


# ---------------------------------------------------------------- routes on the layer x pos grid

RouteModel = Literal["lattice", "physical"]


@dataclass(frozen=True)
class GridPoint:
    """The residual stream at (layer, pos): layer l means resid_pre of block l (n_layers = final)."""

    layer: int
    pos: int


@dataclass(frozen=True)
class Step:
    """One move of a route. "up": the residual carries it through `layer` at `src_pos`
    (== `dst_pos`). "right": the attention of `layer` at `dst_pos` reads the K/V of `src_pos`."""

    kind: Literal["up", "right"]
    layer: int
    src_pos: int
    dst_pos: int

    @property
    def stream(self) -> Literal["residual", "kv"]:
        return "residual" if self.kind == "up" else "kv"


@dataclass(frozen=True)
class Route:
    """A sequence of steps from `src` to `dst`."""

    src: GridPoint
    dst: GridPoint
    steps: tuple[Step, ...]

    @property
    def signature(self) -> str:
        """Compact form: 'U' for up, 'R' for right (e.g. 'URR')."""
        return "".join("U" if s.kind == "up" else "R" for s in self.steps)

    @property
    def kv_layers(self) -> tuple[int, ...]:
        """Layers whose attention carries the information sideways along this route."""
        return tuple(s.layer for s in self.steps if s.kind == "right")

    @property
    def first_stream(self) -> Literal["residual", "kv"] | None:
        """Which highway the route takes first: residual-first ('up then right') or K/V-first."""
        return self.steps[0].stream if self.steps else None


def _check_grid(src: GridPoint, dst: GridPoint) -> tuple[int, int]:
    n, m = dst.layer - src.layer, dst.pos - src.pos
    if n < 0 or m < 0:
        raise ValueError(
            f"routes: expected dst at or above and right of src (information flows up in layers "
            f"and right in positions), got src={src}, dst={dst}"
        )
    return n, m


def count_routes(src: GridPoint, dst: GridPoint, model: RouteModel = "lattice") -> int:
    """Number of routes from `src` to `dst`; C(m+n, n) on the lattice (n layers up, m right)."""
    n, m = _check_grid(src, dst)
    if model == "lattice":
        return math.comb(m + n, n)
    if model == "physical":
        if n == 0:
            return 1 if m == 0 else 0
        return math.comb(m + n - 1, n - 1)
    raise ValueError(f"route model: expected 'lattice' or 'physical', got {model!r}")


def routes(src: GridPoint, dst: GridPoint, model: RouteModel = "lattice") -> Iterator[Route]:
    """Enumerate the routes from `src` to `dst` (see the module docstring for the two models)."""
    n, m = _check_grid(src, dst)
    if model == "lattice":
        for ups in itertools.combinations(range(n + m), n):
            up_set, steps, layer, pos = set(ups), [], src.layer, src.pos
            for i in range(n + m):
                if i in up_set:
                    steps.append(Step("up", layer, pos, pos))
                    layer += 1
                else:
                    steps.append(Step("right", layer, pos, pos + 1))
                    pos += 1
            yield Route(src, dst, tuple(steps))
    elif model == "physical":
        if n == 0:
            if m == 0:
                yield Route(src, dst, ())
            return
        # weak compositions of m into n parts: the sideways jump made in each layer
        for bars in itertools.combinations(range(m + n - 1), n - 1):
            cuts = (-1, *bars, m + n - 1)
            jumps = [cuts[i + 1] - cuts[i] - 1 for i in range(n)]
            steps, pos = [], src.pos
            for k, d in enumerate(jumps):
                layer = src.layer + k
                if d:
                    steps.append(Step("right", layer, pos, pos + d))
                    pos += d
                else:
                    steps.append(Step("up", layer, pos, pos))
            yield Route(src, dst, tuple(steps))
    else:
        raise ValueError(f"route model: expected 'lattice' or 'physical', got {model!r}")
