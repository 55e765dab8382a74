"""Rollouts: continue prompts by feeding back tokens, soft embeddings or hidden states.

A model that samples a token throws away the rest of its distribution at every step. Three ways
to continue a prompt for `steps` steps (`rollout(model, prompts, steps, mode=...)`):

- ``"token"``: the next input is the embedding of a token, greedy (argmax of the raw logits) or
  sampled (temperature, then top-k, then top-p; per-row seeded streams: `interp.decoding`'s
  sampling, so it equals `interp.decoding.generate`);
- ``"soft"`` (soft thinking): the next input is the probability-weighted sum of the input
  embeddings, ``sum_v p(v) W_E[v]``, with p the softmax of the tempered, top-k / top-p restricted
  logits. A one-hot p (top_k=1, or temperature -> 0) gives exactly the token rollout;
- ``"hidden"`` (Coconut, Hao et al. 2024): the next input is the last layer's hidden state at the
  position that was read, optionally through a learned projection `proj`. ``hidden="post_norm"``
  (default) is the final norm's *output* (what the unembedding reads: the "last hidden state"
  of Hugging Face models, which Coconut feeds back); ``"pre_norm"`` is the last block's
  ``hook_resid_post``.

Where a continuous input enters. It replaces the token embedding at ``hook_embed`` (the output of
``W_E`` lookup, before positional embeddings): learned-position models still add their position
embedding at that position, rotary models rotate queries and keys by it as usual. The sequence a
rollout builds is right-padded `Prompts` (`Rollout.sequence`): the prompt's tokens, then one
position per step whose token is that step's argmax (a placeholder for soft and hidden inputs,
whose embedding is overridden). Every instrument runs on it with `Rollout.edits()` (one
`interp.hooks.SetAt` at ``hook_embed`` per step): `Rollout.run` (captures, edits),
`Rollout.collect` (`interp.cache.collect`), `thought_lens`, `patch` (the patching engine), probes
on `Rollout.rows`.

Coordinates. Step ``s`` reads the logits at position ``L_i - 1 + s`` of prompt ``i`` (``L_i`` its
length, every real token) and writes its input at position ``L_i + s`` (prompt coordinates: a
padded row continues right after its own last real token). The sequence names the spans
``thought`` (every step), ``thought_i`` (step i), ``prompt_last`` (the prompt's last token);
``last`` is the last step's position, whose logits are `Rollout.final_logits`.

Computation. Prompts are decoded in groups of one length (so a row sees exactly what it sees
alone); each group is prefilled once and then runs one position per step with TransformerLens's
key/value cache; ``cache=False`` recomputes the whole sequence at every step through
`interp.hooks.run` (the exact reference the cache is tested against). The two model-kind
specific operations are isolated: `embedding_matrix` (the ``W_E`` lookup table), and
`forward_cached` / `kv_cache_supported` / `final_norm` (running one cached step, and whether the
model can; the final norm's output). A model whose forward takes no ``past_kv_cache`` (e.g. a
TransformerBridge) is recomputed at every step.

Training through continuous thoughts (Coconut's curriculum): ``ro = rollout(model, prompts, k,
mode="hidden", grad=True).with_suffix([end_of_thought], answers=...)``, then
``out = ro.run(model, grad=True)``; a loss on ``out.logits`` read at ``ro.sequence``'s answer
positions backpropagates through every thought (tested against a finite difference).

Caveat: a model that was never trained on continuous inputs was never taught to read them. Soft
and hidden rollouts of such a model are exploratory: a hidden state is not in the distribution
of input embeddings (its norm alone can differ by orders of magnitude), and what the model makes
of it says little about latent reasoning. Use an organism trained with continuous thoughts for
claims.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.arch import Arch
from interp.cache import Cache, collect
from interp.cache import rows as cache_rows
from interp.decoding.generate import kv_cache_supported, restrict, sample_from, uniforms
from interp.graph import HOOK_EMBED, Node, Site
from interp.hooks import Capture, Intervention, RunOutput, Set, SetAt, intervene, resolve_hooks, run
from interp.lens.residual import Decoder, lens_nodes
from interp.metrics import Metric
from interp.native_attn import attach_hooks
from interp.patching.engine import (
    DEFAULT_ROWS,
    At,
    Direction,
    Place,
    check_direction,
    check_prompts,
    cross_edit,
    named_only,
    node_edit,
    prepare,
    run_copies,
    validate_node,
)
from interp.patching.results import PatchResult, detach
from interp.patching.sweep import as_places, index_axis, position_axis
from interp.prompts import ANSWER, LAST, Prompts, as_prompts
from interp.tl import HookedTransformer
from interp.tokens import Batch, Tokenizer, check_model_tokens

try:  # the model adapter's alias (HookedTransformer | TransformerBridge), where it exists
    from interp.arch import Model
except ImportError:  # pragma: no cover - before the TransformerBridge adapter
    Model = HookedTransformer  # type: ignore[misc]

from interp.tl import KVCache

log = logging.getLogger(__name__)

Mode = Literal["token", "soft", "hidden"]
HiddenSite = Literal["post_norm", "pre_norm"]
Proj = Callable[[Tensor], Tensor] | torch.nn.Module

THOUGHT = "thought"
PROMPT_LAST = "prompt_last"
SUFFIX = "suffix"


def thought(i: int) -> str:
    """The span name of step `i`'s input position."""
    return f"{THOUGHT}_{i}"


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """How to roll out (module doc). `sample` (token mode): sample instead of greedy;
    `temperature`/`top_k`/`top_p` restrict the sampled distribution (token mode, sampled) or the
    mixture weights (soft mode); `hidden`: which hidden state hidden mode feeds back."""

    steps: int
    mode: Mode = "soft"
    sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    hidden: HiddenSite = "post_norm"
    cache: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"rollout: steps expected an int >= 1, got {self.steps!r}")
        if self.mode not in ("token", "soft", "hidden"):
            raise ValueError(f"rollout: mode expected 'token', 'soft' or 'hidden', got {self.mode!r}")
        if self.hidden not in ("post_norm", "pre_norm"):
            raise ValueError(f"rollout: hidden expected 'post_norm' (the final norm's output) or 'pre_norm' "
                             f"(the last block's resid_post), got {self.hidden!r}")
        if not self.temperature > 0:
            raise ValueError(f"rollout: temperature expected > 0, got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"rollout: top_k expected None or an int >= 1, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"rollout: top_p expected None or in (0, 1], got {self.top_p}")
        if self.sample and self.mode != "token":
            raise ValueError(f"rollout: sample=True expected with mode='token', got mode={self.mode!r} (soft "
                             f"mode mixes the distribution, hidden mode does not read it)")

    @property
    def restricted(self) -> bool:
        """Whether the step distribution is the tempered / top-k / top-p one (else the plain softmax)."""
        return self.mode == "soft" or self.sample


# --------------------------------------------------------------------- model-kind-specific ops

def embedding_matrix(model: Model) -> Float[Tensor, "d_vocab d_model"]:
    """The input embedding table ``W_E`` (what ``hook_embed`` looks tokens up in)."""
    return model.W_E


def final_norm(model: Model, resid: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch d_model"]:
    """The final norm's output of the last block's residual (identity for a model without one);
    called outside the forward, so no hook fires."""
    norm = getattr(model, "ln_final", None)
    if norm is None:
        return resid
    return norm(resid[:, None])[:, 0]


def new_kv_cache(model: Model, batch: int) -> object:
    """An empty key/value cache for `batch` rows."""
    return KVCache.init_cache(model.cfg, next(model.parameters()).device, batch)


def forward_cached(model: Model, tokens: Int[Tensor, "batch pos"], kv: object,
                   edits: Sequence[Intervention], captures: Sequence[Capture]
                   ) -> tuple[Float[Tensor, "batch pos d_vocab"], dict[str, Tensor]]:
    """One forward over the new positions `tokens`, reading and extending the K/V cache `kv`,
    with `edits` and `captures` (positions relative to the new positions)."""
    with intervene(model, edits, capture=captures) as r:
        logits = model(tokens, past_kv_cache=kv, attention_mask=torch.ones_like(tokens))
    return logits, r.captured


# ------------------------------------------------------------------------------------ pure math

def step_logits(logits: Float[Tensor, "*rest d_vocab"], cfg: RolloutConfig) -> Float[Tensor, "*rest d_vocab"]:
    """The logits of the step distribution: tempered and restricted (soft mode, sampled tokens) or
    the raw logits (greedy tokens, hidden mode)."""
    if not cfg.restricted:
        return logits
    return restrict(logits, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)


def soft_input(probs: Float[Tensor, "batch d_vocab"], w_e: Float[Tensor, "d_vocab d_model"]
               ) -> Float[Tensor, "batch d_model"]:
    """The probability-weighted input embedding ``probs @ W_E``, summed in at least float32 and
    returned in the embedding's dtype (a one-hot `probs` gives exactly a row of ``W_E``)."""
    dt = torch.promote_types(w_e.dtype, torch.float32)
    return (probs.to(dt) @ w_e.to(dt)).to(w_e.dtype)


def entropy(logits: Float[Tensor, "*rest d_vocab"]) -> Float[Tensor, "*rest"]:
    """Entropy (nats, float64) of softmax(logits); -inf logits (a restricted face) contribute 0."""
    lp = torch.log_softmax(logits.double(), -1)
    return -(lp.exp() * lp).nan_to_num().sum(-1)


def embed_edits(inputs: Float[Tensor, "batch steps d_model"], start: Int[Tensor, "batch"]) -> list[Intervention]:
    """``hook_embed`` overrides writing `inputs[:, s]` at position ``start + s`` of each row (the
    right-padded layout), one `SetAt` per step."""
    return [SetAt(HOOK_EMBED, index=start + s, values=inputs[:, s]) for s in range(inputs.shape[1])]


# ---------------------------------------------------------------------------------------- result

@dataclass(frozen=True)
class Rollout:
    """A rollout (module doc). Tensors are detached on the CPU in the caller's row order (with
    ``grad=True``, `inputs` and `logits` stay on the model's device in the autograd graph).

    `inputs[:, s]`: the vector step s fed at ``hook_embed`` (token mode: ``W_E[token]``);
    `logits[:, s]`: the raw logits (at least float32) step s's input was formed from (read at
    position ``L - 1 + s``); `final_logits`: the raw logits at the last step's position (what
    follows the rollout); `tokens[:, s]`: the token fed (token mode) or the argmax of
    `logits[:, s]` (soft, hidden: the sequence's placeholder token there); `acts[name]`:
    [batch, steps + 1, ...] at positions ``L - 1 + j`` (j = 0: the prompt's last token; j = s + 1:
    step s's input position). `sequence`: prompt + steps (+ `suffix`) as right-padded Prompts
    with the spans named in the module doc (and the prompts' single-token answers, read at the
    sequence's last position, when there is no suffix).
    """

    prompts: Prompts
    sequence: Prompts
    inputs: Float[Tensor, "batch steps d_model"]
    logits: Float[Tensor, "batch steps d_vocab"]
    final_logits: Float[Tensor, "batch d_vocab"]
    tokens: Int[Tensor, "batch steps"]
    config: RolloutConfig
    acts: dict[str, Tensor] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.config.steps

    @property
    def start(self) -> Int[Tensor, "batch"]:
        """Each row's position of step 0's input (its prompt's length)."""
        return self.prompts.lengths.clone()

    @property
    def positions(self) -> Int[Tensor, "batch steps"]:
        """Each row's input position of every step (prompt coordinates)."""
        return self.start[:, None] + torch.arange(self.steps)[None]

    @property
    def probs(self) -> Float[Tensor, "batch steps d_vocab"]:
        """The step distributions (float64): soft mode's mixture weights, token mode's sampling
        distribution, else the plain softmax of the logits."""
        return torch.softmax(step_logits(self.logits.detach().double(), self.config), -1)

    @property
    def entropy(self) -> Float[Tensor, "batch steps"]:
        """Entropy (nats) of each step's distribution (`probs`): what a sampled token discards."""
        return entropy(step_logits(self.logits.detach().double(), self.config))

    def to_frame(self, tokenizer: Tokenizer | None = None) -> pd.DataFrame:
        """One row per (example, step): position (prompt coordinates of the step's input), token
        (fed, or the argmax), entropy (nats) and top-1 probability of the step's distribution, and
        the input's L2 norm (a hidden state's can be far from the embeddings')."""
        b, s = self.tokens.shape
        probs = self.probs
        frame = pd.DataFrame({
            "example": torch.arange(b).repeat_interleave(s).numpy(), "step": torch.arange(s).repeat(b).numpy(),
            "position": self.positions.reshape(-1).numpy(), "token": self.tokens.reshape(-1).numpy(),
            "entropy": self.entropy.reshape(-1).numpy(), "top_prob": probs.amax(-1).reshape(-1).numpy(),
            "input_norm": self.inputs.detach().double().norm(dim=-1).reshape(-1).cpu().numpy()})
        if tokenizer is not None:
            frame["text"] = [tokenizer.decode([int(t)]) for t in frame["token"]]
        return frame

    def edits(self, inputs: Float[Tensor, "batch steps d_model"] | None = None) -> list[Intervention]:
        """The ``hook_embed`` overrides that put the rollout's inputs (or `inputs`) into
        `sequence` (the right-padded layout)."""
        x = self.inputs if inputs is None else self._check_inputs(inputs)
        return embed_edits(x, self.start)

    def edits_for(self, rows: slice) -> list[Intervention]:
        """`edits` of rows `rows` (a batch of `sequence`)."""
        return embed_edits(self.inputs[rows], self.start[rows])

    def _check_inputs(self, inputs: Tensor) -> Tensor:
        if not isinstance(inputs, Tensor) or tuple(inputs.shape) != tuple(self.inputs.shape):
            raise ValueError(f"rollout inputs: expected shape {tuple(self.inputs.shape)} (batch, steps, d_model), got "
                             f"{tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__}")
        return inputs

    def with_input(self, step: int, values: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch steps d_model"]:
        """The rollout's inputs with step `step`'s replaced by `values` (e.g. another example's:
        ``other.inputs[:, step]``): pass to `run(inputs=...)` to re-run the fixed sequence, or to
        `rollout(force=...)` to continue from it."""
        if not isinstance(step, int) or not 0 <= step < self.steps:
            raise ValueError(f"rollout step: expected an int in [0, {self.steps}), got {step!r}")
        v = torch.as_tensor(values)
        if tuple(v.shape) != (self.inputs.shape[0], self.inputs.shape[2]):
            raise ValueError(f"rollout input of step {step}: expected shape ({self.inputs.shape[0]}, "
                             f"{self.inputs.shape[2]}) (batch, d_model), got {tuple(v.shape)}")
        out = self.inputs.detach().clone()
        out[:, step] = v.to(out.device, out.dtype)
        return out

    def inputs_embeds(self, model: Model, inputs: Float[Tensor, "batch steps d_model"] | None = None
                      ) -> Float[Tensor, "batch pos d_model"]:
        """The whole sequence's ``hook_embed`` values (right-padded layout): token embeddings with
        each step's input at its position. Learned-position models add their position embedding
        to this; rotary models feed it to block 0 as is."""
        x = self.inputs if inputs is None else self._check_inputs(inputs)
        w_e = embedding_matrix(model)
        emb = w_e[self.sequence.tokens.to(w_e.device)].clone()
        rows = torch.arange(len(self.sequence), device=w_e.device)
        for s in range(self.steps):
            emb[rows, (self.start + s).to(w_e.device)] = x[:, s].to(w_e.device, w_e.dtype)
        return emb

    def run(self, model: Model, *, edits: Sequence[Intervention] = (),
            captures: Sequence[str | Node | Capture] = (), inputs: Float[Tensor, "batch steps d_model"] | None = None,
            hooks: Sequence[tuple[str, Callable]] = (), **kwargs: object) -> RunOutput:
        """Re-run the whole sequence (prompt + steps) in one forward with `interp.hooks.run`:
        the rollout's inputs (or `inputs`) at ``hook_embed``, then `edits`, keeping `captures`
        (Nodes, hook names or glob patterns; positions in prompt coordinates: step s is at
        ``start + s``). `hooks`: raw TransformerLens ``(name, fn)`` forward hooks, attached for this
        run only (after the toolkit's at the same hook point). Extra keyword arguments go to `run`.
        Later steps' inputs are not recomputed: see `with_input`."""
        with attach_hooks(model, hooks):
            return run(model, self.sequence, edits=[*self.edits(inputs), *edits], captures=captures, **kwargs)

    def collect(self, model: Model, *, hooks: Sequence[str | Node] | str,
                positions: str | Sequence[int] = THOUGHT, **kwargs: object) -> Cache:
        """`interp.cache.collect` over the sequence (default positions: every step's input)."""
        return collect(model, self.sequence, hooks=hooks, positions=positions, edits=self.edits_for,  # type: ignore[return-value]
                       **kwargs)

    def rows(self, acts: Cache | Mapping[str, Tensor] | Tensor, name: str = thought(0),
             hook: str | Node | None = None) -> Tensor:
        """Each row's activation at named position `name` of the sequence (`interp.cache.rows`):
        probe inputs, one per example."""
        return cache_rows(acts, self.sequence, name, hook)

    def select(self, rows: Int[Tensor, "n"] | Sequence[int]) -> Rollout:
        """The rollout of a subset of rows (in that order)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        return Rollout(self.prompts.select(idx), self.sequence.select(idx), self.inputs[idx], self.logits[idx],
                       self.final_logits[idx], self.tokens[idx], self.config,
                       {k: v[idx] for k, v in self.acts.items()})

    def with_suffix(self, suffix: Int[Tensor, "batch k"] | Sequence[Sequence[int]] | Sequence[int],
                    answers: Sequence[int | Sequence[int]] | Tensor | None = None) -> Rollout:
        """The rollout whose sequence continues after the last step with `suffix` tokens (one list
        per row, or one for all: e.g. an end-of-thought token), spanned ``suffix``, with optional
        `answers` read after it (teacher-forced as in `Prompts`). The steps are unchanged."""
        b = len(self.prompts)
        if isinstance(suffix, Tensor):
            per = [list(map(int, r)) for r in suffix.reshape(b, -1).tolist()] if suffix.ndim == 2 else \
                [list(map(int, suffix.tolist()))] * b
        else:
            items = list(suffix)
            per = [list(map(int, r)) for r in items] if items and not isinstance(items[0], int) else \
                [list(map(int, items))] * b
        if len(per) != b or any(not r for r in per):
            raise ValueError(f"rollout suffix: expected a non-empty token list (or one per row, {b}), got {suffix!r}")
        seq = _sequence(self.prompts, self.tokens, per, answers)
        return replace(self, sequence=seq)


def _sequence(prompts: Prompts, tokens: Tensor, suffix: list[list[int]] | None = None,
              answers: Sequence[int | Sequence[int]] | Tensor | None = None) -> Prompts:
    """The rollout's sequence as right-padded Prompts with its named spans."""
    r = prompts.right()
    b, steps = tokens.shape
    lengths = r.lengths
    seqs = []
    for i in range(b):
        parts = [r.tokens[i, : int(lengths[i])].cpu(), tokens[i].cpu()]
        if suffix is not None:
            parts.append(torch.tensor(suffix[i], dtype=torch.long))
        seqs.append(torch.cat(parts))
    spans: dict[str, object] = {k: v for k, v in r.spans.items() if k not in (LAST, ANSWER)}
    spans[PROMPT_LAST] = lengths - 1
    spans[THOUGHT] = torch.stack([lengths, lengths + steps], 1)
    for s in range(steps):
        spans[thought(s)] = lengths + s
    if suffix is not None:
        n = torch.tensor([len(x) for x in suffix])
        spans[SUFFIX] = torch.stack([lengths + steps, lengths + steps + n], 1)
    if answers is None and suffix is None and r.answers is not None and bool((r.answer_lengths == 1).all()):
        answers = r.answers[:, 0]
    return Prompts.from_tokens(seqs, spans=spans, answers=answers, pad_id=0)


# ---------------------------------------------------------------------------------------- driver

def rollout(
    model: Model,
    prompts: Prompts | Batch | Tensor,
    steps: int,
    *,
    mode: Mode = "soft",
    sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    hidden: HiddenSite = "post_norm",
    proj: Proj | None = None,
    force: Mapping[int, Tensor] | None = None,
    captures: Sequence[str | Node] = (),
    cache: bool = True,
    grad: bool = False,
    sample_rows: Sequence[int] | Tensor | None = None,
) -> Rollout:
    """Continue each prompt for `steps` steps in `mode` (module doc: inputs, coordinates, cache).

    `proj` (hidden mode): maps the hidden state [batch, d_model] to the next input (e.g. a learned
    projection); default: the hidden state itself. `force={step: [batch, d_model] vectors}`
    replaces the input of that step (its logits are still those of the rollout so far): a patched
    thought from which the rollout continues. `captures`: hooks read at positions ``L - 1 + j``
    for j = 0..steps (`Rollout.acts`). `grad=True` keeps the autograd graph (for training
    through continuous thoughts). `sample_rows`: each row's random stream (default: its index),
    as in `interp.decoding.generate`.

    A model not trained on continuous inputs was never taught to read them: soft and hidden
    rollouts of such a model are exploratory (module doc).
    """
    cfg = RolloutConfig(steps=steps, mode=mode, sample=sample, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, hidden=hidden, cache=cache)
    if proj is not None and mode != "hidden":
        raise ValueError(f"rollout: proj expected only with mode='hidden', got mode={mode!r}")
    p = as_prompts(prompts)
    if p.answers is not None and bool((p.answer_lengths > 1).any()):
        raise ValueError("rollout: expected prompts without multi-token answers (a rollout continues after every "
                         "real token, teacher-forced answer tokens included), got answers of up to "
                         f"{int(p.answer_lengths.max())} tokens; use single-token answers or Rollout.with_suffix")
    r = p.right()
    check_model_tokens(model, r.tokens, "prompts.tokens")
    arch = Arch.of(model)
    lengths = r.lengths
    b = len(r)
    if int(lengths.max()) + steps > arch.n_ctx:
        raise ValueError(f"rollout: expected prompt length + steps <= n_ctx = {arch.n_ctx}, got "
                         f"{int(lengths.max())} + {steps}; roll out fewer steps")
    forced = _check_force(force, b, steps, arch.d_model)
    streams = torch.arange(b) if sample_rows is None else torch.as_tensor(sample_rows, dtype=torch.long).cpu()
    if streams.shape != (b,):
        raise ValueError(f"rollout: sample_rows expected one stream id per prompt ({b},), got {tuple(streams.shape)}")
    u = uniforms(streams, steps, seed) if sample else None
    cap_names = resolve_hooks(model, list(captures)) if captures else []
    if cache and not kv_cache_supported(model):
        log.info("rollout: %s takes no TransformerLens key/value cache; recomputing every step",
                 type(model).__name__)
    device = next(model.parameters()).device
    out: dict[str, list] = {k: [None] * b for k in ("inputs", "logits", "final", "tokens")}
    acts: dict[str, list] = {n: [None] * b for n in cap_names}
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        for length in torch.unique(lengths).tolist():
            rows = torch.nonzero(lengths == length)[:, 0]
            g = _roll_group(model, r.tokens[rows, :length].to(device), cfg, proj,
                            {s: v[rows] for s, v in forced.items()}, None if u is None else u[rows], cap_names)
            for j, i in enumerate(rows.tolist()):
                for k in out:
                    out[k][i] = g[k][j]
                for n in cap_names:
                    acts[n][i] = g["acts"][n][j]

    def stack(xs: list) -> Tensor:
        t = torch.stack(xs)
        return t if grad else t.detach().cpu()

    tokens = torch.stack(out["tokens"]).cpu()
    return Rollout(p, _sequence(p, tokens), stack(out["inputs"]), stack(out["logits"]), stack(out["final"]), tokens,
                   cfg, {n: torch.stack(v).detach().cpu() for n, v in acts.items()})


def _check_force(force: Mapping[int, Tensor] | None, b: int, steps: int, d_model: int) -> dict[int, Tensor]:
    out = {}
    for s, v in (force or {}).items():
        if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < steps:
            raise ValueError(f"rollout: force steps expected ints in [0, {steps}), got {s!r}")
        t = torch.as_tensor(v)
        if tuple(t.shape) != (b, d_model) or not t.is_floating_point():
            raise ValueError(f"rollout: force[{s}] expected a float tensor ({b}, {d_model}) (one input vector per "
                             f"prompt), got {t.dtype} {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"rollout: force[{s}] expected finite values, got NaN/Inf")
        out[s] = t
    return out


def _hidden_name(model: Model) -> str:
    return Node(Arch.of(model).n_layers - 1, Site.RESID_POST).hook_name


def _roll_group(model: Model, toks: Tensor, cfg: RolloutConfig, proj: Proj | None,
                forced: dict[int, Tensor], u: Tensor | None, cap_names: list[str]) -> dict:
    """Roll out one group of prompts of the same length (no padding); rows on the model's device."""
    g, length = toks.shape
    device = toks.device
    w_e = embedding_matrix(model)
    hname = _hidden_name(model)
    names = list(dict.fromkeys([*cap_names, *([hname] if cfg.mode == "hidden" else [])]))
    kv = new_kv_cache(model, g) if cfg.cache and kv_cache_supported(model) else None
    seq = toks
    grad = torch.is_grad_enabled()  # captures (the hidden state fed back) stay in the graph
    inputs: list[Tensor] = []
    logit_steps: list[Tensor] = []
    tok_steps: list[Tensor] = []
    cap_steps: dict[str, list[Tensor]] = {n: [] for n in cap_names}
    final = None
    for s in range(cfg.steps + 1):
        n_pos = seq.shape[1]
        if kv is not None:
            inp = seq if s == 0 else seq[:, -1:]
            edits = [] if s == 0 else [Set(HOOK_EMBED, value=inputs[-1][:, None])]
            caps = [Capture(n, torch.full((g, 1), inp.shape[1] - 1, dtype=torch.long), grad=grad) for n in names]
            logits, got = forward_cached(model, inp, kv, edits, caps)
        else:
            edits = [] if s == 0 else [Set(HOOK_EMBED, pos=tuple(range(length, n_pos)),
                                           value=torch.stack(inputs, 1))]
            caps = [Capture(n, torch.full((g, 1), n_pos - 1, dtype=torch.long), grad=grad) for n in names]
            o = run(model, seq, edits=edits, captures=caps, grad=torch.is_grad_enabled(), check_finite=False)
            logits, got = o.logits, o.acts
        last = logits[:, -1]
        last = last.to(torch.promote_types(last.dtype, torch.float32))
        for n in cap_names:
            cap_steps[n].append(got[n][:, 0] if torch.is_grad_enabled() else got[n][:, 0].detach())
        if s == cfg.steps:
            final = last
            break
        z = step_logits(last, cfg)
        if cfg.mode == "token" and cfg.sample:
            chosen = sample_from(z.double(), u[:, s].to(device))  # type: ignore[index]
        else:
            chosen = last.argmax(-1)
        if cfg.mode == "token":
            x = w_e[chosen]
        elif cfg.mode == "soft":
            x = soft_input(torch.softmax(z.double(), -1), w_e)
        else:
            h = got[hname][:, 0]
            h = final_norm(model, h) if cfg.hidden == "post_norm" else h
            x = h if proj is None else proj(h)
            if not isinstance(x, Tensor) or tuple(x.shape) != tuple(h.shape):
                raise ValueError(f"rollout proj: expected a tensor of shape {tuple(h.shape)} (batch, d_model), got "
                                 f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
            x = x.to(w_e.dtype)
        if s in forced:
            x = forced[s].to(device, w_e.dtype)
        inputs.append(x)
        logit_steps.append(last)
        tok_steps.append(chosen)
        seq = torch.cat([seq, chosen[:, None]], 1)
    return {"inputs": torch.stack(inputs, 1), "logits": torch.stack(logit_steps, 1), "final": final,
            "tokens": torch.stack(tok_steps, 1).cpu(), "acts": {n: torch.stack(v, 1) for n, v in cap_steps.items()}}


# ------------------------------------------------------------------------------- instruments

def thought_lens(model: Model, ro: Rollout, *, translate: Callable[[Tensor], Tensor] | None = None,
                 decode_dtype: torch.dtype | None = None) -> Float[Tensor, "layer batch steps d_vocab"]:
    """The logit lens at every step's input position: the final norm + unembedding
    (`interp.lens.residual.Decoder`) of the residual at each lens layer (`lens_nodes`: resid_pre
    of every block, then the last resid_post), from one `Rollout.run`. The last layer is the
    model's own logits there. `translate` maps the stacked residuals first (a
    `interp.lens.TunedLens`: the tuned lens; pass its dtype as `decode_dtype` as its `run` does)."""
    nodes = lens_nodes(Arch.of(model).n_layers)
    idx = ro.positions
    out = ro.run(model, captures=[Capture(n, idx) for n in nodes], logits=False)
    resid = torch.stack([out.acts[n.hook_name] for n in nodes])
    with torch.no_grad():
        if translate is not None:
            resid = translate(resid)
        return Decoder(model, decode_dtype)(resid).cpu()


def _pair(model: Model, clean: Rollout, corrupt: Rollout, cross: bool) -> tuple[Prompts, Prompts]:
    if len(clean.prompts) != len(corrupt.prompts) or clean.steps != corrupt.steps:
        raise ValueError(f"rollout patching: expected two rollouts of the same rows and steps, got "
                         f"{len(clean.prompts)} x {clean.steps} and {len(corrupt.prompts)} x {corrupt.steps}")
    return check_prompts(model, clean.sequence, corrupt.sequence, cross=cross)


def patch(model: Model, clean: Rollout, corrupt: Rollout, metric: Metric,
          nodes: Place | Sequence[Place], *, direction: Direction = "denoising", alpha: float = 0.05,
          n_boot: int = 1000) -> PatchResult:
    """Activation patching between two rollouts (`interp.patching.patch` on their sequences):
    every node patched at once, one value per example. Positions may name the rollout's spans
    (``"thought_2"``, ``"thought"``); the metric reads the clean sequence (`Rollout.sequence`:
    its answers, at its last position). Each caching run is computed with its own rollout's inputs
    at ``hook_embed`` (`engine.prepare(clean_edits=..., corrupt_edits=...)`)."""
    node_list = as_places(nodes)
    cross = all(isinstance(n, At) and isinstance(n.pos, str) for n in node_list)
    c, bad = _pair(model, clean, corrupt, cross)
    for n in node_list:
        validate_node(model, n, c.tokens.shape[1])
    runs = prepare(model, c, bad, metric, {n.hook_name for n in node_list}, check_direction(direction), cross=cross,
                   clean_edits=clean.edits(), corrupt_edits=corrupt.edits())
    edits = [cross_edit(model, n, runs) if cross else node_edit(model, n, runs.source, c) for n in node_list]
    values = run_copies(model, runs, [edits], metric)
    label = " + ".join(str(n) for n in node_list)
    sites = ",".join(sorted({n.site.value for n in node_list}))  # type: ignore[union-attr]
    return PatchResult(detach(values), ("patch",), ((label,),), sites, direction, runs.clean_values,
                       runs.corrupt_values, alpha=alpha, n_boot=n_boot)


def sweep(model: Model, clean: Rollout, corrupt: Rollout, metric: Metric, *,
          site: Site | str = Site.RESID_PRE, layers: Sequence[int] | None = None,
          positions: Sequence[int | str] | str | None = None, direction: Direction = "denoising",
          rows: int = DEFAULT_ROWS, alpha: float = 0.05, n_boot: int = 1000) -> PatchResult:
    """Patch every (layer, position) of a residual-like `site` between two rollouts separately
    (axes layer x pos). `positions`: ints (prompt coordinates) or span names; default: every
    step, ``thought_0 .. thought_{steps-1}``."""
    s = Site(site) if not isinstance(site, Site) else site
    if s.per_head:
        raise ValueError(f"rollout sweep site: expected a residual-like site (resid_pre/mid/post, attn_out, "
                         f"mlp_out), got {s.value!r}; use patch with At nodes for heads")
    pos = [thought(i) for i in range(clean.steps)] if positions is None else positions
    cross = named_only(pos)
    c, bad = _pair(model, clean, corrupt, cross)
    layer_ix = index_axis(layers, Arch.of(model).n_layers, "layers")
    pos_ix = position_axis(pos, c)
    nodes = [At(layer, s, p) for layer in layer_ix for p in pos_ix]
    for n in nodes[:1] + nodes[-1:]:
        validate_node(model, n, c.tokens.shape[1])
    runs = prepare(model, c, bad, metric, {n.hook_name for n in nodes}, check_direction(direction), cross=cross,
                   clean_edits=clean.edits(), corrupt_edits=corrupt.edits())
    copies = [[cross_edit(model, n, runs) if cross else node_edit(model, n, runs.source, c)] for n in nodes]
    values = run_copies(model, runs, copies, metric, rows=rows, desc=f"patching {s.value}", labels=nodes)
    return PatchResult(detach(values).reshape(len(layer_ix), len(pos_ix), len(c)), ("layer", "pos"),
                       (layer_ix, pos_ix), s.value, direction, runs.clean_values, runs.corrupt_values,
                       alpha=alpha, n_boot=n_boot)
