"""Linear probes fitted over stacked layers at once, with the controls that keep them honest.

A probe asks "is property y linearly decodable from the activations of this layer at this
position?" (Alain & Bengio 2016). Decodability is cheap to fake, so every fit here reports, next
to the test metric and its bootstrap confidence interval:

- a control task (Hewitt & Liang 2019, "Designing and Interpreting Probes with Control Tasks"):
  each *type* (the word, entity or prompt identity the caller names per example) gets a random
  label drawn from the empirical label distribution; a probe can solve it only by memorising
  types. Selectivity = task metric - control metric.
- a shuffled-label baseline: labels permuted across examples, which should give chance.
- a split by example: rows sharing a group id (the tokens of one prompt) never straddle the
  train/test split, and bootstrap intervals resample groups, not rows.

Probe kinds:

- ``"logistic"``: multinomial logistic regression with an L2 penalty, the objective of
  scikit-learn's ``LogisticRegression(C=C)`` (mean cross-entropy + ||W||^2 / (2 C n), intercept
  unpenalised), on features standardised with training statistics. All layers and label sets
  (task, control, shuffled) are solved together by a batched L-BFGS (compact representation,
  Byrd, Nocedal & Schnabel 1994) with per-problem curvature history and line search; the label
  sets share each pass over a layer's activations, and both passes use the wide-output GEMM
  shape (W X^T and G^T X) that CPU BLAS runs fastest.
- ``"ridge"``: closed-form ridge regression, the objective of scikit-learn's ``Ridge(alpha)``.
  The regularisation strength is chosen from a grid with one eigendecomposition of the Gram
  matrix per layer (and per fold): efficient leave-one-example-out (scikit-learn ``RidgeCV``'s
  criterion, mean squared LOO error) when every example is one row, otherwise grouped k-fold
  with the mean fold R^2 (``GridSearchCV``'s criterion).

Speed: the passes over the activations are the cost, so a layer stops costing passes once all
its problems converge, and the task, control and shuffled problems share each pass. On
standardised features L-BFGS needs about as many passes as scikit-learn's lbfgs (same method,
same objective, same tolerance), so per fit the gain over scikit-learn is modest (bench/probes.py);
the large gain is over scikit-learn on raw activations, whose outlier dimensions leave lbfgs
unconverged at max_iter=100.

Caveats: a fit holds a standardised copy of the train and test rows in float32 (float64 inputs
stay float64); a decodable property is not a used one: pair a probe with an intervention before
claiming a mechanism.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.atomic import atomic_file
from interp.stats import Estimate, bootstrap, bootstrap_many

log = logging.getLogger(__name__)

Kind = Literal["logistic", "ridge"]
KINDS: tuple[str, ...] = ("logistic", "ridge")
LABEL_SETS: tuple[str, ...] = ("task", "control", "shuffled")
DEFAULT_ALPHAS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
FRAME_COLUMNS: tuple[str, ...] = ("model", "hook", "layer", "position", "target", "metric", "value",
                                  "ci_low", "ci_high", "control", "selectivity", "shuffled", "chance",
                                  "kind", "n_train", "n_test", "regularisation")


# ------------------------------------------------------------------------------------ splits


def split_by_group(groups: Int[Tensor, " n"], test_fraction: float = 0.25, seed: int = 0
                   ) -> tuple[Int[Tensor, " n_train"], Int[Tensor, " n_test"]]:
    """Row indices of a train/test split that keeps every group (example) on one side.

    A random `test_fraction` of the distinct group ids (at least one, and at least one left for
    training) goes to the test side; deterministic in `seed`.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")
    uniq, inv = torch.unique(groups.cpu(), return_inverse=True)
    n_groups = uniq.numel()
    if n_groups < 2:
        raise ValueError(f"split_by_group: expected at least 2 distinct groups (examples), got {n_groups}")
    n_test = min(max(1, round(test_fraction * n_groups)), n_groups - 1)
    perm = torch.randperm(n_groups, generator=torch.Generator().manual_seed(seed))
    is_test = torch.zeros(n_groups, dtype=torch.bool)
    is_test[perm[:n_test]] = True
    rows = is_test[inv]
    return torch.nonzero(~rows)[:, 0], torch.nonzero(rows)[:, 0]


def group_folds(groups: Int[Tensor, " n"], k: int, seed: int = 0) -> Int[Tensor, " n"]:
    """Fold id (0..k-1) per row; the rows of a group share a fold; groups dealt round-robin."""
    uniq, inv = torch.unique(groups.cpu(), return_inverse=True)
    if not 2 <= k <= uniq.numel():
        raise ValueError(f"cv folds: expected 2 <= k <= number of groups ({uniq.numel()}), got {k}")
    perm = torch.randperm(uniq.numel(), generator=torch.Generator().manual_seed(seed))
    fold_of_group = torch.empty(uniq.numel(), dtype=torch.long)
    fold_of_group[perm] = torch.arange(uniq.numel()) % k
    return fold_of_group[inv]


# ----------------------------------------------------------------------------- label sets


def control_labels(labels: Tensor, types: Int[Tensor, " n"], seed: int = 0) -> Tensor:
    """Hewitt & Liang control task: one random label per type, drawn from the empirical labels.

    Every row of a type gets the same control label (or regression value), so a probe can only
    solve the control task by memorising type identity. Choose types with many values (a fact
    token, a word): a control over a few types (e.g. 32 entities at the probed position) is
    memorised perfectly by any linear probe, and selectivity then says nothing.
    """
    if types.shape[0] != labels.shape[0]:
        raise ValueError(f"control types: expected one type id per example ({labels.shape[0]}), "
                         f"got {types.shape[0]}")
    uniq, inv = torch.unique(types.cpu(), return_inverse=True)
    g = torch.Generator().manual_seed(seed)
    draw = torch.randint(0, labels.shape[0], (uniq.numel(),), generator=g)
    return labels[draw.to(labels.device)][inv.to(labels.device)]


def shuffled_labels(labels: Tensor, seed: int = 0) -> Tensor:
    """Labels permuted across examples: the chance baseline."""
    perm = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(seed))
    return labels[perm.to(labels.device)]


# ---------------------------------------------------------------------- standardisation


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _standardise(x: Float[Tensor, "layer n d"], train: Tensor, test: Tensor, scale: bool
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train and test rows as (x - mean) / std with training statistics per layer (std ~ 0 -> 1).

    Returns (train rows, test rows, mean, std), each a fresh tensor in the compute dtype.
    """
    dt = _compute_dtype(x)
    xtr = x[:, train.to(x.device)].to(dt)
    xte = x[:, test.to(x.device)].to(dt)
    mean = xtr.mean(dim=1, keepdim=True)  # plain row means: torch's fused std_mean is slow across rows
    xtr.sub_(mean)
    xte.sub_(mean)
    if scale:
        std = torch.stack([(layer * layer).mean(dim=0) for layer in xtr]).sqrt_()[:, None]
        std = torch.where(std > 1e-8 * std.amax(dim=-1, keepdim=True).clamp_min(1e-30), std,
                          torch.ones_like(std))
        xtr.div_(std)
        xte.div_(std)
    else:
        std = torch.ones_like(mean)
    return xtr, xte, mean[:, 0], std[:, 0]


# ------------------------------------------------------------------------ logistic (L-BFGS)


@dataclass(frozen=True)
class LbfgsInfo:
    """Per problem [layer, label set]: iterations run and whether the gradient tolerance was met."""

    n_iter: Int[Tensor, "layer t"]
    converged: Tensor


def lbfgs_direction(g: Float[Tensor, "b p"], s: Float[Tensor, "b m p"], y: Float[Tensor, "b m p"],
                    gamma: Float[Tensor, " b"]) -> Float[Tensor, "b p"]:
    """H g for the L-BFGS inverse-Hessian approximation, in compact form (Byrd, Nocedal & Schnabel
    1994, Thm 2.2): a few batched products instead of the two-loop recursion's 4m small ops.

    History slots are chronological (oldest first); an all-zero slot (no pair yet, or a pair
    rejected for non-positive curvature) contributes nothing.
    """
    a = s @ g[..., None]  # [b, m, 1]
    bg = y @ g[..., None]
    sy = s @ y.transpose(1, 2)  # [b, m, m]
    yy = y @ y.transpose(1, 2)
    diag = torch.diagonal(sy, dim1=1, dim2=2)
    empty = diag <= 0
    r = torch.triu(sy) + torch.diag_embed(empty.to(sy.dtype))
    r_inv_a = torch.linalg.solve_triangular(r, a, upper=True)
    inner = diag.clamp_min(0)[..., None] * r_inv_a + gamma[:, None, None] * (yy @ r_inv_a) - gamma[:, None, None] * bg
    p1 = torch.linalg.solve_triangular(r.transpose(1, 2), inner, upper=False)
    hg = gamma[:, None] * g + (s.transpose(1, 2) @ p1)[..., 0] - gamma[:, None] * (y.transpose(1, 2) @ r_inv_a)[..., 0]
    return hg


def multinomial_lbfgs(
    z: Float[Tensor, "layer n d"],
    labels: Int[Tensor, "t n"],
    n_classes: int,
    *,
    l2: float,
    max_iter: int = 100,
    tol: float = 1e-4,
    history: int = 10,
) -> tuple[Float[Tensor, "layer t k d1"], LbfgsInfo]:
    """Minimise mean cross-entropy + l2/2 ||W||^2 (bias unpenalised) for every layer and label set.

    `z`: (standardised) features per layer; `labels`: one label vector per label set. All label
    sets share each layer's features, so one batched product serves all of them. Returns weights
    [layer, t, k, d + 1] (last column: bias). A problem stops when its largest absolute gradient
    entry is <= `tol` (scipy's pgtol, as scikit-learn uses), or when its relative decrease stalls
    at the dtype's resolution. The curvature history and line search are batched over all
    problems; passes over the activations are made only for layers with a problem still running.
    """
    n_layers, n, d = z.shape
    t_sets, k = labels.shape[0], n_classes
    dt, dev = z.dtype, z.device
    lab = labels.to(dev)[:, None, :]  # [t, 1, n]
    onehot = torch.zeros(t_sets, k, n, dtype=dt, device=dev).scatter_(1, lab, 1.0)
    p_dim = k * (d + 1)

    def evaluate(w: Tensor, layers: list[int], f_out: Tensor, g_out: Tensor) -> None:
        """Objective and gradient of every label set at the given layers (one pass each way)."""
        for layer in layers:
            wk = w[layer].view(t_sets * k, d + 1)
            # W X^T and G^T X: both products have BLAS's fast wide-output shape, no transposed copy
            logits = torch.addmm(wk[:, d:], wk[:, :d], z[layer].T)  # [t*k, n]
            # softmax over the class axis in this layout keeps the residual in G^T layout
            logp = torch.log_softmax(logits.view(t_sets, k, n), dim=1)
            f = -logp.gather(1, lab).sum(dim=(1, 2)) / n
            f_out[layer] = f + 0.5 * l2 * (wk[:, :d] ** 2).view(t_sets, -1).sum(-1)
            resid = ((torch.exp(logp) - onehot) / n).view(t_sets * k, n)
            gw = torch.addmm(wk[:, :d], resid, z[layer], beta=l2)
            g_out[layer] = torch.cat([gw, resid.sum(dim=-1, keepdim=True)], dim=-1).view(t_sets, p_dim)

    w = torch.zeros(n_layers, t_sets, p_dim, dtype=dt, device=dev)
    f = torch.empty(n_layers, t_sets, dtype=dt, device=dev)
    g = torch.empty_like(w)
    evaluate(w, list(range(n_layers)), f, g)
    s_hist = torch.zeros(n_layers * t_sets, history, p_dim, dtype=dt, device=dev)
    y_hist = torch.zeros_like(s_hist)
    n_iter = torch.zeros(n_layers, t_sets, dtype=torch.long, device=dev)
    converged = g.abs().amax(dim=-1) <= tol
    active = ~converged
    stall = 10 * torch.finfo(dt).eps
    gamma = (1.0 / g.abs().sum(-1).clamp_min(1.0)).clamp(max=1.0).flatten()
    for _ in range(max_iter):
        live = torch.nonzero(active.any(dim=1))[:, 0].tolist()  # converged layers cost no passes
        if not live:
            break
        hg = lbfgs_direction(g.flatten(0, 1), s_hist, y_hist, gamma).view(n_layers, t_sets, p_dim)
        direction = -hg * active[..., None]
        slope = (g * direction).sum(-1)
        bad = slope >= 0  # not a descent direction: fall back to the gradient
        direction = torch.where(bad[..., None], -g * active[..., None], direction)
        slope = (g * direction).sum(-1)
        # backtracking Armijo line search; only layers with a pending problem are re-evaluated
        step = torch.ones(n_layers, t_sets, dtype=dt, device=dev)
        f_new, g_new = f.clone(), g.clone()
        pending = active.clone()
        layers = live
        for _ in range(30):
            w_new = w + step[..., None] * direction
            evaluate(w_new, layers, f_new, g_new)
            ok = (f_new <= f + 1e-4 * step * slope) & torch.isfinite(f_new)
            pending = pending & ~ok
            if not bool(pending.any()):
                break
            step = torch.where(pending, step * 0.5, step)
            layers = torch.nonzero(pending.any(dim=1))[:, 0].tolist()
        keep = active & ~pending  # a problem with no acceptable step stops where it is
        s = (w_new - w) * keep[..., None]
        yv = (g_new - g) * keep[..., None]
        sy = (s * yv).sum(-1)
        good = (keep & (sy > 1e-10))[..., None]
        s_hist = torch.cat([s_hist[:, 1:], (s * good).flatten(0, 1)[:, None]], dim=1)
        y_hist = torch.cat([y_hist[:, 1:], (yv * good).flatten(0, 1)[:, None]], dim=1)
        yy = (yv * yv).sum(-1)
        gamma = torch.where(good[..., 0], sy / yy.clamp_min(torch.finfo(dt).tiny),
                            gamma.view(n_layers, t_sets)).flatten()
        decrease = (f - f_new).abs() / torch.maximum(f.abs(), f_new.abs()).clamp_min(1.0)
        w = torch.where(keep[..., None], w_new, w)
        f = torch.where(keep, f_new, f)
        g = torch.where(keep[..., None], g_new, g)
        n_iter += active.long()
        done_now = g.abs().amax(dim=-1) <= tol
        converged |= done_now & active
        active = active & keep & ~done_now & ~(decrease <= stall)
    if bool((~converged).any()):
        log.info("logistic probe: %d of %d problems stopped before max|grad| <= %g (max_iter=%d)",
                 int((~converged).sum()), converged.numel(), tol, max_iter)
    return w.view(n_layers, t_sets, k, d + 1), LbfgsInfo(n_iter=n_iter.cpu(), converged=converged.cpu())


# ------------------------------------------------------------------------------------- ridge


@dataclass(frozen=True)
class _Gram:
    evals: Tensor  # [layer, d]
    evecs: Tensor  # [layer, d, d]
    xty: Tensor  # [layer, d, t] (centred)
    mean_x: Tensor  # [layer, d]
    mean_y: Tensor  # [t]


def _ridge_gram(x: Tensor, y: Tensor) -> _Gram:
    mx = x.mean(dim=1)
    my = y.mean(dim=0)
    xc = x - mx[:, None]
    gram = xc.transpose(1, 2) @ xc
    evals, evecs = torch.linalg.eigh(gram)
    return _Gram(evals.clamp_min(0), evecs, xc.transpose(1, 2) @ (y - my), mx, my)


def _ridge_coef(gram: _Gram, alphas: Tensor) -> Tensor:
    """Coefficients [layer, a, d, t] for every alpha from one eigendecomposition."""
    proj = gram.evecs.transpose(1, 2) @ gram.xty  # [layer, d, t]
    scale = 1.0 / (gram.evals[:, None, :] + alphas[None, :, None])  # [layer, a, d]
    return gram.evecs[:, None] @ (scale[..., None] * proj[:, None])


def _r2(y: Tensor, pred: Tensor, dim: int) -> Tensor:
    y = y.expand_as(pred)
    ss_res = ((y - pred) ** 2).sum(dim)
    ss_tot = ((y - y.mean(dim, keepdim=True)) ** 2).sum(dim)
    return 1.0 - ss_res / ss_tot.clamp_min(torch.finfo(y.dtype).tiny)


def ridge_cv(
    x: Float[Tensor, "layer n d"],
    y: Float[Tensor, "n t"],
    alphas: Sequence[float],
    *,
    folds: Int[Tensor, " n"] | None = None,
) -> tuple[Float[Tensor, "layer t d"], Float[Tensor, "layer t"], Float[Tensor, "layer t"]]:
    """Ridge with an intercept and the alpha chosen per layer and target column by CV.

    `folds=None`: efficient leave-one-row-out from one eigendecomposition per layer, scored by
    mean squared LOO error (scikit-learn ``RidgeCV`` with ``cv=None``). `folds` given: k-fold on
    those fold ids, one eigendecomposition per fold, scored by the mean over folds of R^2
    (``GridSearchCV(Ridge())``'s default). Returns (coef, intercept, chosen alpha).
    """
    dt = x.dtype
    a = torch.as_tensor(list(alphas), dtype=dt, device=x.device)
    if a.ndim != 1 or a.numel() == 0 or bool((a <= 0).any()):
        raise ValueError(f"ridge alphas: expected a non-empty list of positive values, got {list(alphas)}")
    y = y.to(dt)
    n = x.shape[1]
    if folds is None:
        gram = _ridge_gram(x, y)
        coef = _ridge_coef(gram, a)  # [layer, a, d, t]
        xc = x - gram.mean_x[:, None]
        xv = xc @ gram.evecs  # [layer, n, d]
        shrink = 1.0 / (gram.evals[:, None, :] + a[None, :, None])  # [layer, a, d]
        lev = 1.0 / n + (xv ** 2 @ shrink.transpose(1, 2)).transpose(1, 2)  # [layer, a, n]
        pred = xc[:, None] @ coef + gram.mean_y  # [layer, a, n, t]
        loo = (y - pred) / (1.0 - lev)[..., None].clamp_min(torch.finfo(dt).eps)
        score = -(loo ** 2).mean(dim=2)  # [layer, a, t]
    else:
        fold_ids = torch.unique(folds)
        scores = []
        for fid in fold_ids.tolist():
            held = (folds == fid).to(x.device)
            gram = _ridge_gram(x[:, ~held], y[~held])
            coef = _ridge_coef(gram, a)
            intercept = gram.mean_y - (gram.mean_x[:, None, None, :] @ coef)[..., 0, :]  # [layer, a, t]
            pred = x[:, None, held] @ coef + intercept[:, :, None, :]
            scores.append(_r2(y[held], pred, dim=2))  # [layer, a, t]
        score = torch.stack(scores).mean(0)
    best = score.argmax(dim=1)  # [layer, t]; ties go to the smallest alpha index, as in scikit-learn
    chosen = a[best]  # [layer, t]
    if folds is not None:  # refit on all rows (the LOO path already holds the full decomposition)
        gram = _ridge_gram(x, y)
        coef = _ridge_coef(gram, a)
    coef_all = coef  # [layer, a, d, t]
    idx = best[:, None, None, :].expand(-1, 1, coef_all.shape[2], -1)
    coef = coef_all.gather(1, idx)[:, 0].transpose(1, 2)  # [layer, t, d]
    intercept = gram.mean_y - (coef @ gram.mean_x[..., None])[..., 0]
    return coef, intercept, chosen


# -------------------------------------------------------------------------------- metrics + CIs


def _group_ci(sums: Tensor, statistic: Callable[[Tensor], Tensor], *, n_boot: int, alpha: float,
              seed: int) -> Estimate:
    """Cluster bootstrap: resample groups (rows of `sums`, additive per-group totals)."""
    ids = torch.arange(sums.shape[0], dtype=torch.float64)[:, None]  # 2-D: stats.bootstrap's [n, k] path

    def stat(gid: Tensor) -> Tensor:
        return statistic(sums[gid[..., 0, :].long()].sum(dim=-2))

    return bootstrap(ids, stat, n_boot=n_boot, alpha=alpha, seed=seed)


def _accuracy_ci(correct: Tensor, group: Tensor, **kw: Any) -> Estimate:
    sums = torch.zeros(int(group.max()) + 1, 2, dtype=torch.float64)
    sums.index_add_(0, group, torch.stack([correct.double(), torch.ones_like(correct, dtype=torch.float64)], 1))
    return _group_ci(sums, lambda s: s[..., 0] / s[..., 1], **kw)


def _r2_ci(y: Tensor, pred: Tensor, group: Tensor, **kw: Any) -> Estimate:
    y, pred = y.double(), pred.double()
    parts = torch.stack([torch.ones_like(y), y, y * y, (y - pred) ** 2], 1)
    sums = torch.zeros(int(group.max()) + 1, 4, dtype=torch.float64).index_add_(0, group, parts)

    def r2(s: Tensor) -> Tensor:
        ss_tot = s[..., 2] - s[..., 1] ** 2 / s[..., 0]
        return 1.0 - s[..., 3] / ss_tot.clamp_min(1e-300)

    return _group_ci(sums, r2, **kw)


# ------------------------------------------------------------------------------------ result


@dataclass(frozen=True)
class ProbeResult:
    """Test metrics of one probe kind over stacked layers, with control and shuffled baselines.

    `value`, `ci_low`, `ci_high`: test accuracy (logistic) or R^2 (ridge) of the task probe per
    layer and its bootstrap CI over test examples; `control` / `shuffled`: the same metric for
    the Hewitt-Liang control task and for shuffled labels (NaN when no control types were
    given); `chance`: majority-class accuracy (0 for R^2). `coef` / `intercept`: the task probe
    in the units of the input features. `regularisation`: C (logistic) or the CV-chosen alpha
    per layer (ridge).
    """

    kind: str
    metric: str
    layers: tuple[int, ...]
    value: Float[Tensor, " layer"]
    ci_low: Float[Tensor, " layer"]
    ci_high: Float[Tensor, " layer"]
    control: Float[Tensor, " layer"]
    shuffled: Float[Tensor, " layer"]
    chance: float
    coef: Float[Tensor, "layer k d"]
    intercept: Float[Tensor, "layer k"]
    regularisation: Float[Tensor, " layer"]
    n_train: int
    n_test: int
    classes: Tensor | None = None
    n_iter: Tensor | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def values(self) -> Float[Tensor, " layer"]:
        return self.value

    @property
    def selectivity(self) -> Float[Tensor, " layer"]:
        """Task metric minus control metric (Hewitt & Liang 2019)."""
        return self.value - self.control

    def predict(self, features: Float[Tensor, "layer n d"]) -> Tensor:
        """Class labels (logistic) or predicted values (ridge) per layer, [layer, n]."""
        x = features.to(self.coef.device, self.coef.dtype)
        out = x @ self.coef.transpose(1, 2) + self.intercept[:, None, :]
        if self.kind == "logistic":
            if self.classes is None:
                raise ValueError("ProbeResult.predict: expected the class ids of a logistic probe, got None")
            return self.classes[out.argmax(-1)]
        return out[..., 0]

    def to_frame(self) -> pd.DataFrame:
        """One row per layer, columns `FRAME_COLUMNS`."""
        m = dict(self.meta)
        rows = []
        for i, layer in enumerate(self.layers):
            rows.append({
                "model": m.get("model", ""), "hook": m.get("hook", ""), "layer": layer,
                "position": m.get("position", ""), "target": m.get("target", ""),
                "metric": self.metric, "value": float(self.value[i]), "ci_low": float(self.ci_low[i]),
                "ci_high": float(self.ci_high[i]), "control": float(self.control[i]),
                "selectivity": float(self.selectivity[i]), "shuffled": float(self.shuffled[i]),
                "chance": self.chance, "kind": self.kind, "n_train": self.n_train, "n_test": self.n_test,
                "regularisation": float(self.regularisation[i]),
            })
        return pd.DataFrame(rows, columns=list(FRAME_COLUMNS))

    def plot(self) -> go.Figure:
        return plot_frame(self.to_frame())

    def save(self, out: str | Path, title: str = "Probe results") -> dict[str, Path]:
        return save_frame(self.to_frame(), out, title=title)


def plot_frame(frame: pd.DataFrame, title: str = "") -> go.Figure:
    """Task, control and shuffled curves over layers (CI band on the task), one set per cell."""
    from interp.viz import curves

    keys = ["model", "hook", "position", "target"]
    label = frame[keys].astype(str).agg(" ".join, axis=1).str.strip()
    task = frame.assign(series=label + " task")
    base = [frame.assign(series=label + " " + name, value=frame[name], ci_low=frame[name],
                         ci_high=frame[name]) for name in ("control", "shuffled")]
    tidy = pd.concat([task, *base], ignore_index=True).dropna(subset=["value"])
    metric = ", ".join(sorted(frame["metric"].unique()))
    return curves(tidy, x="layer", y="value", group="series", low="ci_low", high="ci_high",
                  title=title or f"Probe {metric} by layer (task with 95% CI; control; shuffled)",
                  y_title=metric)


def save_frame(frame: pd.DataFrame, out: str | Path, title: str = "Probe results") -> dict[str, Path]:
    """Write `frame` as probes.parquet, probes.csv and an offline probes.html (atomically)."""
    from interp.report import Report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"parquet": out / "probes.parquet", "csv": out / "probes.csv", "html": out / "probes.html"}
    with atomic_file(paths["parquet"]) as tmp:
        frame.to_parquet(tmp, index=False)
    with atomic_file(paths["csv"]) as tmp:
        frame.to_csv(tmp, index=False)
    report = Report(title)
    groups = frame.groupby(["model", "metric"], sort=False) if len(frame) else []
    for (model, metric), sub in groups:
        report.add(f"{model}: {metric}", "Task probe with its bootstrap CI over test examples; "
                   "control task (Hewitt & Liang 2019) and shuffled labels as baselines. "
                   "Selectivity = task - control.", [plot_frame(sub)])
    report.add("Table", table_html=frame.to_html(index=False, float_format=lambda v: f"{v:.4g}"))
    report.write(paths["html"])
    return paths


# --------------------------------------------------------------------------------------- fit


def check_finite_rows(features: Float[Tensor, "layer n d"], labels: Tensor) -> None:
    """Raise when a feature row (at any layer) or a label is NaN/Inf, naming rows and layers.

    A single non-finite row poisons the training mean and so every standardised row: the
    logistic fit falls to chance on every layer and the ridge fit fails in its eigensolver.
    One isfinite reduction per layer (no copy of the features is kept).
    """
    bad_rows = torch.zeros(features.shape[1], dtype=torch.bool, device=features.device)
    bad_layers = []
    for i, layer in enumerate(features):
        row_bad = ~torch.isfinite(layer).all(dim=-1)
        if bool(row_bad.any()):
            bad_layers.append(i)
            bad_rows |= row_bad
    if bad_layers:
        rows = torch.nonzero(bad_rows)[:, 0].tolist()
        raise ValueError(f"probe features: expected finite values, got NaN/Inf in {len(rows)} of "
                         f"{features.shape[1]} rows {rows[:10]}{' ...' if len(rows) > 10 else ''} at "
                         f"layers {bad_layers}; drop those rows (e.g. features[:, keep], labels[keep]) "
                         f"or fix the activations that produced them")
    if labels.is_floating_point() and not bool(torch.isfinite(labels).all()):
        rows = torch.nonzero(~torch.isfinite(labels))[:, 0].tolist()
        raise ValueError(f"probe labels: expected finite values, got NaN/Inf at rows {rows[:10]}"
                         f"{' ...' if len(rows) > 10 else ''}; drop those rows")


def fit(
    features: Float[Tensor, "layer n d"],
    labels: Int[Tensor, " n"] | Float[Tensor, " n"],
    kind: Kind = "logistic",
    *,
    groups: Int[Tensor, " n"] | None = None,
    types: Int[Tensor, " n"] | None = None,
    layers: Sequence[int] | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
    standardize: bool = True,
    C: float = 1.0,
    max_iter: int = 100,
    tol: float = 1e-4,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    cv: int | None = None,
    shuffled: bool = True,
    n_boot: int = 1000,
    ci: float = 0.95,
    meta: Mapping[str, Any] | None = None,
) -> ProbeResult:
    """Fit one probe kind on every layer of `features` at once; test on held-out examples.

    `labels`: class ids (logistic) or regression targets (ridge), one per row. `groups`: example
    id per row (rows of one example never straddle the split; default: every row its own
    example). `types`: the Hewitt-Liang type per row (word, entity or prompt identity) for the
    control task; without it the control is NaN. `standardize`: z-score features with training
    statistics (logistic always standardises: C then refers to standardised features).
    `cv` (ridge): None = leave-one-example-out when groups are all distinct, else 5 grouped
    folds; an int = that many grouped folds. `meta` (model, hook, position, target) labels the
    frame.
    """
    if kind not in KINDS:
        raise ValueError(f"probe kind: expected one of {list(KINDS)}, got {kind!r}")
    if not isinstance(features, Tensor) or not features.is_floating_point():
        raise TypeError(f"probe features: expected a floating-point tensor (layer, n, d), got "
                        f"{features.dtype if isinstance(features, Tensor) else type(features).__name__}")
    if not isinstance(labels, Tensor) or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"probe labels: expected an integer or float tensor (n,), got "
                        f"{labels.dtype if isinstance(labels, Tensor) else type(labels).__name__}")
    if features.ndim != 3 or 0 in features.shape:
        raise ValueError(f"probe features: expected (layer, n, d) with no empty axis, got shape "
                         f"{tuple(features.shape)}" + ("; add a layer axis with features[None]"
                                                       if features.ndim == 2 else ""))
    n_layers, n, _ = features.shape
    if labels.shape != (n,):
        raise ValueError(f"probe labels: expected shape ({n},) (one per row), got {tuple(labels.shape)}")
    for what, ids in (("groups", groups), ("types", types)):
        if ids is not None and (not isinstance(ids, torch.Tensor) or ids.shape != (n,)):
            raise ValueError(f"probe {what}: expected a tensor of shape ({n},) (one id per row), got "
                             f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    check_finite_rows(features, labels)
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci: expected a level in (0, 1), got {ci}")
    if C <= 0:
        raise ValueError(f"C: expected a positive inverse regularisation strength, got {C}")
    layer_ids = tuple(range(n_layers)) if layers is None else tuple(int(v) for v in layers)
    if len(layer_ids) != n_layers:
        raise ValueError(f"layers: expected {n_layers} layer ids (one per stacked layer), got {len(layer_ids)}")
    group = torch.arange(n) if groups is None else groups.cpu().long()
    train, test = split_by_group(group, test_fraction, seed)
    labels = labels.to(features.device)

    sets = [labels]
    if types is not None:
        sets.append(control_labels(labels, types.to(labels.device), seed=seed + 1))
    if shuffled:
        sets.append(shuffled_labels(labels, seed=seed + 2))
    names = ["task"] + (["control"] if types is not None else []) + (["shuffled"] if shuffled else [])
    _, test_group = torch.unique(group[test], return_inverse=True)
    boot = dict(n_boot=n_boot, alpha=1.0 - ci, seed=seed)

    xtr, xte, mean, std = _standardise(features, train, test, scale=standardize or kind == "logistic")
    dt = xtr.dtype
    if kind == "logistic":
        if labels.dtype.is_floating_point:
            raise ValueError(f"logistic probe labels: expected integer class ids, got dtype {labels.dtype}")
        classes, coded = torch.unique(torch.stack(sets), return_inverse=True)  # [t, n] class index
        k = classes.numel()
        if k < 2:
            raise ValueError(f"logistic probe labels: expected at least 2 classes, got {classes.tolist()}")
        w, info = multinomial_lbfgs(xtr, coded[:, train.to(coded.device)], k, l2=1.0 / (C * train.numel()),
                                    max_iter=max_iter, tol=tol)
        weight, bias = w[..., :-1], w[..., -1]  # [layer, t, k, d], [layer, t, k]
        pred = (torch.einsum("lnd,ltkd->ltnk", xte, weight) + bias[:, :, None, :]).argmax(-1)  # [l, t, n]
        correct = (pred == coded[:, test.to(coded.device)][None]).cpu()
        metric = "accuracy"
        counts = torch.bincount(coded[0, train.to(coded.device)].cpu(), minlength=k)
        chance = float((coded[0, test.to(coded.device)].cpu() == counts.argmax()).double().mean())
        if test_group.numel() == int(test_group.max()) + 1:  # one row per example: one call for all layers
            mid, low, high = bootstrap_many(correct[:, 0].T.double(), **boot)
            est = [Estimate(float(a), float(b), float(c)) for a, b, c in zip(mid, low, high, strict=True)]
        else:
            est = [_accuracy_ci(correct[i, 0], test_group, **boot) for i in range(n_layers)]
        other = {name: correct[:, j].double().mean(-1) for j, name in enumerate(names)}
        reg = torch.full((n_layers,), float(C), dtype=torch.float64)
        coef, intercept = weight[:, 0], bias[:, 0]
        n_iter = info.n_iter
        class_ids = classes.cpu()
    else:
        y = torch.stack(sets, 1).to(dt)  # [n, t]
        folds = None
        if cv is not None or torch.unique(group[train]).numel() < train.numel():
            folds = group_folds(group[train], 5 if cv is None else cv, seed=seed)
        w, b, chosen = ridge_cv(xtr, y[train.to(y.device)], alphas,
                                folds=None if folds is None else folds.to(xtr.device))
        pred = (xte @ w.transpose(1, 2) + b[:, None, :]).cpu()  # [layer, n_test, t]
        ytest = y[test.to(y.device)].cpu()
        metric = "r2"
        chance = 0.0
        est = [_r2_ci(ytest[:, 0], pred[i, :, 0], test_group, **boot) for i in range(n_layers)]
        other = {name: _r2(ytest[:, j], pred[:, :, j], dim=1).double() for j, name in enumerate(names)}
        reg = chosen[:, 0].double().cpu()
        coef, intercept = w[:, :1], b[:, :1]  # [layer, 1, d], [layer, 1]
        n_iter, class_ids = None, None
    # back to the units of the input features: x_std = (x - mean) / std
    coef_raw = coef / std[:, None, :]
    intercept_raw = intercept - (coef_raw * mean[:, None, :]).sum(-1)
    nan = torch.full((n_layers,), float("nan"), dtype=torch.float64)
    return ProbeResult(
        kind=kind, metric=metric, layers=layer_ids,
        value=torch.tensor([e.value for e in est], dtype=torch.float64),
        ci_low=torch.tensor([e.low for e in est], dtype=torch.float64),
        ci_high=torch.tensor([e.high for e in est], dtype=torch.float64),
        control=other.get("control", nan), shuffled=other.get("shuffled", nan), chance=chance,
        coef=coef_raw.detach().cpu(), intercept=intercept_raw.detach().cpu(), regularisation=reg,
        n_train=int(train.numel()), n_test=int(test.numel()), classes=class_ids, n_iter=n_iter,
        meta=dict(meta or {}),
    )

