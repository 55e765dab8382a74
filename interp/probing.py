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
  unpenalised), on features standardised with training statistics, solved by
  `multinomial_lbfgs` (the toolkit's one logistic solver; the future lens uses it too): L-BFGS
  in compact form (Byrd, Nocedal & Schnabel 1994) with scipy's defaults, one layer at a time,
  the label sets (task, control, shuffled) stacked so that they share every pass over the layer.
- ``"ridge"``: closed-form ridge regression, the objective of scikit-learn's ``Ridge(alpha)``.
  The regularisation strength is chosen from a grid with one eigendecomposition of the Gram
  matrix per layer (and per fold): efficient leave-one-example-out (scikit-learn ``RidgeCV``'s
  criterion, mean squared LOO error) when every example is one row, otherwise grouped k-fold
  with the mean fold R^2 (``GridSearchCV``'s criterion).

Speed: the passes over the activations are the cost. Each L-BFGS iteration makes exactly two,
a logit product for the search direction and a gradient product: logits are linear in the
weights, so the strong-Wolfe line search tries steps on [t, k, n] logits without touching the
activations. The label sets share each pass (one [t * k, d] weight matrix), a finished label set
leaves the batch, and the features are standardised one layer at a time in a reused buffer.
bench/probes.py compares the fit with the time of its passes alone ("ratio to floor") and with
scikit-learn (same iterations from the same start; the gain is largest when the label sets run
together, and over scikit-learn on raw activations, whose outlier dimensions leave lbfgs
unconverged at max_iter=100).

Caveats: a logistic fit holds one layer's standardised training rows at a time, a ridge fit a
standardised copy of all train and test rows (float32; float64 inputs stay float64); a decodable property is not a used one: pair a probe with an
intervention before claiming a mechanism.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float, Int
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
class LogisticFit:
    """Multinomial logistic regressions per [layer, label set], fitted by `multinomial_lbfgs`.

    `weight` / `bias` act on standardised features z = (x - mean) / scale (mean 0 and scale 1
    when the fit did not standardise). Per problem: `n_iter` (iterations run) and `converged`
    (max |gradient| <= tol). Per layer, the passes over that layer's rows: `n_forward[layer, j]`
    logit products (one per iteration, plus one for a warm start) and `n_gradient[layer, j]`
    gradient products (one per iteration, plus one at the start) made while j + 1 label sets were
    still running (each such product has j + 1 label sets' classes as its width). Line-search
    trials make no pass (see `multinomial_lbfgs`).
    """

    weight: Float[Tensor, "layer t k d"]
    bias: Float[Tensor, "layer t k"]
    mean: Float[Tensor, "layer d"]
    scale: Float[Tensor, "layer d"]
    n_iter: Int[Tensor, "layer t"]
    converged: Bool[Tensor, "layer t"]
    n_forward: Int[Tensor, "layer t"]
    n_gradient: Int[Tensor, "layer t"]

    def raw(self) -> tuple[Float[Tensor, "layer t k d"], Float[Tensor, "layer t k"]]:
        """(coef, intercept) in the units of the input features: logits = x coef^T + intercept."""
        coef = self.weight / self.scale[:, None, None, :]
        return coef, self.bias - (coef * self.mean[:, None, None, :]).sum(-1)

    def logits(self, x: Float[Tensor, "layer n d"], rows: Int[Tensor, " m"] | None = None
               ) -> Float[Tensor, "layer t m k"]:
        """Every label set's logits on raw features (the rows `rows` of each layer, default all),
        computed as `ProbeResult.predict` does."""
        coef, intercept = self.raw()
        out = []
        for layer in range(x.shape[0]):
            xl = x[layer] if rows is None else x[layer].index_select(0, rows.to(x.device))
            xl = xl.to(coef.device, coef.dtype)
            out.append(torch.stack([_linear_logits(xl, coef[layer, j], intercept[layer, j])
                                    for j in range(coef.shape[1])]))
        return torch.stack(out)


def _linear_logits(x: Float[Tensor, "n d"], coef: Float[Tensor, "k d"], intercept: Float[Tensor, " k"]
                   ) -> Float[Tensor, "n k"]:
    """x coef^T + intercept: the one place probe predictions are computed (fit and predict agree)."""
    return torch.addmm(intercept, x, coef.T)


@dataclass
class _History:
    """L-BFGS curvature pairs of a batch of problems in a ring buffer, with their Gram matrix.

    `flat[:, i]` is the step s of slot i (i < m) or the gradient change y of slot i - m; the
    pairs are written in place and `order` lists the flat slots oldest first, so adding a pair
    copies no history. The Gram matrix of all slots is updated with one product per new pair.
    Mutable on purpose: it is the solver's private working state.
    """

    flat: Tensor  # [b, 2m, p]
    gram: Tensor  # [b, 2m, 2m]
    head: int = 0  # the slot the next pair overwrites (the oldest)

    @property
    def m(self) -> int:
        return self.flat.shape[1] // 2

    def order(self) -> Tensor:
        m = self.m
        ring = [(self.head + i) % m for i in range(m)]
        return torch.tensor(ring + [m + i for i in ring], device=self.flat.device)

    def push_(self, s: Tensor, y: Tensor) -> None:
        m, slot = self.m, self.head
        self.flat[:, slot] = s
        self.flat[:, m + slot] = y
        fresh = torch.stack([s, y], dim=1) @ self.flat.transpose(1, 2)  # [b, 2, 2m]: new s, y . every slot
        new = [slot, m + slot]
        self.gram[:, new, :] = fresh
        self.gram[:, :, new] = fresh.transpose(1, 2)
        self.head = (slot + 1) % m

    def keep(self, rows: Tensor) -> _History:
        return _History(flat=self.flat[rows], gram=self.gram[rows], head=self.head)


def _lbfgs_direction(g: Float[Tensor, "b p"], hist: _History, gamma: Float[Tensor, " b"]) -> Float[Tensor, "b p"]:
    """H g for the L-BFGS inverse-Hessian approximation, in compact form (Byrd, Nocedal & Schnabel
    1994, Thm 2.2): two batched products with the history [S; Y] and its kept Gram matrix
    instead of the two-loop recursion's 4m small ops. An all-zero slot (no pair yet, or a pair
    rejected for non-positive curvature) contributes nothing.
    """
    m = hist.m
    idx = hist.order()  # chronological: the compact form's triangular factor needs it
    # row-vector products ([b, 1, p] @ [b, p, 2m]): CPU bmm is slow with a single output column
    proj = (g[:, None, :] @ hist.flat.transpose(1, 2))[:, 0, idx, None]  # [b, 2m, 1]: S g, Y g
    a, bg = proj[:, :m], proj[:, m:]
    gram = hist.gram[:, idx][:, :, idx]
    sy, yy = gram[:, :m, m:], gram[:, m:, m:]
    diag = torch.diagonal(sy, dim1=1, dim2=2)
    empty = diag <= 0
    r = torch.triu(sy) + torch.diag_embed(empty.to(sy.dtype))
    r_inv_a = torch.linalg.solve_triangular(r, a, upper=True)
    gam = gamma[:, None, None]
    inner = diag.clamp_min(0)[..., None] * r_inv_a + gam * (yy @ r_inv_a) - gam * bg
    p1 = torch.linalg.solve_triangular(r.transpose(1, 2), inner, upper=False)
    coeff = torch.empty_like(proj)
    coeff[:, idx] = torch.cat([p1, -gam * r_inv_a], dim=1)  # back to ring order
    return gamma[:, None] * g + (coeff.transpose(1, 2) @ hist.flat)[:, 0]


@dataclass(frozen=True)
class _Line:
    """The restriction phi(a) = f(w + a d) of one layer's objectives to a line, per problem.

    Logits are linear in the parameters, so with `logits` (at w) and `slope` (d's logits, one
    product over the rows) every trial step costs a softmax over [t, k, n], not a pass over the
    activations. Penalty terms and the labels' logit sums are precomputed in float64.
    """

    logits: Tensor  # [t, k, n] at w
    slope: Tensor  # [t, k, n]: d's logits (bias included)
    label_logit: Tensor  # [t]: sum_i logits[y_i, i]
    label_slope: Tensor  # [t]: sum_i slope[y_i, i]
    ww: Tensor  # [t]: ||W||^2 (weights only: the bias is not penalised)
    wd: Tensor  # [t]: <W, D>
    dd: Tensor  # [t]: ||D||^2
    l2: float
    n: int

    def at(self, step: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(phi, phi', logits, softmax) at a step per problem; phi and phi' in float64."""
        logits = torch.addcmul(self.logits, self.slope, step.to(self.logits.dtype)[:, None, None])
        top = logits.amax(dim=1, keepdim=True)
        prob = torch.sub(logits, top).exp_()
        total = prob.sum(dim=1, keepdim=True)
        prob.div_(total)
        lse = (total.log_() + top).sum(dim=(1, 2), dtype=torch.float64)
        s = step.to(torch.float64)
        f = (lse - self.label_logit - s * self.label_slope) / self.n + 0.5 * self.l2 * (
            self.ww + s * (2 * self.wd + s * self.dd))
        dot = torch.linalg.vecdot(prob.flatten(1), self.slope.flatten(1))
        df = (dot.to(torch.float64) - self.label_slope) / self.n + self.l2 * (self.wd + s * self.dd)
        return f, df, logits, prob


def _line_search(line: _Line, f0: Tensor, d0: Tensor, first: Tensor, *, rounds: int = 30, c1: float = 1e-4,
                 c2: float = 0.9) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A strong-Wolfe step per problem along a convex line (phi' increases with the step).

    Tries `first`, expands by 4 until the minimiser is bracketed, then takes the secant of phi'
    (safeguarded towards bisection). Near the optimum a decrease can fall below the rounding of
    phi; there the sufficient-decrease test is the approximate one of Hager & Zhang (2005):
    phi within rounding of phi(0) and phi' <= (2 * 0.1 - 1) phi'(0), which on a convex line
    also guarantees descent and is decided by the accurately computed phi'. Returns (step, phi,
    logits, softmax, moved) at the step; a problem that finds no acceptable step does not move.
    The per-problem bookkeeping is on Python floats (a handful of problems): each trial costs
    one softmax over the logits and no tensor ops per problem.
    """
    eps = 100 * torch.finfo(line.logits.dtype).eps
    phi0, slope0 = f0.tolist(), d0.tolist()
    pending = [d < 0 for d in slope0]
    step = [s if p else 0.0 for s, p in zip(first.tolist(), pending, strict=True)]
    lo, d_lo = [0.0] * len(step), list(slope0)
    hi, d_hi = [math.inf] * len(step), [math.nan] * len(step)
    at = f0.new_tensor(step)
    for _ in range(rounds):
        f, df, logits, prob = line.at(at)
        if not any(pending):
            break
        fs, dfs = f.tolist(), df.tolist()
        for i, (fi, di) in enumerate(zip(fs, dfs, strict=True)):
            if not pending[i]:
                continue
            p0, s0, a = phi0[i], slope0[i], step[i]
            enough = math.isfinite(fi) and (fi <= p0 + c1 * a * s0 or (fi <= p0 + eps * abs(p0) and di <= -0.8 * s0))
            if enough and abs(di) <= -c2 * s0:
                pending[i] = False
                continue
            # convex phi: a step past the minimiser, or without enough decrease, bounds it from above
            if not enough or di >= 0:
                hi[i], d_hi[i] = a, di
            else:
                lo[i], d_lo[i] = a, di
            width = hi[i] - lo[i]
            if math.isinf(hi[i]):
                step[i] = 4 * a
            elif d_hi[i] > 0:  # secant of phi' between the bracket ends (d_lo < 0 < d_hi)
                sec = lo[i] - d_lo[i] * width / (d_hi[i] - d_lo[i])
                step[i] = min(max(sec, lo[i] + 0.1 * width), hi[i] - 0.1 * width)
            else:
                step[i] = lo[i] + 0.5 * width
        if not any(pending):
            break
        at = f0.new_tensor(step)
    moved = [s0 < 0 and a > 0 for s0, a in zip(slope0, step, strict=True)]
    if any(pending):  # no strong-Wolfe point: the last sufficient decrease (lo), or no move
        for i in range(len(step)):
            if pending[i]:
                step[i], moved[i] = lo[i], moved[i] and lo[i] > 0
        at = f0.new_tensor(step)
        f, _, logits, prob = line.at(at)
    return at, f, logits, prob, torch.tensor(moved, device=f0.device)


def _lbfgs_layer(x: Tensor, lab: Tensor, k: int, start: Tensor | None, *, l2: float, max_iter: int,
                 tol: float, history: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One layer's problems (one per label set) from `start` (or zeros); see `multinomial_lbfgs`.

    A problem that stops leaves the batch, so later passes are narrower.
    """
    n, d = x.shape
    t, q = lab.shape[0], d + 1
    p_dim = k * q
    dt, dev, f64 = x.dtype, x.device, torch.float64
    w_out = torch.zeros(t, k, q, dtype=dt, device=dev)
    n_iter = torch.zeros(t, dtype=torch.long)
    converged = torch.zeros(t, dtype=torch.bool)
    n_forward = torch.zeros(t, dtype=torch.long)
    n_gradient = torch.zeros(t, dtype=torch.long)
    minus_one = torch.full((1, 1, n), -1.0, dtype=dt, device=dev)

    def logit_product(v: Tensor) -> Tensor:  # [b, k, q] -> [b, k, n]: one pass over x
        vk = v.reshape(-1, q)
        n_forward[v.shape[0] - 1] += 1
        return torch.addmm(vk[:, d:], vk[:, :d], x.T).view(v.shape[0], k, n)

    def gradient(w: Tensor, prob: Tensor, lab_b: Tensor) -> Tensor:  # softmax -> gradient: one pass over x
        b = w.shape[0]
        resid = prob.scatter_add_(1, lab_b, minus_one.expand(b, 1, n)).view(b * k, n)  # in place: P - Y
        wk = w.reshape(b * k, q)
        gw = torch.addmm(wk[:, :d], resid, x, beta=l2, alpha=1.0 / n)
        n_gradient[b - 1] += 1
        return torch.cat([gw, resid.sum(dim=-1, keepdim=True).div_(n)], dim=-1).view(b, k, q)

    def line_to(w: Tensor, logits: Tensor, label_logit: Tensor, ww: Tensor, direction: Tensor, lab_b: Tensor
                ) -> _Line:
        # label_logit and ww are carried along the steps (phi at step 0 is then exactly the f the
        # previous line search accepted); the direction's terms are computed fresh
        slope = logit_product(direction)
        wv, dv = w[..., :d], direction[..., :d]
        return _Line(logits=logits, slope=slope, label_logit=label_logit,
                     label_slope=slope.gather(1, lab_b).sum(dim=(1, 2)).to(f64), ww=ww,
                     wd=(wv * dv).sum(dim=(1, 2)).to(f64), dd=(dv * dv).sum(dim=(1, 2)).to(f64), l2=l2, n=n)

    def moved_along(line: _Line, step: Tensor) -> tuple[Tensor, Tensor]:  # (label_logit, ww) at the step
        return line.label_logit + step * line.label_slope, line.ww + step * (2 * line.wd + step * line.dd)

    f0 = torch.full((t,), math.log(k), dtype=f64, device=dev)  # the objective at w = 0
    logits = torch.zeros(t, k, n, dtype=dt, device=dev)
    w = torch.zeros(t, k, q, dtype=dt, device=dev)
    label_logit = ww = torch.zeros(t, dtype=f64, device=dev)
    if start is None:
        f, prob = f0, torch.full_like(logits, 1.0 / k)
    else:  # warm start: the best multiple of the previous layer's solution (0 if none helps)
        line = line_to(w, logits, label_logit, ww, start, lab)
        _, d0, _, _ = line.at(torch.zeros(t, dtype=f64, device=dev))
        step, f, logits, prob, moved = _line_search(line, f0, d0, torch.ones_like(d0))
        w = start * step.to(dt)[:, None, None]
        f = torch.where(moved, f, f0)
        label_logit, ww = moved_along(line, step)
    g = gradient(w, prob, lab)
    live = torch.arange(t, device=dev)
    lab_b = lab
    hist = _History(flat=torch.zeros(t, 2 * history, p_dim, dtype=dt, device=dev),
                    gram=torch.zeros(t, 2 * history, 2 * history, dtype=dt, device=dev))
    gamma = torch.ones(t, dtype=dt, device=dev)
    first_iter = torch.ones(t, dtype=torch.bool, device=dev)  # no curvature pair yet
    iters = torch.zeros(t, dtype=torch.long, device=dev)
    stall = 10 * torch.finfo(dt).eps
    done = torch.linalg.vector_norm(g.view(t, p_dim), ord=math.inf, dim=-1) <= tol
    finished = done
    scale_first = True  # some problem has no curvature pair yet: its first step is scaled
    for it in range(max_iter + 1):
        if bool(finished.any()):  # write the finished problems out; the rest continue narrower
            idx = live[finished]
            w_out[idx], n_iter[idx.cpu()] = w[finished], iters[finished].cpu()
            converged[idx.cpu()] = done[finished].cpu()
            keep = ~finished
            live, lab_b, w, logits, f, g = live[keep], lab_b[keep], w[keep], logits[keep], f[keep], g[keep]
            label_logit, ww = label_logit[keep], ww[keep]
            hist, gamma, first_iter, iters = hist.keep(keep), gamma[keep], first_iter[keep], iters[keep]
        b = live.numel()
        if b == 0 or it == max_iter:
            break
        gf = g.view(b, p_dim)
        direction = -_lbfgs_direction(gf, hist, gamma)
        d0 = (gf * direction).sum(-1, dtype=f64)
        bad = ~(d0 < 0)  # not a descent direction (rounding): fall back to the gradient
        if bool(bad.any()):
            direction = torch.where(bad[:, None], -gf, direction)
            d0 = (gf * direction).sum(-1, dtype=f64)
        # unit steps for quasi-Newton directions; a gradient step of length 1 without curvature yet
        first = torch.ones_like(d0)
        if scale_first or bool(bad.any()):
            first = torch.where(bad, gamma.to(f64), torch.where(
                first_iter, 1.0 / gf.norm(dim=-1).to(f64).clamp_min(1e-30), first))
        line = line_to(w, logits, label_logit, ww, direction.view(b, k, q), lab_b)
        step, f_new, logits, prob, moved = _line_search(line, f, d0, first)
        label_logit, ww = moved_along(line, step)
        s_vec = direction * step.to(dt)[:, None]
        w = w + s_vec.view(b, k, q)
        g_new = gradient(w, prob, lab_b)
        y_vec = (g_new - g).view(b, p_dim)
        sy = (s_vec * y_vec).sum(-1)
        good = moved & (sy > 1e-10)
        hist.push_(s_vec * good[:, None], y_vec * good[:, None])
        gamma = torch.where(good, sy / (y_vec * y_vec).sum(-1).clamp_min(torch.finfo(dt).tiny), gamma)
        first_iter = first_iter & ~good
        scale_first = bool(first_iter.any())
        decrease = (f - f_new).abs() / torch.maximum(f.abs(), f_new.abs()).clamp_min(1.0)
        f = torch.where(moved, f_new, f)
        g = g_new  # an unmoved problem's gradient is recomputed at the same point
        iters += 1
        done = torch.linalg.vector_norm(g.view(b, p_dim), ord=math.inf, dim=-1) <= tol
        finished = done | ~moved | (decrease <= stall)
    if live.numel():  # stopped by max_iter, not converged
        w_out[live], n_iter[live.cpu()] = w, iters.cpu()
    return w_out, n_iter, converged, n_forward, n_gradient


def _layer_features(x: Tensor, rows: Tensor | None, dt: torch.dtype, standardize: bool, buf: Tensor | None,
                    scratch: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """One layer's fitting rows in the compute dtype, standardised in `buf` (reused across layers;
    `scratch`, a few rows, holds the squares).

    Returns (z, mean, scale); scale = the population std, or 1 where it is ~0 (a constant feature).
    The input is never modified: without row selection, standardisation or a dtype change it is
    used as it is.
    """
    if buf is None:
        z = x
    elif rows is not None and x.dtype == dt:
        z = torch.index_select(x, 0, rows, out=buf)
    else:
        z = buf.copy_(x if rows is None else x.index_select(0, rows))
    d = x.shape[-1]
    if not standardize:
        return z, torch.zeros(d, dtype=dt, device=x.device), torch.ones(d, dtype=dt, device=x.device)
    mean = z.mean(dim=0)
    z.sub_(mean)
    # sum of squares in row blocks through a small reused buffer; block totals added in float64
    if scratch is None:
        scratch = torch.empty(min(z.shape[0], 1024), d, dtype=dt, device=x.device)
    var = torch.stack([torch.mul(c, c, out=scratch[:c.shape[0]]).sum(dim=0)
                       for c in z.split(scratch.shape[0])]).double().sum(0) / z.shape[0]
    std = var.sqrt().to(dt)
    std = torch.where(std > 1e-8 * std.amax().clamp_min(1e-30), std, torch.ones_like(std))
    z.div_(std)
    return z, mean, std


def multinomial_lbfgs(
    x: Float[Tensor, "layer n d"],
    labels: Int[Tensor, "t n_fit"],
    n_classes: int,
    *,
    l2: float,
    rows: Int[Tensor, " n_fit"] | None = None,
    standardize: bool = True,
    max_iter: int = 100,
    tol: float = 1e-4,
    history: int = 10,
    warm_start: bool = False,
    on_layer: Callable[[int], None] | None = None,
) -> LogisticFit:
    """Minimise mean cross-entropy + l2/2 ||W||^2 (bias unpenalised) for every layer and label set.

    The one multinomial logistic solver of the toolkit (probes and the future lens): scikit-learn's
    ``LogisticRegression(C=1 / (l2 * n_fit))`` objective on the standardised rows `rows` of each
    layer (all rows when None; `standardize=False` fits the features as they are), solved by
    L-BFGS with scipy's defaults (10 curvature pairs; stop when max |gradient| <= `tol`,
    scikit-learn's ``tol``). `labels`: one label vector per label set (e.g. task, control,
    shuffled), class ids in [0, n_classes); their problems share every pass over a layer's rows
    (weights stacked into one [t * k, d] matrix).

    Cost: each iteration makes one logit product (the direction's logits D Z^T) and one gradient
    product (G^T Z), and no other pass over the activations: logits are linear in the weights,
    so the strong-Wolfe line search evaluates every trial step from the current and the
    direction's logits. Layers are solved in order, one at a time, in one reused buffer of
    [n_fit, d] standardised rows (the features are never copied whole); finished label sets
    leave the batch, so later passes are narrower. A problem also stops when its relative
    decrease stalls at the dtype's resolution; the objective and the step tests are accumulated
    in float64. Computes in float32 (float64 for float64 features).

    `warm_start`: each layer starts from the best multiple of the previous layer's solution (one
    extra logit product; 0 when no multiple lowers the objective). Off by default, because at
    scikit-learn's tolerance the stopping point depends on the start: weights carried over along
    weakly penalised directions (their gradient is only l2 * w) pass the gradient test. Measured:
    on bench/probes.py it cut the task's iterations by a third but stopped one layer at a 13%
    higher objective (0.0256 vs scikit-learn's 0.0226) and moved accuracy by up to 0.8 points;
    on the multihop organism's residual stream it saved 16% of the iterations at tol 1e-4 and 5%
    at 1e-6. From zeros the solver takes scikit-learn's iterations and reaches its objective to
    6 digits.
    `on_layer(layer)` is called after each layer.
    """
    if x.ndim != 3 or 0 in x.shape or labels.ndim != 2:
        raise ValueError(f"multinomial_lbfgs: expected features (layer, n, d) and labels (t, n_fit), got "
                         f"{tuple(x.shape)} and {tuple(labels.shape)}")
    n_fit = x.shape[1] if rows is None else rows.shape[0]
    if labels.shape[1] != n_fit or labels.shape[0] == 0 or n_fit == 0:
        raise ValueError(f"multinomial_lbfgs labels: expected (t >= 1, {n_fit}) (one label per fitted row), "
                         f"got {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise ValueError(f"multinomial_lbfgs labels: expected class ids in [0, {n_classes}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if max_iter < 0 or history < 1 or not (l2 >= 0 and math.isfinite(l2)):
        raise ValueError(f"multinomial_lbfgs: expected max_iter >= 0, history >= 1 and a finite l2 >= 0, "
                         f"got {max_iter}, {history}, {l2}")
    n_layers, _, d = x.shape
    t = labels.shape[0]
    dt, dev = (torch.float64 if x.dtype == torch.float64 else torch.float32), x.device
    if rows is not None:
        rows = rows.to(dev)
    lab = labels.to(dev)[:, None, :]
    copy = rows is not None or standardize or x.dtype != dt
    buf = torch.empty(n_fit, d, dtype=dt, device=dev) if copy else None
    scratch = torch.empty(min(n_fit, 1024), d, dtype=dt, device=dev) if standardize else None
    w = torch.empty(n_layers, t, n_classes, d + 1, dtype=dt, device=dev)
    mean = torch.empty(n_layers, d, dtype=dt, device=dev)
    scale = torch.empty_like(mean)
    n_iter = torch.zeros(n_layers, t, dtype=torch.long)
    converged = torch.zeros(n_layers, t, dtype=torch.bool)
    n_forward = torch.zeros(n_layers, t, dtype=torch.long)
    n_gradient = torch.zeros(n_layers, t, dtype=torch.long)
    for layer in range(n_layers):
        z, mean[layer], scale[layer] = _layer_features(x[layer], rows, dt, standardize, buf, scratch)
        start = w[layer - 1] if warm_start and layer > 0 else None
        w[layer], it, conv, n_forward[layer], n_gradient[layer] = _lbfgs_layer(
            z, lab, n_classes, start, l2=l2, max_iter=max_iter, tol=tol, history=history)
        n_iter[layer], converged[layer] = it.cpu(), conv.cpu()
        if on_layer is not None:
            on_layer(layer)
    if bool((~converged).any()):
        log.info("logistic fit: %d of %d problems stopped before max|grad| <= %g (max_iter=%d)",
                 int((~converged).sum()), converged.numel(), tol, max_iter)
    return LogisticFit(weight=w[..., :d], bias=w[..., d], mean=mean, scale=scale, n_iter=n_iter,
                       converged=converged, n_forward=n_forward, n_gradient=n_gradient)


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
        out = torch.stack([_linear_logits(x[i], self.coef[i], self.intercept[i]) for i in range(x.shape[0])])
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
    # one summed pass finds any NaN/Inf (an overflowing sum just triggers the exact check)
    if not bool(torch.isfinite(features.sum(dim=(1, 2))).all()) or (
            labels.is_floating_point() and not bool(torch.isfinite(labels.sum()))):
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

    if kind == "logistic":
        if labels.dtype.is_floating_point:
            raise ValueError(f"logistic probe labels: expected integer class ids, got dtype {labels.dtype}")
        classes, coded = torch.unique(torch.stack(sets), return_inverse=True)  # [t, n] class index
        k = classes.numel()
        if k < 2:
            raise ValueError(f"logistic probe labels: expected at least 2 classes, got {classes.tolist()}")
        train_d, test_d = train.to(features.device), test.to(features.device)
        solved = multinomial_lbfgs(features, coded[:, train_d], k, l2=1.0 / (C * train.numel()), rows=train_d,
                                   max_iter=max_iter, tol=tol)
        # test predictions in input units, exactly as ProbeResult.predict computes them
        pred = solved.logits(features, rows=test_d).argmax(-1)  # [layer, t, n_test]
        correct = (pred == coded[:, test_d][None]).cpu()
        metric = "accuracy"
        counts = torch.bincount(coded[0, train_d].cpu(), minlength=k)
        chance = float((coded[0, test_d].cpu() == counts.argmax()).double().mean())
        if test_group.numel() == int(test_group.max()) + 1:  # one row per example: one call for all layers
            mid, low, high = bootstrap_many(correct[:, 0].T.double(), **boot)
            est = [Estimate(float(a), float(b), float(c)) for a, b, c in zip(mid, low, high, strict=True)]
        else:
            est = [_accuracy_ci(correct[i, 0], test_group, **boot) for i in range(n_layers)]
        other = {name: correct[:, j].double().mean(-1) for j, name in enumerate(names)}
        reg = torch.full((n_layers,), float(C), dtype=torch.float64)
        coef_raw, intercept_raw = (v[:, 0] for v in solved.raw())  # the task probe
        n_iter = solved.n_iter
        class_ids = classes.cpu()
    else:
        xtr, xte, mean, std = _standardise(features, train, test, scale=standardize)
        y = torch.stack(sets, 1).to(xtr.dtype)  # [n, t]
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
        # back to the units of the input features: x_std = (x - mean) / std
        coef_raw = w[:, :1] / std[:, None, :]  # [layer, 1, d]
        intercept_raw = b[:, :1] - (coef_raw * mean[:, None, :]).sum(-1)
        n_iter, class_ids = None, None
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

