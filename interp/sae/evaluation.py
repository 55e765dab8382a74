"""Splice an SAE into a model's forward pass and measure its quality.

Standard SAE quality figures (Bricken et al. 2023; Gao et al. 2024; sae-lens's evals):
- fraction of variance explained: 1 - E||x - x_hat||^2 / E||x - E x||^2 (summed over d_in),
- L0: mean number of active features per token,
- dead / dense fractions: features that never fire on the evaluation data / fire on more than
  `dense_threshold` of its tokens,
- CE loss recovered (CE score): (CE_ablate - CE_SAE) / (CE_ablate - CE_clean), with the SAE's
  reconstruction spliced in at its hook, and zero-ablation of the hook as the baseline.

Splicing with ``error_term=True`` adds back the SAE's reconstruction error, so the forward pass is
unchanged unless the features are edited: the basis of feature ablation, attribution and steering.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from interp.graph import Node
from interp.sae.data import as_batch, hook_name_of, position_mask
from interp.stats import normalised_effect
from interp.tokens import Batch

FeatureEdit = Callable[[Tensor], Tensor]


def sae_hook_name(model: HookedTransformer, sae: SAE, hook: str | Node | None = None) -> str:
    """The hook an SAE reads: `hook` if given, else the one recorded in its metadata."""
    name = hook if hook is not None else sae.cfg.metadata.hook_name
    if name is None:
        raise ValueError("SAE hook: expected a hook name (argument or the SAE's metadata.hook_name), got None")
    name = hook_name_of(model, name)
    return name


def reconstruct(sae: SAE, x: Tensor, *, error_term: bool = False,
                edit: FeatureEdit | None = None) -> Tensor:
    """x through the SAE (decode(edit(encode(x)))), plus the unedited reconstruction error if asked."""
    xs = x.to(sae.dtype).to(sae.device)
    feats = sae.encode(xs)
    out = sae.decode(edit(feats) if edit is not None else feats)
    if error_term:
        # decode(edit(f)) + (x - decode(f)): exactly x (up to rounding) when nothing is edited
        out = out + (xs - sae.decode(feats)) if edit is not None else xs + (out - sae.decode(feats))
    return out.to(x.dtype).to(x.device)


def _splice_fn(sae: SAE, mask: Tensor | None, error_term: bool, edit: FeatureEdit | None) -> Callable:
    def fn(act: Tensor, hook: Any) -> Tensor:
        if act.shape[-1] != sae.cfg.d_in:
            raise ValueError(f"SAE at {hook.name}: expected activations with d_in={sae.cfg.d_in}, got shape "
                             f"{tuple(act.shape)}")
        new = reconstruct(sae, act, error_term=error_term, edit=edit)
        if mask is None:
            return new
        m = mask.to(act.device)[..., None]
        return torch.where(m, new, act)

    return fn


@contextlib.contextmanager
def splice(model: HookedTransformer, sae: SAE, hook: str | Node | None = None, *, error_term: bool = False,
           edit: FeatureEdit | None = None, mask: Tensor | None = None) -> Iterator[HookedTransformer]:
    """Within the block, the activation at the SAE's hook is replaced by its SAE reconstruction.

    `edit` maps the feature activations [.., d_sae] before decoding (ablation, steering);
    `error_term` adds the reconstruction error back (exact forward pass when `edit` is None);
    `mask` (bool [batch, pos]) limits the replacement to some positions. Hooks are removed on exit.
    """
    name = sae_hook_name(model, sae, hook)
    with model.hooks(fwd_hooks=[(name, _splice_fn(sae, mask, error_term, edit))]):
        yield model


@dataclass(frozen=True)
class SAEEval:
    """Quality figures of one SAE on one dataset (see the module docstring for definitions)."""

    hook_name: str
    variance_explained: float
    mse: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    ce_clean: float
    ce_sae: float
    ce_ablate: float
    ce_score: float
    n_tokens: int
    feature_frequency: Float[Tensor, "d_sae"]
    dense_threshold: float

    @property
    def values(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("variance_explained", "mse", "l0", "dead_fraction",
                                              "dense_fraction", "ce_clean", "ce_sae", "ce_ablate",
                                              "ce_score")}

    def to_frame(self) -> pd.DataFrame:
        """One row per metric."""
        return pd.DataFrame([{"hook": self.hook_name, "metric": k, "value": v} for k, v in self.values.items()])

    def features_frame(self) -> pd.DataFrame:
        """One row per feature: its firing frequency."""
        f = self.feature_frequency
        return pd.DataFrame({"feature": range(f.numel()), "frequency": f.tolist(),
                             "log10_frequency": torch.log10(f.double() + 1e-10).tolist()})

    def plot(self) -> go.Figure:
        """Histogram of log10 feature firing frequency (dead features at -10)."""
        frame = self.features_frame()
        fig = go.Figure(go.Histogram(x=frame["log10_frequency"], nbinsx=50))
        fig.update_layout(title=f"SAE at {self.hook_name}: L0 {self.l0:.1f}, FVE {self.variance_explained:.3f}, "
                                f"CE score {self.ce_score:.3f}",
                          xaxis_title="log10 firing frequency", yaxis_title="features", template="plotly_white")
        return fig

    def __str__(self) -> str:
        return (f"SAE {self.hook_name}: variance explained {self.variance_explained:.4f}, L0 {self.l0:.2f}, "
                f"dead {self.dead_fraction:.3f}, dense {self.dense_fraction:.3f}, CE clean {self.ce_clean:.4f} "
                f"/ SAE {self.ce_sae:.4f} / ablate {self.ce_ablate:.4f}, CE score {self.ce_score:.4f}")


def _zero(act: Tensor, hook: Any) -> Tensor:
    return torch.zeros_like(act)


def _ce(model: HookedTransformer, tokens: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy per position against `targets` (-1: ignored), 0 where ignored."""
    logp = model(tokens).log_softmax(-1)
    keep = targets >= 0
    picked = logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    return torch.where(keep, -picked, torch.zeros_like(picked))


def next_token_targets(batch: Batch) -> Int[Tensor, "batch pos"]:
    """Next-token targets for every real position that has a real successor (-1 elsewhere)."""
    t = torch.full_like(batch.tokens, -1)
    t[:, :-1] = torch.where(batch.mask[:, 1:], batch.tokens[:, 1:], -1)
    return t


def evaluate(
    model: HookedTransformer,
    sae: SAE,
    tokens: Tensor | Batch,
    hook: str | Node | None = None,
    *,
    positions: str | list[int] | Tensor = "all",
    targets: Int[Tensor, "batch pos"] | None = None,
    batch_size: int = 32,
    dense_threshold: float = 0.1,
    progress: bool = False,
) -> SAEEval:
    """Variance explained, L0, dead/dense fractions and CE score of `sae` on `tokens`.

    Reconstruction statistics use the selected `positions`. The CE losses are the mean
    cross-entropy against `targets` (token id per position, -1 to ignore; default: next-token
    prediction at every real position); the SAE replaces the hook at the selected positions,
    zero-ablation likewise.
    """
    if not 0 < dense_threshold < 1:
        raise ValueError(f"evaluate.dense_threshold: expected in (0, 1), got {dense_threshold}")
    name = sae_hook_name(model, sae, hook)
    batch = as_batch(tokens, model.cfg.d_vocab)
    mask = position_mask(batch, positions)
    if targets is None:
        targets = next_token_targets(batch)
    elif targets.shape != batch.tokens.shape:
        raise ValueError(f"evaluate.targets: expected shape {tuple(batch.tokens.shape)} (one id per position, "
                         f"-1 to ignore), got {tuple(targets.shape)}")
    n_fire = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    sum_sq = sum_res = l0_sum = 0.0
    n_tok = 0
    ce = {"clean": 0.0, "sae": 0.0, "ablate": 0.0}
    n_pred = 0
    starts = range(0, batch.tokens.shape[0], batch_size)
    for start in tqdm(starts, desc=f"evaluating SAE at {name}", disable=not progress):
        toks = batch.tokens[start:start + batch_size].to(model.cfg.device)
        m = mask[start:start + batch_size]
        tgt = targets[start:start + batch_size].to(model.cfg.device)
        real = tgt >= 0
        grabbed: dict[str, Tensor] = {}

        def grab(act: Tensor, hook: Any, grabbed: dict[str, Tensor] = grabbed) -> None:
            grabbed["x"] = act.detach()

        with torch.inference_mode():
            with model.hooks(fwd_hooks=[(name, grab)]):
                loss_clean = _ce(model, toks, tgt)
            x = grabbed["x"][m.to(grabbed["x"].device)]
            feats = sae.encode(x.to(sae.dtype).to(sae.device))
            x_hat = sae.decode(feats).to(torch.float64).cpu()
            xd = x.to(torch.float64).cpu()
            n_fire += (feats != 0).sum(0).double().cpu()
            l0_sum += float((feats != 0).sum())
            sum_x += xd.sum(0)
            sum_sq += float(xd.pow(2).sum())
            sum_res += float((xd - x_hat).pow(2).sum())
            n_tok += xd.shape[0]
            with splice(model, sae, name, mask=m):
                loss_sae = _ce(model, toks, tgt)
            zero = _masked_zero(m)
            with model.hooks(fwd_hooks=[(name, zero)]):
                loss_abl = _ce(model, toks, tgt)
        for key, loss in (("clean", loss_clean), ("sae", loss_sae), ("ablate", loss_abl)):
            ce[key] += float(loss[real].double().sum())
        n_pred += int(real.sum())
    if n_tok == 0 or n_pred == 0:
        raise ValueError(f"evaluate: expected at least one selected token and one predicted token, got "
                         f"{n_tok} and {n_pred}")
    total_var = sum_sq / n_tok - float((sum_x / n_tok).pow(2).sum())
    mse = sum_res / n_tok
    fve = 1.0 - mse / total_var if total_var > 1e-12 else float("nan")
    freq = (n_fire / n_tok).float()
    ce_clean, ce_sae, ce_abl = (ce[k] / n_pred for k in ("clean", "sae", "ablate"))
    score = float(normalised_effect(torch.tensor(ce_sae), ce_abl, ce_clean))
    return SAEEval(
        hook_name=name, variance_explained=fve, mse=mse, l0=l0_sum / n_tok,
        dead_fraction=float((freq == 0).float().mean()), dense_fraction=float((freq > dense_threshold).float().mean()),
        ce_clean=ce_clean, ce_sae=ce_sae, ce_ablate=ce_abl, ce_score=score, n_tokens=n_tok,
        feature_frequency=freq, dense_threshold=dense_threshold,
    )


def _masked_zero(mask: Tensor) -> Callable:
    def fn(act: Tensor, hook: Any) -> Tensor:
        return torch.where(mask.to(act.device)[..., None], torch.zeros_like(act), act)

    return fn
