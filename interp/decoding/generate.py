"""Generation with interventions: greedy, sampled or forced decoding on padded prompts, KV-cached.

`generate(model, prompts, steps)` appends `steps` tokens to every prompt. Step ``s`` reads the
logits at position ``L_i - 1 + s`` of prompt ``i`` (``L_i`` its length, answers' teacher-forced
tokens included) and writes token ``s`` at position ``L_i + s``.

Padding. Prompts of different lengths are decoded in groups of one length (every row of a group
gains one token per step, so a group never needs padding): each prompt sees exactly what it sees
alone, positions are prompt coordinates, and the rows of the result are the caller's rows.

KV cache. Each group is prefilled once and then runs one position per step with
TransformerLens's key/value cache (`TransformerLensKeyValueCache`, formerly
`HookedTransformerKeyValueCache`); ``cache=False`` recomputes the whole sequence at every step
(the reference the cache is tested against: same tokens, same logits within float32 rounding).
Only a HookedTransformer's forward takes that cache (``past_kv_cache``); a TransformerBridge's
ignores it (TransformerLens's native attention keeps no cache at all), so a Bridge is always
recomputed at every step (exact; `Generation.cached` says which was done).

Interventions (`interp.hooks.Intervention`) are active at every step, with one of two stated
semantics (`where`):

- ``"all"``: every position, prompt and generated, is computed under the interventions, as if the
  whole sequence were recomputed with them at each step. An intervention's `pos` is absolute
  (prompt coordinates; a generated position ``L + s`` may be named); ``pos=None`` is every
  position. Per-example `BlockAttention` (``queries``/``source_mask``) works too.
- ``"new"``: only the positions whose logits choose a token (``L - 1`` and every generated
  position) are computed under the interventions; the earlier prompt positions, and so the K/V
  they leave in the cache, stay clean. Interventions must then have ``pos=None``.

Both are exactly what an uncached recomputation gives under the same rule (each position is
computed once, when it is new). Interventions whose value is a full activation of one run
(`Patch`, `ResampleAblate`) do not fit a one-position step and are refused.

Sampling is seeded per example (row ``i`` draws from a generator seeded with ``(seed, i)``), so a
prompt samples the same tokens alone as in any batch. Temperature divides the logits; top-k and
top-p then restrict the distribution to a face of the simplex (see `interp.decoding.replicator`).
Forced tokens (``force={step: token or [batch] tokens}``, ``-1`` = not forced for that row) replace
the chosen token; the logits at that step are still recorded.

Captures: hooks (Nodes or names) read at the position each step reads (the one whose logits choose
the token), and with ``lens=True`` the logit-lens logits of every lens layer there.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interp.arch import Arch, Model
from interp.graph import Node
from interp.hooks import (
    BlockAttention,
    Capture,
    HookError,
    Intervention,
    Patch,
    ResampleAblate,
    intervene,
    resolve_hooks,
)
from interp.lens.residual import Decoder, compute_dtype, lens_nodes
from interp.prompts import Prompts, as_prompts
from interp.tl import KVCache
from interp.tokens import Batch, Tokenizer, check_model_tokens

Mode = Literal["greedy", "sample"]
Where = Literal["new", "all"]
Force = Mapping[int, int | Sequence[int] | Tensor]


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """How to decode: `mode` greedy (argmax of the raw logits) or sample (temperature, then top-k,
    then top-p); `where` the interventions apply (module doc); `cache` on or off."""

    steps: int
    mode: Mode = "greedy"
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    where: Where = "new"
    cache: bool = True
    lens: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"generate: steps expected an int >= 1, got {self.steps!r}")
        if self.mode not in ("greedy", "sample"):
            raise ValueError(f"generate: mode expected 'greedy' or 'sample', got {self.mode!r}")
        if self.where not in ("new", "all"):
            raise ValueError(f"generate: where expected 'new' or 'all', got {self.where!r}")
        if not self.temperature > 0:
            raise ValueError(f"generate: temperature expected > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"generate: top_k expected None or >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"generate: top_p expected None or in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Generation:
    """Generated tokens and what each step read. Tensors are detached, on the CPU, caller's rows.

    `logits[:, s]` are the raw logits (model dtype promoted to at least float32) token ``s`` was
    chosen from; `logprobs[:, s]` the log-probability of the emitted token under the decoding
    distribution (greedy: the plain softmax); `forced[:, s]` marks forced tokens. `acts[name]` is
    [batch, steps, ...] at each step's read position; `lens_logits` [batch, steps, layer, d_vocab]
    (lens layers as `interp.lens.residual.layer_labels`) when ``lens=True``.
    """

    tokens: Int[Tensor, "batch steps"]
    logits: Float[Tensor, "batch steps d_vocab"]
    logprobs: Float[Tensor, "batch steps"]
    forced: Bool[Tensor, "batch steps"]
    prompts: Prompts
    config: GenerateConfig
    acts: dict[str, Tensor] = field(default_factory=dict)
    lens_logits: Float[Tensor, "batch steps layer d_vocab"] | None = None
    cached: bool = True  # whether steps ran on a K/V cache (False: recomputed; `kv_cache_supported`)

    @property
    def values(self) -> Int[Tensor, "batch steps"]:
        return self.tokens

    def sequences(self) -> Prompts:
        """Prompts + generated tokens as right-padded `Prompts` (no answers)."""
        r = self.prompts.right()
        rows = [torch.cat([r.tokens[i, : int(r.lengths[i])].cpu(), self.tokens[i]]) for i in range(len(r))]
        return as_prompts(Batch.pad(rows, "right"))

    def to_frame(self, tokenizer: Tokenizer | None = None) -> pd.DataFrame:
        """One row per (example, step): token, forced, logprob, entropy of the next-token
        distribution (nats), position (prompt coordinates of the emitted token)."""
        p = torch.log_softmax(self.logits.double(), -1)
        ent = -(p.exp() * p).nan_to_num().sum(-1)
        b, s = self.tokens.shape
        ex = torch.arange(b)[:, None].expand(b, s)
        st = torch.arange(s)[None].expand(b, s)
        frame = pd.DataFrame({
            "example": ex.reshape(-1).numpy(), "step": st.reshape(-1).numpy(),
            "position": (self.prompts.lengths[:, None] + st).reshape(-1).numpy(),
            "token": self.tokens.reshape(-1).numpy(), "forced": self.forced.reshape(-1).numpy(),
            "logprob": self.logprobs.reshape(-1).double().numpy(), "entropy": ent.reshape(-1).numpy()})
        if tokenizer is not None:
            frame["text"] = [tokenizer.decode([t]) for t in frame["token"]]
        return frame


# ------------------------------------------------------------------------------- pure decoding

def restrict(logits: Float[Tensor, "*rest d_vocab"], *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None) -> Float[Tensor, "*rest d_vocab"]:
    """Tempered logits restricted to the top-k / top-p face (the rest set to -inf).

    top-p keeps the smallest prefix of tokens (by probability) whose mass reaches `top_p` (the
    top token always stays); ties at the top-k boundary keep the lower token ids."""
    z = logits / temperature
    if top_k is not None and top_k < z.shape[-1]:
        order = torch.sort(z, dim=-1, descending=True, stable=True).indices
        drop = torch.zeros_like(z, dtype=torch.bool).scatter(-1, order[..., top_k:], True)
        z = z.masked_fill(drop, float("-inf"))
    if top_p is not None and top_p < 1:
        probs = torch.softmax(z.double(), -1)
        sp, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        before = sp.cumsum(-1) - sp  # mass of the tokens ranked above
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


def sample_from(logits: Float[Tensor, "batch d_vocab"], u: Float[Tensor, "batch"]) -> Int[Tensor, "batch"]:
    """Inverse-CDF sampling: the first token whose cumulative probability exceeds `u` in [0, 1)."""
    cdf = torch.softmax(logits.double(), -1).cumsum(-1)
    tok = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None].contiguous(), right=True)[:, 0]
    return tok.clamp_max(logits.shape[-1] - 1)


def _uniforms(rows: Int[Tensor, "batch"], steps: int, seed: int) -> Float[Tensor, "batch steps"]:
    return torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(r)),
                                   dtype=torch.float64) for r in rows])


def uniforms(rows: Int[Tensor, "batch"], steps: int, seed: int) -> Float[Tensor, "batch steps"]:
    """The per-row random streams sampling reads (row stream ``r`` seeded with ``(seed, r)``), in
    [0, 1), float64: so a prompt samples the same tokens alone as in any batch. Shared with
    `interp.rollout`."""
    return _uniforms(rows, steps, seed)


def _forced(force: Force | None, b: int, steps: int, d_vocab: int) -> Int[Tensor, "batch steps"]:
    out = torch.full((b, steps), -1, dtype=torch.long)
    for s, tok in (force or {}).items():
        if not isinstance(s, int) or not 0 <= s < steps:
            raise ValueError(f"generate: force steps expected ints in [0, {steps}), got {s!r}")
        t = torch.as_tensor(tok, dtype=torch.long).cpu()
        t = t.expand(b) if t.ndim == 0 else t
        if t.shape != (b,):
            raise ValueError(f"generate: force[{s}] expected a token or one token per prompt ({b},), got {tuple(t.shape)}")
        if bool(((t < -1) | (t >= d_vocab)).any()):
            raise ValueError(f"generate: force[{s}] expected token ids in [0, {d_vocab}) or -1 (not forced), "
                             f"got {t.tolist()}")
        out[:, s] = t
    return out


# -------------------------------------------------------------------------------- interventions

def _check_interventions(interventions: Sequence[Intervention], where: Where) -> None:
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise HookError(f"generate: interventions expected Intervention objects, got {type(iv).__name__}")
        if isinstance(iv, (Patch, ResampleAblate)):
            raise HookError(f"generate: {type(iv).__name__} expected a source for a fixed sequence, got a "
                            f"growing one; use Set/Add/Map with a value per position instead")
        per_example = isinstance(iv, BlockAttention) and iv.queries is not None
        pos = iv.pos if iv.pos is not None else (iv.where.pos if isinstance(iv.where, Node) else None)
        if where == "new" and (pos is not None or per_example):
            raise HookError(f"generate: where='new' expected interventions with pos=None (they apply to each "
                            f"new position), got {type(iv).__name__} at pos={pos}; use where='all' for fixed positions")
        items = () if pos is None else (pos if isinstance(pos, Sequence) else (pos,))
        if any(int(p) < 0 for p in items):
            raise HookError(f"generate: intervention positions expected >= 0 (prompt coordinates), got {pos}")


def _window(interventions: Sequence[Intervention], start: int, n: int, first_new: int, where: Where,
            rows: Tensor) -> list[Intervention]:
    """The interventions for a forward over absolute positions [start, start + n) of a group."""
    out: list[Intervention] = []
    for iv in interventions:
        if isinstance(iv, BlockAttention) and iv.queries is not None:
            out.append(dataclasses.replace(iv, queries=iv.queries[rows] - start,
                                           source_mask=iv.source_mask[rows, : start + n]))
            continue
        pos = iv.pos if iv.pos is not None else (iv.where.pos if isinstance(iv.where, Node) else None)
        if where == "new":
            lo = max(start, first_new)
            if lo >= start + n:
                continue
            rel = tuple(range(lo - start, n))
        elif pos is None:
            out.append(iv)
            continue
        else:
            items = pos if isinstance(pos, Sequence) else (pos,)
            rel = tuple(int(p) - start for p in items if start <= int(p) < start + n)
            if not rel:
                continue
        w = dataclasses.replace(iv.where, pos=None) if isinstance(iv.where, Node) else iv.where
        out.append(dataclasses.replace(iv, where=w, pos=rel))
    return out


# ---------------------------------------------------------------------------------------- driver

def generate(
    model: Model,
    prompts: Prompts | Batch | Tensor,
    steps: int,
    *,
    mode: Mode = "greedy",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    force: Force | None = None,
    interventions: Sequence[Intervention] = (),
    where: Where = "new",
    captures: Sequence[str | Node] = (),
    lens: bool = False,
    cache: bool = True,
    sample_rows: Sequence[int] | Tensor | None = None,
) -> Generation:
    """Decode `steps` tokens after each prompt (module doc: padding, cache, interventions).

    `sample_rows`: the random stream of each row (default: its row index), so a prompt run alone
    with ``sample_rows=[i]`` samples what row i of a batch samples."""
    cfg = GenerateConfig(steps=steps, mode=mode, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                         where=where, cache=cache, lens=lens)
    p = as_prompts(prompts)
    r = p.right()
    check_model_tokens(model, r.tokens, "prompts.tokens")
    arch = Arch.of(model)
    lengths = r.lengths
    if int(lengths.max()) + steps > arch.n_ctx:
        raise ValueError(f"generate: expected prompt length + steps <= n_ctx = {arch.n_ctx}, got "
                         f"{int(lengths.max())} + {steps}; generate fewer steps")
    interventions = tuple(interventions)
    _check_interventions(interventions, where)
    b = len(r)
    forced = _forced(force, b, steps, arch.d_vocab)
    streams = torch.arange(b) if sample_rows is None else torch.as_tensor(sample_rows, dtype=torch.long).cpu()
    if streams.shape != (b,):
        raise ValueError(f"generate: sample_rows expected one stream id per prompt ({b},), got {tuple(streams.shape)}")
    u = _uniforms(streams, steps, seed) if mode == "sample" else None
    cap_names = resolve_hooks(model, list(captures)) if captures else []
    lens_names = [n.hook_name for n in lens_nodes(arch.n_layers)] if lens else []
    decoder = Decoder(model, compute_dtype(next(model.parameters()).dtype)) if lens else None
    out_tok = torch.empty(b, steps, dtype=torch.long)
    out_logits = torch.empty(b, steps, arch.d_vocab, dtype=torch.float64)
    out_lp = torch.empty(b, steps, dtype=torch.float64)
    acts: dict[str, list] = {n: [None] * b for n in cap_names}
    lens_out = [None] * b if lens else None
    for length in torch.unique(lengths).tolist():
        rows = torch.nonzero(lengths == length)[:, 0]
        toks, lg, lp, a, lz = _decode_group(model, r.tokens[rows, :length], rows, cfg, forced[rows],
                                            None if u is None else u[rows], interventions, cap_names, lens_names,
                                            decoder)
        out_tok[rows], out_logits[rows], out_lp[rows] = toks, lg, lp
        for j, i in enumerate(rows.tolist()):
            for n in cap_names:
                acts[n][i] = a[n][j]
            if lens_out is not None:
                lens_out[i] = lz[j]
    dt = compute_dtype(next(model.parameters()).dtype)
    return Generation(out_tok, out_logits.to(dt), out_lp, forced >= 0, p, cfg,
                      {n: torch.stack(v) for n, v in acts.items()},
                      torch.stack(lens_out) if lens_out is not None else None,
                      cached=cfg.cache and kv_cache_supported(model))


def kv_cache_supported(model: Model) -> bool:
    """Whether the model's forward takes TransformerLens's key/value cache (``past_kv_cache``): a
    HookedTransformer's does; a TransformerBridge's takes the argument nowhere (on TransformerLens
    3.9 and 4 it reaches the Hugging Face model, which ignores it), so a Bridge is recomputed."""
    try:
        return "past_kv_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - an uninspectable forward
        return False


def _decode_group(model: Model, toks: Tensor, rows: Tensor, cfg: GenerateConfig, forced: Tensor,
                  u: Tensor | None, interventions: tuple[Intervention, ...], cap_names: list[str],
                  lens_names: list[str], decoder: Decoder | None
                  ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor], Tensor | None]:
    """Decode one group of prompts of the same length (no padding)."""
    device = next(model.parameters()).device
    g, length = toks.shape
    seq = toks.to(device)
    kv = KVCache.init_cache(model.cfg, device, g) if cfg.cache and kv_cache_supported(model) else None
    tok_steps, logit_steps, lp_steps = [], [], []
    cap_steps: dict[str, list[Tensor]] = {n: [] for n in cap_names + lens_names}
    with torch.inference_mode():
        for s in range(cfg.steps):
            start = 0 if kv is None or s == 0 else length + s - 1
            inp = seq[:, start:]
            n = inp.shape[1]
            ivs = _window(interventions, start, n, length - 1, cfg.where, rows)
            index = torch.full((g, 1), n - 1, dtype=torch.long)
            caps = [Capture(name, index) for name in cap_names + lens_names]
            with intervene(model, ivs, capture=caps) as run:
                logits = (model(inp, past_kv_cache=kv, attention_mask=torch.ones_like(inp)) if kv is not None
                          else model(inp))
            last = logits[:, -1].double()
            if cfg.mode == "greedy":
                z = last
                chosen = last.argmax(-1)
            else:
                z = restrict(last, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
                chosen = sample_from(z, u[:, s].to(device))  # type: ignore[index]
            f = forced[:, s].to(device)
            chosen = torch.where(f >= 0, f, chosen)
            lp = torch.log_softmax(z, -1).gather(1, chosen[:, None])[:, 0]
            seq = torch.cat([seq, chosen[:, None]], 1)
            tok_steps.append(chosen.cpu())
            logit_steps.append(last.cpu())
            lp_steps.append(lp.cpu())
            for name in cap_names + lens_names:
                cap_steps[name].append(run.captured[name][:, 0].detach())
    acts = {n: torch.stack(cap_steps[n], 1).cpu() for n in cap_names}
    lz = None
    if decoder is not None:
        resid = torch.stack([torch.stack(cap_steps[n], 1) for n in lens_names], 2)  # [g, steps, layer, d_model]
        with torch.inference_mode():
            lz = decoder(resid).cpu()
    return torch.stack(tok_steps, 1), torch.stack(logit_steps, 1), torch.stack(lp_steps, 1), acts, lz

