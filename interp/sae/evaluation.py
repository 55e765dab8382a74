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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm

from interp.graph import Node
from interp.hooks import Map, intervene, run
from interp.prompts import Prompts
from interp.sae.checks import check_sae
from interp.sae.data import Positions, as_batch, chunks, position_mask
from interp.stats import normalised_effect
from interp.tl import HookedTransformer
from interp.tokens import Batch

FeatureEdit = Callable[[Tensor], Tensor]


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


def _splice_fn(sae: SAE, mask: Tensor | None, error_term: bool, edit: FeatureEdit | None, name: str
               ) -> Callable[[Tensor], Tensor]:
    def fn(act: Tensor) -> Tensor:
        if act.shape[-1] != sae.cfg.d_in:
            raise ValueError(f"SAE at {name}: expected activations with d_in={sae.cfg.d_in}, got shape "
                             f"{tuple(act.shape)}")
        new = reconstruct(sae, act, error_term=error_term, edit=edit)
        if mask is None:
            return new
        m = mask.to(act.device)[..., None]
        return torch.where(m, new, act)

    return fn


def splice_edit(sae: SAE, name: str, *, error_term: bool = False, edit: FeatureEdit | None = None,
                mask: Tensor | None = None) -> Map:
    """The SAE spliced in at hook `name` as an intervention for `interp.hooks.run` (`mask`:
    bool [batch, pos] positions to replace; `edit` maps feature activations before decoding)."""
    return Map(name, fn=_splice_fn(sae, mask, error_term, edit, name))


def masked_zero(name: str, mask: Tensor) -> Map:
    """Zero-ablation of hook `name` at the positions of `mask` (bool [batch, pos])."""
    def fn(act: Tensor) -> Tensor:
        return torch.where(mask.to(act.device)[..., None], torch.zeros_like(act), act)

    return Map(name, fn=fn)


@contextlib.contextmanager
def splice(model: HookedTransformer, sae: SAE, hook: str | Node | None = None, *, error_term: bool = False,
           edit: FeatureEdit | None = None, mask: Tensor | None = None,
           allow_mismatch: bool = False) -> Iterator[HookedTransformer]:
    """Within the block, the activation at the SAE's hook is replaced by its SAE reconstruction.

    `edit` maps the feature activations [.., d_sae] before decoding (ablation, steering);
    `error_term` adds the reconstruction error back (exact forward pass when `edit` is None);
    `mask` (bool [batch, pos]) limits the replacement to some positions. Hooks are removed on exit.
    The SAE's recorded hook and model are checked (`check_sae`; `allow_mismatch` skips that).
    """
    name = check_sae(model, sae, hook, allow_mismatch=allow_mismatch)
    with spliced_at(model, sae, name, error_term=error_term, edit=edit, mask=mask):
        yield model


@contextlib.contextmanager
def spliced_at(model: HookedTransformer, sae: SAE, name: str, *, error_term: bool = False,
               edit: FeatureEdit | None = None, mask: Tensor | None = None) -> Iterator[HookedTransformer]:
    """`splice` at an already checked hook name (for callers that ran `check_sae` once)."""
    with intervene(model, [splice_edit(sae, name, error_term=error_term, edit=edit, mask=mask)], strict=False):
        yield model


NEXT_TOKEN = "next-token"


@dataclass(frozen=True)
class CELoss:
    """Mean cross-entropy against one set of targets with the hook clean, SAE-spliced and zero-ablated.

    `targets` names the target set (e.g. "next-token": every real position predicts its
    successor; "answer": only the answer position); `n_targets` is how many positions it scores.
    `score` = (ablate - sae) / (ablate - clean).
    """

    targets: str
    n_targets: int
    clean: float
    sae: float
    ablate: float
    score: float


@dataclass(frozen=True)
class SAEEval:
    """Quality figures of one SAE on one dataset (see the module docstring for definitions).

    `ce` holds one `CELoss` per target set the CE score was computed on; `ce_score` is the first
    one's (`ce_targets` names it). A CE score depends on which positions are scored: say which
    whenever you quote one.
    """

    hook_name: str
    variance_explained: float
    mse: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    ce: tuple[CELoss, ...]
    n_tokens: int
    feature_frequency: Float[Tensor, "d_sae"]
    dense_threshold: float

    @property
    def ce_targets(self) -> str:
        """The target set of the headline CE figures (`ce_score`): the first of `ce`."""
        return self.ce[0].targets

    @property
    def ce_score(self) -> float:
        """The CE score on `ce_targets`; ``ce[i]`` / `ce_for` hold every target set's losses and score."""
        return self.ce[0].score

    def ce_for(self, targets: str) -> CELoss:
        """The CE figures on one named target set."""
        for c in self.ce:
            if c.targets == targets:
                return c
        raise KeyError(f"CE targets: expected one of {[c.targets for c in self.ce]}, got {targets!r}")

    @property
    def values(self) -> dict[str, float]:
        """Reconstruction figures, then ``ce_clean[T]``, ``ce_sae[T]``, ``ce_ablate[T]``, ``ce_score[T]``
        and ``ce_n[T]`` for each target set T."""
        out = {k: getattr(self, k) for k in ("variance_explained", "mse", "l0", "dead_fraction", "dense_fraction")}
        for c in self.ce:
            out.update({f"ce_clean[{c.targets}]": c.clean, f"ce_sae[{c.targets}]": c.sae,
                        f"ce_ablate[{c.targets}]": c.ablate, f"ce_score[{c.targets}]": c.score,
                        f"ce_n[{c.targets}]": float(c.n_targets)})
        return out

    def to_frame(self) -> pd.DataFrame:
        """One row per metric; CE rows name their target set in ``targets`` (None elsewhere)."""
        rows = [{"hook": self.hook_name, "metric": k, "targets": None, "value": getattr(self, k)}
                for k in ("variance_explained", "mse", "l0", "dead_fraction", "dense_fraction")]
        for c in self.ce:
            rows += [{"hook": self.hook_name, "metric": f"ce_{k}", "targets": c.targets, "value": float(getattr(c, k))}
                     for k in ("clean", "sae", "ablate", "score")]
            rows.append({"hook": self.hook_name, "metric": "ce_n", "targets": c.targets, "value": float(c.n_targets)})
        return pd.DataFrame(rows)

    def features_frame(self) -> pd.DataFrame:
        """One row per feature: its firing frequency."""
        f = self.feature_frequency
        return pd.DataFrame({"feature": range(f.numel()), "frequency": f.tolist(),
                             "log10_frequency": torch.log10(f.double() + 1e-10).tolist()})

    def plot(self) -> go.Figure:
        """Histogram of log10 feature firing frequency (dead features at -10)."""
        frame = self.features_frame()
        fig = go.Figure(go.Histogram(x=frame["log10_frequency"], nbinsx=50))
        ce = ", ".join(f"{c.score:.3f} ({c.targets})" for c in self.ce)
        fig.update_layout(title=f"SAE at {self.hook_name}: L0 {self.l0:.1f}, FVE {self.variance_explained:.3f}, "
                                f"dead {self.dead_fraction:.2f}, CE score {ce}",
                          xaxis_title="log10 firing frequency", yaxis_title="features", template="plotly_white")
        return fig

    def __str__(self) -> str:
        ce = "; ".join(f"CE score {c.score:.4f} on {c.targets} targets ({c.n_targets} positions: clean {c.clean:.4f} "
                       f"/ SAE {c.sae:.4f} / ablate {c.ablate:.4f})" for c in self.ce)
        return (f"SAE {self.hook_name}: variance explained {self.variance_explained:.4f}, L0 {self.l0:.2f}, "
                f"dead {self.dead_fraction:.3f}, dense {self.dense_fraction:.3f}; {ce}")


def _ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy per position against `targets` (-1: ignored), 0 where ignored."""
    logp = logits.log_softmax(-1)
    keep = targets >= 0
    picked = logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    return torch.where(keep, -picked, torch.zeros_like(picked))


def next_token_targets(batch: Batch) -> Int[Tensor, "batch pos"]:
    """Next-token targets for every real position that has a real successor (-1 elsewhere)."""
    t = torch.full_like(batch.tokens, -1)
    t[:, :-1] = torch.where(batch.mask[:, 1:], batch.tokens[:, 1:], -1)
    return t


def answer_targets(prompts: Prompts) -> Int[Tensor, "batch pos"]:
    """Each prompt's answer tokens at the positions that predict them (teacher-forced: the logits at
    ``last + j`` predict answer token j), -1 elsewhere; right-padded layout."""
    if prompts.answers is None or prompts.answer_lengths is None:
        raise ValueError("answer targets: expected prompts with answers, got none; build them with answers=...")
    p = prompts.right()
    t = torch.full_like(p.tokens, -1).cpu()
    last = p.index("last")
    for j in range(p.answers.shape[1]):
        rows = p.answer_lengths > j
        t[rows, last[rows] + j] = p.answers[rows, j]
    return t.to(p.tokens.device)


def _target_sets(batch: Batch, targets: Tensor | Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    if targets is None:
        sets = {NEXT_TOKEN: next_token_targets(batch)}
        if isinstance(batch, Prompts) and batch.answers is not None:
            sets["answer"] = answer_targets(batch)
    elif isinstance(targets, Tensor):
        sets = {"given": targets}
    else:
        sets = {str(k): v for k, v in targets.items()}
    if not sets:
        raise ValueError("evaluate.targets: expected at least one target set, got an empty mapping")
    for k, v in sets.items():
        if not isinstance(v, Tensor) or v.shape != batch.tokens.shape:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"evaluate.targets[{k!r}]: expected shape {tuple(batch.tokens.shape)} (one id per "
                             f"position, -1 to ignore), got {got}")
    return sets


def evaluate(
    model: HookedTransformer,
    sae: SAE,
    prompts: Tensor | Batch | Prompts,
    hook: str | Node | None = None,
    *,
    positions: Positions = "all",
    targets: Tensor | Mapping[str, Tensor] | None = None,
    batch_size: int = 32,
    dense_threshold: float = 0.1,
    progress: bool = False,
    allow_mismatch: bool = False,
) -> SAEEval:
    """Variance explained, L0, dead/dense fractions and CE score of `sae` on `tokens`.

    Reconstruction statistics use the selected `positions`. The CE losses are mean cross-entropies
    against each target set (token id per position, -1 to ignore): `targets` is a [batch, pos]
    tensor (named "given"), a mapping name -> tensor (several sets from the same forward passes,
    the first is the headline `ce_score`), or None: next-token prediction at every real position
    ("next-token"), plus the answers of `Prompts` that carry them ("answer"). The SAE replaces the hook at the selected positions, zero-ablation likewise.
    The SAE's recorded hook and model are checked first (`check_sae`; `allow_mismatch` skips that).
    """
    if not 0 < dense_threshold < 1:
        raise ValueError(f"evaluate.dense_threshold: expected in (0, 1), got {dense_threshold}")
    name = check_sae(model, sae, hook, allow_mismatch=allow_mismatch)
    batch = as_batch(prompts, model.cfg.d_vocab)
    mask = position_mask(batch, positions)
    sets = _target_sets(batch, targets)
    n_fire = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    sum_sq = sum_res = l0_sum = 0.0
    n_tok = 0
    ce = {t: {"clean": 0.0, "sae": 0.0, "ablate": 0.0} for t in sets}
    n_pred = dict.fromkeys(sets, 0)
    for sl, part in tqdm(list(chunks(batch, batch_size)), desc=f"evaluating SAE at {name}", disable=not progress):
        m = mask[sl]
        tgts = {t: v[sl] for t, v in sets.items()}

        def add_ce(key: str, logits: Tensor, tgts: dict[str, Tensor] = tgts) -> None:
            # every target set from the same logits, which are dropped right after
            for t, tgt in tgts.items():
                tgt = tgt.to(logits.device)
                ce[t][key] += float(_ce(logits, tgt)[tgt >= 0].double().sum())

        clean = run(model, part, captures=[name])
        add_ce("clean", clean.logits)  # type: ignore[arg-type]
        with torch.no_grad():
            x = clean.acts[name][m.to(clean.acts[name].device)]
            feats = sae.encode(x.to(sae.dtype).to(sae.device))
            x_hat = sae.decode(feats).to(torch.float64).cpu()
        xd = x.to(torch.float64).cpu()
        n_fire += (feats != 0).sum(0).double().cpu()
        l0_sum += float((feats != 0).sum())
        sum_x += xd.sum(0)
        sum_sq += float(xd.pow(2).sum())
        sum_res += float((xd - x_hat).pow(2).sum())
        n_tok += xd.shape[0]
        add_ce("sae", run(model, part, edits=[splice_edit(sae, name, mask=m)]).logits)  # type: ignore[arg-type]
        add_ce("ablate", run(model, part, edits=[masked_zero(name, m)]).logits)  # type: ignore[arg-type]
        for t, tgt in tgts.items():
            n_pred[t] += int((tgt >= 0).sum())
    empty = [t for t, n in n_pred.items() if n == 0]
    if n_tok == 0 or empty:
        raise ValueError(f"evaluate: expected at least one selected token and one predicted token per target set, "
                         f"got {n_tok} selected tokens and no predicted token for {empty}")
    total_var = sum_sq / n_tok - float((sum_x / n_tok).pow(2).sum())
    mse = sum_res / n_tok
    fve = 1.0 - mse / total_var if total_var > 1e-12 else float("nan")
    freq = (n_fire / n_tok).float()
    losses = []
    for t in sets:
        ce_clean, ce_sae, ce_abl = (ce[t][k] / n_pred[t] for k in ("clean", "sae", "ablate"))
        score = float(normalised_effect(torch.tensor(ce_sae), ce_abl, ce_clean))
        losses.append(CELoss(t, n_pred[t], ce_clean, ce_sae, ce_abl, score))
    return SAEEval(
        hook_name=name, variance_explained=fve, mse=mse, l0=l0_sum / n_tok,
        dead_fraction=float((freq == 0).float().mean()), dense_fraction=float((freq > dense_threshold).float().mean()),
        ce=tuple(losses), n_tokens=n_tok, feature_frequency=freq, dense_threshold=dense_threshold,
    )
