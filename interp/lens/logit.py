"""Logit lens (nostalgebraist 2020): read each layer's residual through the final norm and unembedding.

For lens layer l (see `interp.lens.residual`) the lens distribution is
``softmax(unembed(final_norm(resid_l)))``, with the final norm's statistics recomputed on
``resid_l`` itself. This equals TransformerLens's ``cache.accumulated_resid(apply_ln=True)``
followed by ``model.unembed``, and at the last lens layer it is the model's own output.

Per layer and selected position the lens reports the top-k tokens and their probabilities, the
rank and probability of an answer token, the entropy and KL(final || lens) in nats. The lens
reads each prompt at a named position (`at="last"`, or any span of `interp.prompts.Prompts`);
answers default to the prompts' own (`Prompts.answers`, first token). Divergences are
computed in at least float32 (bf16 logits are promoted). Caveat (Belrose et al. 2023): the logit
lens is biased on early layers of many models (their residual basis drifts), which is what the
tuned lens (`interp.lens.TunedLens`) corrects.

Memory: one batch holds (n_layers + 1) x batch x selected positions x d_vocab logits; select
positions (`pos`) and set `batch_size` for large vocabularies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.lens.residual import (
    UNSET,
    Decoder,
    batches,
    compute_dtype,
    layer_labels,
    lens_inputs,
    model_name,
    residual_stack,
)
from interp.prompts import Prompts
from interp.stats import bootstrap_many
from interp.tl import HookedTransformer
from interp.tokens import Batch, Tokenizer
from interp.viz import curves, heatmap

Translate = Callable[[Tensor], Tensor]

METRICS = ("kl", "entropy", "top_prob", "answer_prob", "answer_rank", "answer_logprob")
UNITS = {"kl": "KL(final || lens) (nats)", "entropy": "entropy (nats)", "top_prob": "top-1 probability",
         "answer_prob": "p(answer)", "answer_rank": "rank of the answer (0 = top-1)",
         "answer_logprob": "log p(answer) (nats)"}
_OLD_METRICS = {"target_prob": "answer_prob", "target_rank": "answer_rank", "target_logprob": "answer_logprob"}


@dataclass(frozen=True)
class LensResult:
    """What a lens reads at each (lens layer, example, selected position). Tensors are on the CPU.

    `kl` is KL(final || lens) in nats; `answer_rank` is 0 for the top token (the number of tokens
    with a strictly higher probability). Answer fields are None when there was no answer.
    (`target`, `target_rank`, `target_logprob`, `target_prob` are the former names of the answer
    fields, kept as read-only aliases.)
    """

    lens: str
    model_name: str
    labels: tuple[str, ...]
    positions: Int[Tensor, "batch sel"]
    kl: Float[Tensor, "layer batch sel"]
    entropy: Float[Tensor, "layer batch sel"]
    top_tokens: Int[Tensor, "layer batch sel k"]
    top_probs: Float[Tensor, "layer batch sel k"]
    answer: Int[Tensor, "batch sel"] | None = None
    answer_rank: Int[Tensor, "layer batch sel"] | None = None
    answer_logprob: Float[Tensor, "layer batch sel"] | None = None
    logits: Float[Tensor, "layer batch sel d_vocab"] | None = None

    @property
    def values(self) -> Float[Tensor, "layer batch sel"]:
        """The headline metric: KL(final || lens) in nats per layer, example and position."""
        return self.kl

    @property
    def per_example(self) -> Float[Tensor, "layer batch sel"]:
        """The kept per-example values of the headline metric (KL, nats)."""
        return self.kl

    @property
    def answer_prob(self) -> Float[Tensor, "layer batch sel"] | None:
        return None if self.answer_logprob is None else self.answer_logprob.exp()

    @property
    def target(self) -> Int[Tensor, "batch sel"] | None:
        return self.answer

    @property
    def target_rank(self) -> Int[Tensor, "layer batch sel"] | None:
        return self.answer_rank

    @property
    def target_logprob(self) -> Float[Tensor, "layer batch sel"] | None:
        return self.answer_logprob

    @property
    def target_prob(self) -> Float[Tensor, "layer batch sel"] | None:
        return self.answer_prob

    def to_frame(self, tokenizer: Tokenizer | None = None) -> pd.DataFrame:
        """One row per (layer, example, selected position): kl, entropy, top-1 token/prob, answer metrics.

        `sel` indexes the selected positions (0 for a single one) and `pos` is the position itself.
        """
        n_layer, n_b, n_s = self.kl.shape
        layer = torch.arange(n_layer)[:, None, None].expand(n_layer, n_b, n_s)
        example = torch.arange(n_b)[None, :, None].expand(n_layer, n_b, n_s)
        pos = self.positions[None].expand(n_layer, n_b, n_s)
        cols = {
            "lens": self.lens,
            "model": self.model_name,
            "layer": layer.flatten().numpy(),
            "label": [self.labels[i] for i in layer.flatten().tolist()],
            "example": example.flatten().numpy(),
            "sel": torch.arange(n_s)[None, None, :].expand(n_layer, n_b, n_s).flatten().numpy(),
            "pos": pos.flatten().numpy(),
            "kl": self.kl.flatten().double().numpy(),
            "entropy": self.entropy.flatten().double().numpy(),
            "top_token": self.top_tokens[..., 0].flatten().numpy(),
            "top_prob": self.top_probs[..., 0].flatten().double().numpy(),
        }
        if tokenizer is not None:
            cols["top_str"] = [tokenizer.decode([t]) for t in cols["top_token"].tolist()]
        if self.answer is not None and self.answer_rank is not None and self.answer_logprob is not None:
            cols["answer"] = self.answer[None].expand(n_layer, n_b, n_s).flatten().numpy()
            cols["answer_rank"] = self.answer_rank.flatten().numpy()
            cols["answer_logprob"] = self.answer_logprob.flatten().double().numpy()
            cols["answer_prob"] = self.answer_logprob.exp().flatten().double().numpy()
        return pd.DataFrame(cols)

    def top_frame(self, tokenizer: Tokenizer | None = None) -> pd.DataFrame:
        """One row per (layer, example, position, rank) of the top-k tokens."""
        n_layer, n_b, n_s, k = self.top_tokens.shape
        grid = torch.stack(torch.meshgrid(torch.arange(n_layer), torch.arange(n_b), torch.arange(n_s),
                                          torch.arange(k), indexing="ij")).flatten(1)
        frame = pd.DataFrame({
            "lens": self.lens,
            "layer": grid[0].numpy(),
            "label": [self.labels[i] for i in grid[0].tolist()],
            "example": grid[1].numpy(),
            "pos": self.positions[grid[1], grid[2]].numpy(),
            "rank": grid[3].numpy(),
            "token": self.top_tokens.flatten().numpy(),
            "prob": self.top_probs.flatten().double().numpy(),
        })
        if tokenizer is not None:
            frame["token_str"] = [tokenizer.decode([t]) for t in frame["token"].tolist()]
        return frame

    def summary(self, metric: str = "kl", *, n_boot: int = 1000, alpha: float = 0.05,
                seed: int = 0) -> pd.DataFrame:
        """Mean of `metric` over examples per (layer, selected position), with a bootstrap CI over
        examples: columns ``value`` (= ``mean``), ``ci_low``, ``ci_high``, ``n`` plus the axes."""
        return summarise(self.to_frame(), metric, n_boot=n_boot, alpha=alpha, seed=seed)

    def plot(self, metric: str = "kl") -> go.Figure:
        """Mean `metric` by layer (with bootstrap CIs) for one position; a layer x position heatmap otherwise."""
        s = self.summary(metric)
        title = f"{self.lens} lens: {metric} by layer ({self.model_name})"
        unit = UNITS.get(_OLD_METRICS.get(metric, metric), metric)
        if self.positions.shape[1] == 1:
            return curves(s, x="layer", y="mean", group="lens", low="ci_low", high="ci_high",
                          title=title, y_title=unit, x_labels=self.labels)
        return heatmap(s, x="sel", y="layer", value="mean", title=title, diverging=False,
                       x_title="selected position (index into the prompt's positions)",
                       y_title="lens layer (0..L: l_pre entering block l, L = final_post)", value_title=unit,
                       caption=f"mean {unit} over examples per (layer, position)")


def summarise(frame: pd.DataFrame, metric: str, *, n_boot: int = 1000, alpha: float = 0.05,
              seed: int = 0, by: tuple[str, ...] = ("lens", "layer", "sel")) -> pd.DataFrame:
    """Mean of `metric` per group of `by`, with a percentile bootstrap CI over examples."""
    metric = _OLD_METRICS.get(metric, metric)
    if metric not in frame.columns:
        raise ValueError(f"lens summary metric: expected one of "
                         f"{[m for m in METRICS if m in frame.columns]}, got {metric!r}")
    wide = frame.pivot_table(index="example", columns=list(by), values=metric, aggfunc="mean")
    if wide.isna().to_numpy().any():
        raise ValueError(f"lens summary: expected every example to have a value in every group of {by}, "
                         f"got missing cells")
    values = torch.tensor(wide.to_numpy(), dtype=torch.float64)
    if values.shape[0] > 1:
        mean, lo, hi = bootstrap_many(values, n_boot=n_boot, alpha=alpha, seed=seed)
    else:
        mean = lo = hi = values[0]
    out = wide.columns.to_frame(index=False)
    out["value"], out["ci_low"], out["ci_high"] = mean.numpy(), lo.numpy(), hi.numpy()
    out["mean"] = out["value"]
    out["n"] = values.shape[0]
    return out


def _answers(target: Tensor | None, positions: Tensor, d_vocab: int, what: str = "answer") -> Tensor | None:
    if target is None:
        return None
    if not isinstance(target, Tensor) or target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"lens {what}: expected an integer tensor of shape (batch,) or (batch, sel), "
                        f"got {target!r}")
    t = target.detach().to("cpu", torch.long)
    if t.ndim == 1 and t.shape[0] != positions.shape[0]:
        raise ValueError(f"lens {what}: expected shape ({positions.shape[0]},) or "
                         f"{tuple(positions.shape)} (batch, selected positions), got {tuple(target.shape)}")
    if t.ndim == 1:
        t = t[:, None].expand_as(positions)
    if t.shape != positions.shape:
        raise ValueError(f"lens {what}: expected shape ({positions.shape[0]},) or "
                         f"{tuple(positions.shape)} (batch, selected positions), got {tuple(target.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= d_vocab):
        raise ValueError(f"lens {what}: expected token ids in [0, {d_vocab}), got "
                         f"[{int(t.min())}, {int(t.max())}]")
    return t.contiguous()


def _answer_arg(prompts: Tensor | Batch | Prompts, answer: Tensor | None, target: Tensor | None
                ) -> tuple[Tensor | None, str]:
    if answer is not None and target is not None:
        raise ValueError("lens: expected answer=... or its former name target=..., got both")
    if target is not None:
        return target, "target"
    if answer is None and isinstance(prompts, Prompts) and prompts.answers is not None:
        return prompts.first_answer, "answer"
    return answer, "answer"


def run_lens(
    model: HookedTransformer,
    prompts: Tensor | Batch | Prompts,
    *,
    lens: str,
    translate: Translate | None = None,
    decode_dtype: torch.dtype | None = None,
    at: str = "last",
    pos: object = UNSET,
    answer: Int[Tensor, " batch"] | Int[Tensor, "batch sel"] | None = None,
    target: Int[Tensor, " batch"] | Int[Tensor, "batch sel"] | None = None,
    k: int = 5,
    batch_size: int | None = None,
    keep_logits: bool = False,
    progress: bool = True,
) -> LensResult:
    """Decode every lens layer at the selected positions (shared by the logit and tuned lenses).

    `translate` maps the stacked residuals [layer, ..., d_model] before decoding (the tuned
    lens's translators); `decode_dtype` is the precision of the final norm + unembedding
    (None: the model's own).
    """
    ans, what = _answer_arg(prompts, answer, target)
    tokens, run_pos, positions = lens_inputs(model, prompts, pos, at)  # type: ignore[arg-type]
    d_vocab = model.cfg.d_vocab_out
    if not isinstance(k, int) or not 1 <= k <= d_vocab:
        raise ValueError(f"lens top-k: expected 1 <= k <= d_vocab={d_vocab}, got {k!r}")
    tgt = _answers(ans, positions, d_vocab, what)
    decoder = Decoder(model, decode_dtype)
    parts: dict[str, list[Tensor]] = {n: [] for n in ("kl", "ent", "tt", "tp", "rank", "tlp", "logits")}
    slices = list(batches(tokens.shape[0], batch_size))
    for sl in tqdm(slices, desc=f"{lens} lens", disable=not progress or len(slices) == 1, leave=False):
        resid = residual_stack(model, tokens[sl], positions=run_pos[sl])
        with torch.no_grad():
            if translate is not None:
                resid = translate(resid)
            logits = decoder(resid)  # [layer, b, sel, vocab]
            logp = torch.log_softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)
            p = logp.exp()
            kl = (p[-1:] * (logp[-1:] - logp)).sum(-1)  # KL(final || lens), as kl_from_final
            ent = -(p * logp).sum(-1)
            top_lp, top_tok = logp.topk(k, dim=-1)
            parts["kl"].append(kl.cpu())
            parts["ent"].append(ent.cpu())
            parts["tt"].append(top_tok.cpu())
            parts["tp"].append(top_lp.exp().cpu())
            if tgt is not None:
                t = tgt[sl].to(logp.device)[None, :, :, None].expand(logp.shape[0], -1, -1, 1)
                t_lp = logp.gather(-1, t)
                parts["rank"].append((logp > t_lp).sum(-1).cpu())
                parts["tlp"].append(t_lp[..., 0].cpu())
            if keep_logits:
                parts["logits"].append(logits.cpu())
    cat = {n: (torch.cat(v, dim=1) if v else None) for n, v in parts.items()}
    return LensResult(
        lens=lens,
        model_name=model_name(model),
        labels=tuple(layer_labels(model.cfg.n_layers)),
        positions=positions,
        kl=cat["kl"],  # type: ignore[arg-type]
        entropy=cat["ent"],  # type: ignore[arg-type]
        top_tokens=cat["tt"],  # type: ignore[arg-type]
        top_probs=cat["tp"],  # type: ignore[arg-type]
        answer=tgt,
        answer_rank=cat["rank"],
        answer_logprob=cat["tlp"],
        logits=cat["logits"],
    )


def logit_lens(
    model: HookedTransformer,
    prompts: Int[Tensor, "batch pos"] | Batch | Prompts,
    *,
    at: str = "last",
    pos: int | Int[Tensor, " batch"] | Int[Tensor, "batch sel"] | None | object = UNSET,
    answer: Int[Tensor, " batch"] | Int[Tensor, "batch sel"] | None = None,
    target: Int[Tensor, " batch"] | Int[Tensor, "batch sel"] | None = None,
    k: int = 5,
    batch_size: int | None = None,
    keep_logits: bool = False,
    progress: bool = True,
) -> LensResult:
    """The logit lens at every layer (embedding .. final), read at each prompt's position `at`.

    `prompts`: `Prompts`, a padded `Batch` or a token tensor (unpadded prompts); computed
    right-padded, so each prompt reads what it reads alone. `at`: "last" (each prompt's last
    token) or a named span of the prompts (its last token). `pos` instead selects explicit
    positions: an int (counting from each prompt's start; negative from its end), a tensor of
    one or more positions per example in the batch's own layout (e.g. `Batch.last`), or None
    for all (unpadded prompts only). `answer`: a token per example (or per selected position)
    whose rank and probability to track; default: the prompts' first answer tokens, if any
    (`target` is its former name). `keep_logits` also returns the lens logits (memory:
    layers x batch x sel x d_vocab).
    """
    return run_lens(model, prompts, lens="logit", at=at, pos=pos, answer=answer, target=target, k=k,
                    batch_size=batch_size, keep_logits=keep_logits, progress=progress)
