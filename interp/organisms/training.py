"""CPU training for the organisms: a fused forward pass over a HookedTransformer's own weights.

A `HookedTransformer` forward pays for einsum attention and hook plumbing (about 3x a plain matmul
budget on CPU). `fast_forward` computes the same function from the same parameter tensors with
plain matmuls and `F.scaled_dot_product_attention` (the fused attention of FlashAttention, Dao et
al. 2022), so training updates the HookedTransformer directly and there is no weight conversion:
the shipped checkpoint *is* the trained model. `tests/test_organisms.py` checks that both forwards
agree to 1e-4 for every organism family (LN / none, learned / rotary / NoPE, attn-only / MLP).

Supported configs: causal attention, `normalization_type` in {"LN", None}, positional embedding
"standard" (learned, or a frozen zero table for NoPE) or "rotary", MLP activations relu/gelu,
no grouped-query attention. `fast_forward` raises on anything else rather than computing a
different function.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.graph import Node, Site
from interp.models import new_model
from interp.tl import HookedTransformer, HookedTransformerConfig, is_native

log = logging.getLogger(__name__)

IGNORE = -100
"""Target id that contributes no loss (cross-entropy `ignore_index`)."""

Sampler = Callable[[int, torch.Generator], tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]]
"""(step, generator) -> (tokens, targets); targets hold the next-token id or IGNORE."""


def _check_supported(cfg: HookedTransformerConfig) -> None:
    problems = []
    if cfg.normalization_type not in ("LN", None):
        problems.append(f"normalization_type={cfg.normalization_type!r} (want 'LN' or None)")
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        problems.append(f"positional_embedding_type={cfg.positional_embedding_type!r}")
    if not cfg.attn_only and (cfg.act_fn not in ("relu", "gelu") or cfg.gated_mlp):
        problems.append(f"act_fn={cfg.act_fn!r}, gated_mlp={cfg.gated_mlp} (want relu/gelu, ungated)")
    if cfg.n_key_value_heads not in (None, cfg.n_heads):
        problems.append(f"n_key_value_heads={cfg.n_key_value_heads}")
    if cfg.attention_dir != "causal" or cfg.scale_attn_by_inverse_layer_idx or not cfg.use_attn_scale:
        problems.append("non-default attention (direction / scaling)")
    if problems:
        raise ValueError("fast_forward: expected an organism-style config, got " + "; ".join(problems))


def _norm(owner: torch.nn.Module, name: str, x: Tensor, cfg: HookedTransformerConfig) -> Tensor:
    if cfg.normalization_type is None:
        return x
    ln = getattr(owner, name)
    if not hasattr(ln, "w"):  # TL 4's native model: a torch LayerNorm behind the bridge
        ln = ln.original_component
        return F.layer_norm(x, (cfg.d_model,), ln.weight, ln.bias, ln.eps)
    return F.layer_norm(x, (cfg.d_model,), ln.w, ln.b, cfg.eps)


def _named_parameters(model: HookedTransformer) -> dict[str, torch.nn.Parameter]:
    """The model's parameters by name; on TL 4's native model the embedding tables under their
    HookedTransformer names (``embed.W_E``, ``pos_embed.W_pos``: what callers freeze by name)."""
    alias: dict[int, str] = {}
    if is_native(model):
        alias[id(model.embed.W_E)] = "embed.W_E"
        if model.cfg.positional_embedding_type == "standard":
            alias[id(model.pos_embed.W_pos)] = "pos_embed.W_pos"
    return {alias.get(id(p), n): p for n, p in model.named_parameters()}


def _linear(bridge: torch.nn.Module) -> torch.nn.Linear:
    """The torch Linear behind a native model's LinearBridge."""
    return bridge.original_component


def _native_residual(model: HookedTransformer, tokens: Tensor, W_E: Tensor | None,
                     capture: dict[tuple[int, int], Tensor] | None) -> Tensor:
    """`_residual` on TransformerLens 4's native model (what the organisms load as there): the same
    computation from its nn.Linear weights, its own rotary (adjacent pairs) and attention scale."""
    n = tokens.shape[1]
    x = (model.embed.W_E if W_E is None else W_E)[tokens]
    if model.cfg.positional_embedding_type == "standard":
        x = x + model.pos_embed.W_pos[:n]
    return _native_blocks(model, x, capture)


def native_final_hidden(model: HookedTransformer, x: Float[Tensor, "batch pos d_model"]
                        ) -> Float[Tensor, "batch pos d_model"]:
    """The final-norm output of TL 4's native model from input embeddings `x` (learned positions
    not yet added), with the fused attention of `fast_forward` (differentiable)."""
    _check_supported(model.cfg)
    if model.cfg.positional_embedding_type == "standard":
        x = x + model.pos_embed.W_pos[:x.shape[1]]
    return _norm(model, "ln_final", _native_blocks(model, x, None), model.cfg)


def _native_blocks(model: HookedTransformer, x: Tensor, capture: dict[tuple[int, int], Tensor] | None) -> Tensor:
    """The blocks of TL 4's native model on the residual `x` (`_native_residual`)."""
    cfg = model.cfg
    batch, n = x.shape[0], x.shape[1]
    heads, d_head = cfg.n_heads, cfg.d_head
    for layer, block in enumerate(model.blocks):
        native = block.attn.original_component
        h = _norm(block, "ln1", x, cfg)
        lins = [_linear(getattr(block.attn, s)) for s in ("q", "k", "v")]
        qkv = F.linear(h, torch.cat([lin.weight for lin in lins]), torch.cat([lin.bias for lin in lins]))
        q, k, v = qkv.view(batch, n, 3 * heads, d_head).transpose(1, 2).split(heads, dim=1)  # [batch, head, pos, d]
        if native.rotary is not None:
            q, k = native.rotary.apply_rope(q, k)
        scale = 1.0 / float(native.scale)
        if capture is not None:
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            for (cl, ch) in capture:
                if cl == layer:
                    scores = torch.einsum("bqd,bkd->bqk", q[:, ch], k[:, ch]) * scale
                    capture[(cl, ch)] = scores.masked_fill(~causal, float("-inf")).log_softmax(-1)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        o = _linear(block.attn.o)
        x = x + F.linear(z.transpose(1, 2).reshape(batch, n, heads * d_head), o.weight, o.bias)
        if not cfg.attn_only:
            h = _norm(block, "ln2", x, cfg)
            act = F.gelu if cfg.act_fn == "gelu" else F.relu
            mlp = block.mlp.original_component
            fc_in, fc_out = _linear(mlp.fc_in), _linear(mlp.fc_out)
            x = x + F.linear(act(F.linear(h, fc_in.weight, fc_in.bias)), fc_out.weight, fc_out.bias)
    return x


def _residual(model: HookedTransformer, tokens: Tensor, W_E: Tensor | None,
              capture: dict[tuple[int, int], Tensor] | None) -> Tensor:
    """The final residual stream; fills `capture[(layer, head)]` with that head's attention
    log-probabilities [batch, q_pos, k_pos] when asked (computed explicitly, not fused)."""
    cfg = model.cfg
    _check_supported(cfg)
    if is_native(model):
        return _native_residual(model, tokens, W_E, capture)
    batch, n = tokens.shape
    x = (model.embed.W_E if W_E is None else W_E)[tokens]
    if cfg.positional_embedding_type == "standard":
        x = x + model.pos_embed.W_pos[:n]
    rotary = cfg.positional_embedding_type == "rotary"
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        h = _norm(block, "ln1", x, cfg)
        heads, d_head = cfg.n_heads, cfg.d_head
        w_qkv = torch.cat([attn.W_Q, attn.W_K, attn.W_V], dim=0)  # [3h, d_model, d_head]
        w_qkv = w_qkv.permute(1, 0, 2).reshape(cfg.d_model, 3 * heads * d_head)
        b_qkv = torch.cat([attn.b_Q, attn.b_K, attn.b_V], dim=0).reshape(-1)
        qkv = (h @ w_qkv + b_qkv).view(batch, n, 3 * heads, d_head)
        q, k, v = qkv.split(heads, dim=2)  # each [batch, pos, head, d_head]
        if rotary:
            q = attn.apply_rotary(q, 0, None)
            k = attn.apply_rotary(k, 0, None)
        scale = 1.0 / float(attn.attn_scale)
        if capture is not None:
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            for (cl, ch) in capture:
                if cl == layer:
                    scores = torch.einsum("bqd,bkd->bqk", q[:, :, ch], k[:, :, ch]) * scale
                    capture[(cl, ch)] = scores.masked_fill(~causal, float("-inf")).log_softmax(-1)
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale)
        z = z.transpose(1, 2).reshape(batch, n, heads * d_head)
        x = x + z @ attn.W_O.reshape(heads * d_head, cfg.d_model) + attn.b_O
        if not cfg.attn_only:
            h = _norm(block, "ln2", x, cfg)
            act = F.gelu if cfg.act_fn == "gelu" else F.relu
            x = x + act(h @ block.mlp.W_in + block.mlp.b_in) @ block.mlp.W_out + block.mlp.b_out
    return x


def fast_forward(model: HookedTransformer, tokens: Int[Tensor, "batch pos"],
                 W_E: Float[Tensor, "d_vocab d_model"] | None = None,
                 where: Bool[Tensor, "batch pos"] | None = None) -> Float[Tensor, "..."]:
    """The logits of `model(tokens)`, computed with fused attention from the same parameters.

    Differentiable, so it is the training forward; it reads (never copies) the model's weights.
    `W_E` replaces the embedding table (for a structured parameterisation during training).
    With `where`, only the logits at those positions are computed: shape [n_selected, d_vocab].
    """
    x = _residual(model, tokens, W_E, None)
    if where is not None:
        x = x[where.to(x.device)]
    x = _norm(model, "ln_final", x, model.cfg)
    return x @ model.unembed.W_U + model.unembed.b_U


def attention_logprobs(model: HookedTransformer, tokens: Int[Tensor, "batch pos"],
                       heads: Sequence[tuple[int, int]]) -> dict[tuple[int, int], Tensor]:
    """Differentiable attention log-probabilities [batch, q_pos, k_pos] of the (layer, head)s
    asked for (used to seed a known circuit during training; see `induction`)."""
    capture: dict[tuple[int, int], Tensor] = {tuple(h): torch.empty(0) for h in heads}  # type: ignore[misc]
    _residual(model, tokens, None, capture)
    return capture


def init_model(cfg: HookedTransformerConfig, seed: int) -> HookedTransformer:
    """A fresh model whose initial weights depend only on `seed` (global RNG state is restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = new_model(cfg)
    return model


class PairEmbedding(torch.nn.Module):
    """Training-time embedding table for vocabularies with one token per (x, y) pair.

    Rows ``[0, n_plain)`` are free; the row of pair (x, y) is ``n_plain + n_y * x + y`` and
    equals ``first[x] + second[y]``. Calling the module returns the full table, which `fit`
    writes into ``W_E`` at the end, so the trained HookedTransformer is exact and ordinary.
    """

    def __init__(self, base: Float[Tensor, "n_plain d_model"], n_x: int, n_y: int, std: float,
                 seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = base.shape[1]
        self.base = torch.nn.Parameter(base.detach().clone())
        self.first = torch.nn.Parameter(torch.randn(n_x, d, generator=g) * std / 2**0.5)
        self.second = torch.nn.Parameter(torch.randn(n_y, d, generator=g) * std / 2**0.5)

    def forward(self) -> Float[Tensor, "d_vocab d_model"]:
        pairs = (self.first[:, None, :] + self.second[None, :, :]).reshape(-1, self.base.shape[1])
        return torch.cat([self.base, pairs], dim=0)


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Use `n` intra-op CPU threads inside the block, restoring the previous count after."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimiser settings: AdamW, linear warm-up then cosine decay to `final_lr_frac` * lr."""

    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    final_lr_frac: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    threads: int | None = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"TrainConfig.steps: expected >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr: expected > 0, got {self.lr}")
        if self.warmup < 0 or not 0 <= self.final_lr_frac <= 1:
            raise ValueError(f"TrainConfig: expected warmup >= 0 and final_lr_frac in [0, 1], got "
                             f"{self.warmup}, {self.final_lr_frac}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        frac = (step - self.warmup) / max(1, self.steps - self.warmup)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return self.lr * (self.final_lr_frac + (1 - self.final_lr_frac) * cos)


@dataclass(frozen=True)
class TrainLog:
    """Per-step training loss (nats, mean over non-ignored targets) and the wall time in seconds."""

    loss: tuple[float, ...]
    seconds: float
    steps: int
    seed: int
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def values(self) -> Tensor:
        return torch.tensor(self.loss)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"step": range(len(self.loss)), "loss": self.loss})

    def plot(self):  # -> plotly Figure
        from interp.viz import curves

        return curves(self.to_frame(), x="step", y="loss")

    def summary(self, every: int = 50) -> dict[str, object]:
        """JSON-safe record for a manifest: loss averaged over windows of `every` steps."""
        t = self.values
        windows = [float(t[i:i + every].mean()) for i in range(0, len(t), every)]
        return {"steps": self.steps, "seed": self.seed, "seconds": round(self.seconds, 2),
                "loss_every": every, "loss": [round(w, 5) for w in windows], **self.extra}


def fit(
    model: HookedTransformer,
    sample: Sampler,
    config: TrainConfig,
    *,
    frozen: Sequence[str] = (),
    embedding: tuple[Callable[[], Tensor], Sequence[Tensor]] | None = None,
    aux: Callable[[HookedTransformer, Tensor, int], Tensor] | None = None,
    progress: bool = True,
    desc: str = "train",
    stop: Callable[[HookedTransformer, int], bool] | None = None,
) -> TrainLog:
    """Train `model` in place on batches from `sample` with the fused forward; returns the loss log.

    `frozen` names parameters (e.g. ``"pos_embed.W_pos"`` for NoPE) kept at their initial value.
    `embedding` = (build, params): train `params` instead of ``W_E``, with the table given by
    ``build()``; at the end ``W_E`` is overwritten with ``build()``, so the model is exact.
    `aux(model, tokens, step)` adds an auxiliary loss term (not included in the logged loss).
    `stop(model, steps_done)` is called after every step; returning True ends training there
    (early stopping: keep it cheap or check only every k steps; it runs under inference mode).
    Deterministic given the model's initial weights, `config.seed` and the thread count.
    """
    names = _named_parameters(model)
    unknown = [f for f in frozen if f not in names]
    if unknown:
        raise ValueError(f"fit(frozen=...): expected parameter names of the model, got {unknown}")
    if embedding is not None:
        frozen = (*frozen, "embed.W_E")
    params = [p for n, p in names.items() if n not in frozen]
    if embedding is not None:
        params += list(embedding[1])
    was = {n: p.requires_grad for n, p in names.items()}
    for n in frozen:
        names[n].requires_grad_(False)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=config.betas)
    gen = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    model.train()
    start = time.perf_counter()
    with num_threads(config.threads):
        bar = tqdm(range(config.steps), desc=desc, disable=not progress, mininterval=1.0)
        for step in bar:
            tokens, targets = sample(step, gen)
            tokens = tokens.to(model.cfg.device)
            targets = targets.to(model.cfg.device)
            for group in opt.param_groups:
                group["lr"] = config.lr_at(step)
            where = targets != IGNORE
            logits = fast_forward(model, tokens, None if embedding is None else embedding[0](), where)
            loss = F.cross_entropy(logits.float(), targets[where])
            total = loss if aux is None else loss + aux(model, tokens, step)
            opt.zero_grad(set_to_none=True)
            total.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
            if step % 50 == 0 or step == config.steps - 1:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
                log.debug("%s step %d loss %.4f", desc, step, losses[-1])
            if stop is not None:
                model.eval()
                with torch.inference_mode():
                    done = stop(model, step + 1)
                model.train()
                if done:
                    break
    seconds = time.perf_counter() - start
    if embedding is not None:
        with torch.no_grad():
            model.embed.W_E.copy_(embedding[0]())
    model.eval()
    for n, p in names.items():
        p.requires_grad_(was[n])
    return TrainLog(loss=tuple(losses), seconds=seconds, steps=len(losses), seed=config.seed)


@torch.inference_mode()
def last_logits(model: HookedTransformer, tokens: Int[Tensor, "n pos"], *, batch_size: int = 128
                ) -> Float[Tensor, "n d_vocab"]:
    """The HookedTransformer's logits at the last position only (unembedding one position keeps
    memory small for long contexts and large vocabularies)."""
    out = []
    for i in range(0, tokens.shape[0], batch_size):
        chunk = tokens[i:i + batch_size].to(model.cfg.device)
        name = Node(model.cfg.n_layers - 1, Site.RESID_POST).hook_name
        _, cache = model.run_with_cache(chunk, names_filter=name)
        resid = cache[name][:, -1:]
        if model.cfg.normalization_type is not None:
            resid = model.ln_final(resid)
        out.append(model.unembed(resid)[:, 0])
    return torch.cat(out)


@torch.inference_mode()
def logits_in_batches(model: HookedTransformer, tokens: Int[Tensor, "n pos"], *, batch_size: int = 256,
                      fast: bool = False) -> Float[Tensor, "n pos d_vocab"]:
    """Logits of `model` on many examples, in batches (the HookedTransformer forward unless `fast`)."""
    out = []
    for i in range(0, tokens.shape[0], batch_size):
        chunk = tokens[i:i + batch_size].to(model.cfg.device)
        out.append(fast_forward(model, chunk) if fast else model(chunk))
    return torch.cat(out)
