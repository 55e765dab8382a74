"""The lens grid: the residual stream at every layer, and decoding it like the final layer.

Lenses read the residual stream at n_layers + 1 places. Lens layer ``l < n_layers`` is the input
of block ``l`` (``blocks.l.hook_resid_pre``; layer 0 is the embedding); lens layer ``n_layers``
is the output of the last block (``blocks.{n_layers-1}.hook_resid_post``), which the model itself
sends through its final norm and unembedding. This is the layout of TransformerLens's
``ActivationCache.accumulated_resid()`` and of `interp.graph.GridPoint`.

`Decoder` applies the model's final norm and unembedding with *detached* parameters, so a lens
trained through it never accumulates gradients in (or changes) the model, optionally in a higher
precision than the model's own (KL divergences of bf16 models are computed in float32).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.func import functional_call
from tqdm.auto import tqdm

from interp.arch import Arch, Model, device_of, dtype_of
from interp.arch import model_name as name_of
from interp.graph import Node, Site
from interp.hooks import Capture, run
from interp.prompts import Prompts, as_prompts
from interp.tokens import Batch, check_model_tokens

log = logging.getLogger(__name__)


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


UNSET = _Unset()  # "argument not given" (None is a value of `pos`: every position)


def lens_nodes(n_layers: int) -> list[Node]:
    """The n_layers + 1 lens layers as nodes: resid_pre of each block, then the final resid_post."""
    return [Node(i, Site.RESID_PRE) for i in range(n_layers)] + [Node(n_layers - 1, Site.RESID_POST)]


def lens_hooks(n_layers: int) -> list[str]:
    """The hook names of the n_layers + 1 lens layers (resid_pre of each block, then the final resid_post)."""
    return [n.hook_name for n in lens_nodes(n_layers)]


def layer_labels(n_layers: int) -> list[str]:
    """Labels of the lens layers, as TransformerLens's ``accumulated_resid(return_labels=True)``."""
    return [f"{i}_pre" for i in range(n_layers)] + ["final_post"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute divergences and fits in: at least float32 (bf16/fp16 are promoted)."""
    return torch.promote_types(dtype, torch.float32)


def model_dtype(model: Model) -> torch.dtype:
    return dtype_of(model)


def model_device(model: Model) -> torch.device:
    return device_of(model)


def model_name(model: Model) -> str:
    return name_of(model)


def select_positions(
    tokens: Int[Tensor, "batch pos"], pos: int | Int[Tensor, " batch"] | Int[Tensor, "batch sel"] | None
) -> Int[Tensor, "batch sel"]:
    """Position indices per example: an int (same for all), one per example, several, or all (None)."""
    b, n = tokens.shape
    if pos is None:
        return torch.arange(n).expand(b, n).clone()
    if isinstance(pos, bool):
        raise TypeError(f"lens position: expected None, an int or an integer tensor, got {pos!r}")
    if isinstance(pos, int):
        if not -n <= pos < n:
            raise ValueError(f"lens position: expected an int in [{-n}, {n}), got {pos}")
        return torch.full((b, 1), pos % n, dtype=torch.long)
    if not isinstance(pos, Tensor) or pos.dtype.is_floating_point or pos.dtype == torch.bool:
        raise TypeError(f"lens position: expected None, an int or an integer tensor, got {pos!r}")
    p = pos.detach().to("cpu", torch.long)
    if p.ndim == 1:
        p = p[:, None]
    if p.ndim != 2 or p.shape[0] != b:
        raise ValueError(f"lens position tensor: expected shape ({b},) or ({b}, k), got {tuple(pos.shape)}")
    if p.numel() and (int(p.min()) < -n or int(p.max()) >= n):
        raise ValueError(f"lens position tensor: expected values in [{-n}, {n}), got "
                         f"[{int(p.min())}, {int(p.max())}]")
    return p % n


def lens_inputs(
    model: Model, tokens: Tensor | Batch | Prompts,
    pos: int | Int[Tensor, " batch"] | Int[Tensor, "batch sel"] | None | _Unset,
    at: str = "last",
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch sel"], Int[Tensor, "batch sel"]]:
    """Validated lens inputs: (tokens to run, positions in them, positions in the caller's layout).

    Without `pos` the lens reads each prompt's named position `at` ("last": its last token; any
    span name of `Prompts`: that span's last token), in prompt coordinates.

    A raw tensor is taken as unpadded prompts (pad cannot be told from a token: a left-padded
    tensor run as is gives wrong logits). A `Batch` is run right-padded, where each prompt sees
    exactly the positions it would see alone; an int `pos` then counts from each prompt's first
    real token (negative: from its last, so the default -1 is each prompt's last real token), a
    tensor `pos` indexes the batch's own layout (e.g. `Batch.last`), and a selected pad raises.
    """
    if isinstance(pos, _Unset):
        p = as_prompts(tokens)
        right = p.right()
        toks = check_model_tokens(model, right.tokens, "prompts.tokens" if isinstance(tokens, Batch) else "tokens")
        if not isinstance(at, str):
            raise TypeError(f"lens at: expected a position name ('last' or a span of the prompts), got {at!r}")
        try:
            run_pos = p.index(at)[:, None]
        except KeyError as e:
            raise ValueError(f"lens at: expected 'last' or a named position of the prompts {sorted(p.names)}, "
                             f"got {at!r}") from e
        shift = p.shift().cpu().long() if p.side == "left" else torch.zeros(len(p), dtype=torch.long)
        return toks, run_pos, run_pos + shift[:, None]
    if not isinstance(tokens, Batch):
        toks = check_model_tokens(model, tokens)
        positions = select_positions(toks, pos)
        return toks, positions, positions
    right = tokens.right()
    toks = check_model_tokens(model, right.tokens, "Batch.tokens")
    lengths = right.lengths.cpu().long()
    b, n = toks.shape
    shift = tokens.shift().cpu().long()
    if pos is None:
        if bool((lengths < n).any()):
            raise ValueError("lens position: expected explicit positions for a padded Batch, got None "
                             "(every position, pads included); pass pos=batch.last or a tensor of "
                             "real positions")
        positions = select_positions(toks, None)
        return toks, positions, positions
    if isinstance(pos, int) and not isinstance(pos, bool):
        run_pos = (torch.full((b,), pos, dtype=torch.long) if pos >= 0 else lengths + pos)[:, None]
    else:
        run_pos = select_positions(tokens.tokens, pos) - shift[:, None]
    bad = (run_pos < 0) | (run_pos >= lengths[:, None])
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"lens position: expected real (non-pad) positions of each prompt, got "
                         f"{pos if isinstance(pos, int) else pos[row].tolist()} for prompt {row} of "
                         f"length {int(lengths[row])} ({tokens.side}-padded to {n})")
    return toks, run_pos, run_pos + shift[:, None]


def batches(n: int, batch_size: int | None) -> Iterator[slice]:
    size = n if batch_size is None else batch_size
    if size < 1:
        raise ValueError(f"batch_size: expected a positive int or None, got {batch_size}")
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def residual_stack(
    model: Model,
    tokens: Int[Tensor, "batch pos"] | Batch | Prompts,
    *,
    positions: Int[Tensor, "batch sel"] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> Float[Tensor, "layer batch sel d_model"]:
    """The residual stream at every lens layer (n_layers + 1), at the selected positions.

    `tokens`: a token tensor (unpadded prompts), or padded `Batch`/`Prompts` (computed
    right-padded); `positions` [batch, sel] index the right-padded layout (prompt coordinates);
    None keeps every position (pads included for padded prompts: mask them with `lengths`).
    One `interp.hooks.run` per batch of `batch_size` examples; the result is on the model's
    device in the model's dtype.
    """
    p = as_prompts(tokens).right()
    check_model_tokens(model, p.tokens, "prompts.tokens" if isinstance(tokens, Batch) else "tokens")
    if positions is None:
        positions = select_positions(p.tokens, None)
    nodes = lens_nodes(Arch.of(model).n_layers)
    chunks: list[Tensor] = []
    slices = list(batches(p.tokens.shape[0], batch_size))
    for sl in tqdm(slices, desc="lens: residuals", disable=not progress or len(slices) == 1, leave=False):
        idx = positions[sl]
        part = Batch(p.tokens[sl], p.lengths[sl], "right")
        out = run(model, part, captures=[Capture(n, idx) for n in nodes], logits=False)
        chunks.append(torch.stack([out.acts[n.hook_name] for n in nodes]))
    return torch.cat(chunks, dim=1)


class Decoder:
    """The model's final norm + unembedding (+ its output soft cap, Gemma 2) as a function of a
    residual, with detached parameters.

    With ``dtype=None`` this computes exactly what the model computes (its own dtype); with a
    dtype (e.g. float32 for a bf16 model) the parameters are cast once and the residual is
    decoded in that precision. Either model kind: the norm and unembedding modules are called
    as they are (a TransformerBridge's wrap the Hugging Face modules).
    """

    def __init__(self, model: Model, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype
        self.softcap = Arch.of(model).softcap
        self.norm = getattr(model, "ln_final", None)
        self.unembed = model.unembed

        def params(module: torch.nn.Module) -> dict[str, Tensor]:
            # floating buffers too: TL 4's bridge keeps a Hugging Face lm_head bias as a buffer
            tensors = [*module.named_parameters(), *((k, b) for k, b in module.named_buffers() if b.is_floating_point())]
            return {k: (v.detach() if dtype is None else v.detach().to(dtype)) for k, v in tensors}

        self.norm_params = params(self.norm) if self.norm is not None else {}
        self.unembed_params = params(self.unembed)

    def __call__(self, resid: Float[Tensor, "*rest d_model"]) -> Float[Tensor, "*rest d_vocab_out"]:
        x = resid if self.dtype is None else resid.to(self.dtype)
        shape = x.shape
        x = x.reshape(1, -1, shape[-1])  # TL modules expect (batch, pos, d_model)
        if self.norm is not None:
            x = functional_call(self.norm, self.norm_params, (x,))
            if self.dtype is not None:
                x = x.to(self.dtype)  # TL norms cast back to the model's dtype
        out = functional_call(self.unembed, self.unembed_params, (x,))
        if self.softcap is not None:
            out = self.softcap * torch.tanh(out / self.softcap)
        return out.reshape(*shape[:-1], out.shape[-1])


def kl_from_final(
    final_logits: Float[Tensor, "*rest d_vocab"], lens_logits: Float[Tensor, "*rest d_vocab"]
) -> Float[Tensor, "*rest"]:
    """KL(final || lens) in nats, in at least float32, for logits of any dtype."""
    dt = compute_dtype(final_logits.dtype)
    p_log = torch.log_softmax(final_logits.to(dt), dim=-1)
    q_log = torch.log_softmax(lens_logits.to(dt), dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(dim=-1)
