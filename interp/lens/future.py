"""Future lens (Pal et al. 2023, "Future Lens: Anticipating Subsequent Tokens from a Single Hidden State").

Does the residual h_t at lens layer l (see `interp.lens.residual`) encode the token k positions
ahead, x_{t+k}, and not only the next one? For each offset k (default 2 and 3) and each lens
layer a linear map h_t -> x_{t+k} is fitted as a multinomial logistic regression (L2-penalised,
features standardised on the training split, all layers fitted by the toolkit's one logistic
solver, `interp.probing.multinomial_lbfgs`). Simplified from the paper, which learns a map into a
later hidden state and decodes it with the model's own head.

Honesty: the split into train and test is BY EXAMPLE (all positions of a sequence fall on one
side). Accuracy is top-1 on the test positions, with a percentile bootstrap CI over test
examples (`interp.stats.bootstrap`, ratio of summed correct over summed positions, so examples
with more positions weigh more); the same resamples are used for every layer and method, and
the gain over the bigram baseline gets a paired CI. Baselines fitted on the same training split:
- unigram: always predict the most frequent x_{t+k};
- bigram: predict the most frequent x_{t+k} seen after the current token x_t (unigram fallback
  for unseen x_t). A lens that does not beat the bigram baseline shows nothing beyond "the
  current token predicts the future".
Caveat: neither baseline sees the position t, but h_t does (learned or rotary positions), so
over all positions of structured data a lens can beat the bigram by reading the position alone
(on the planning organism, over all positions, layer 0 decodes x_{t+2} at 0.31 vs bigram 0.19).
Select positions with `mask` (e.g. where x_{t+k} is determined by earlier context) to make a
claim about planning.

Memory: the residuals of all selected layers at all positions ((n_layers + 1) x batch x pos x
d_model) plus one (layer x d_model x classes) weight tensor per offset; classes are the target
tokens seen in training, not the whole vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.configs import from_dict
from interp.lens.residual import layer_labels, model_name, residual_stack
from interp.probing import multinomial_lbfgs
from interp.stats import Estimate, bootstrap
from interp.tl import HookedTransformer
from interp.tokens import check_model_tokens
from interp.viz import curves

METHODS = ("linear", "bigram", "unigram")


@dataclass(frozen=True, kw_only=True)
class FutureLensConfig:
    """Offsets k to decode (x_{t+k}), lens layers (None: all n_layers + 1), split and fit settings.

    `l2` is the penalty (l2 / 2) * ||W||^2 added to the mean cross-entropy (scikit-learn's
    `C` = 1 / (l2 * n_train)); `max_iter` bounds the L-BFGS iterations.
    """

    offsets: tuple[int, ...] = (2, 3)
    layers: tuple[int, ...] | None = None
    test_fraction: float = 0.25
    l2: float = 1e-3
    max_iter: int = 200
    seed: int = 0
    n_boot: int = 1000
    alpha: float = 0.05
    batch_size: int | None = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "offsets", tuple(self.offsets))
        if not self.offsets or any(not isinstance(k, int) or isinstance(k, bool) or k < 1
                                   for k in self.offsets) or len(set(self.offsets)) != len(self.offsets):
            raise ValueError(f"FutureLensConfig.offsets: expected distinct ints >= 1, got {self.offsets!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
            if not self.layers or any(not isinstance(x, int) or x < 0 for x in self.layers):
                raise ValueError(f"FutureLensConfig.layers: expected lens layers >= 0 or None, "
                                 f"got {self.layers!r}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"FutureLensConfig.test_fraction: expected in (0, 1), got {self.test_fraction}")
        if not (self.l2 >= 0 and math.isfinite(self.l2)):
            raise ValueError(f"FutureLensConfig.l2: expected a finite number >= 0, got {self.l2}")
        if self.max_iter < 1 or self.n_boot < 1:
            raise ValueError(f"FutureLensConfig: expected max_iter >= 1 and n_boot >= 1, got "
                             f"{self.max_iter}, {self.n_boot}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"FutureLensConfig.alpha: expected in (0, 1), got {self.alpha}")

    @staticmethod
    def from_dict(d: dict[str, Any]) -> FutureLensConfig:
        """Build from a dict (e.g. parsed YAML); unknown keys are an error."""
        return from_dict(FutureLensConfig, d)


# ------------------------------------------------------------------------ the fitted map

@dataclass(frozen=True)
class SoftmaxFit:
    """Multinomial logistic regressions, one per group (layer), on standardised features."""

    mean: Float[Tensor, "group d"]
    scale: Float[Tensor, "group d"]
    weight: Float[Tensor, "group d classes"]
    bias: Float[Tensor, "group classes"]

    def logits(self, x: Float[Tensor, "group n d"]) -> Float[Tensor, "group n classes"]:
        z = (x.to(self.weight.dtype) - self.mean[:, None]) / self.scale[:, None]
        return torch.baddbmm(self.bias[:, None, :], z, self.weight)

    def predict_proba(self, x: Float[Tensor, "group n d"]) -> Float[Tensor, "group n classes"]:
        return torch.softmax(self.logits(x), dim=-1)


def softmax_regression(
    x: Float[Tensor, "group n d"],
    y: Int[Tensor, " n"],
    n_classes: int,
    *,
    l2: float = 1e-3,
    max_iter: int = 200,
    standardize: bool = True,
    progress: bool = False,
) -> SoftmaxFit:
    """Fit one multinomial logistic regression per group (shared labels) with the toolkit's solver.

    Minimises, for every group g, mean_i CE(z_gi W_g + b_g, y_i) + (l2 / 2) ||W_g||^2 with z the
    standardised features (the intercept is not penalised): scikit-learn's multinomial
    `LogisticRegression(C=1 / (l2 * n))` on the same z. The solver is
    `interp.probing.multinomial_lbfgs` (the probes' solver), run to max |gradient| <= 1e-9 or until
    the objective stalls at the dtype's resolution; this function only checks the labels and
    packages the result. Standardisation uses the training population std (1 for a constant
    feature). Computes in at least float32.
    """
    if y.ndim != 1 or y.shape[0] != x.shape[1]:
        raise ValueError(f"softmax regression labels: expected shape ({x.shape[1]},), got {tuple(y.shape)}")
    if y.numel() == 0 or int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ValueError(f"softmax regression labels: expected class ids in [0, {n_classes}) for at "
                         f"least one example, got {y.numel()} labels")
    bar = tqdm(total=x.shape[0], desc="future lens: fit", disable=not progress, leave=False)
    fit = multinomial_lbfgs(x, y[None], n_classes, l2=l2, standardize=standardize, max_iter=max_iter,
                            tol=1e-9, on_layer=lambda _: bar.update(1))
    bar.close()
    return SoftmaxFit(mean=fit.mean, scale=fit.scale, weight=fit.weight[:, 0].transpose(1, 2),
                      bias=fit.bias[:, 0])


# ------------------------------------------------------------------------------- baselines

def _unigram_mode(nxt: Int[Tensor, " n"]) -> int:
    """The most frequent token of `nxt` (ties: the smaller id)."""
    values, counts = nxt.unique(return_counts=True)
    return int(values[torch.argmax(counts)])  # argmax returns the first maximum


def _mode_table(cur: Int[Tensor, " n"], nxt: Int[Tensor, " n"], d_vocab: int) -> Int[Tensor, " d_vocab"]:
    """For every token v, the most frequent `nxt` after `cur == v` (ties: the smaller id);
    tokens never seen as `cur` get the overall most frequent `nxt` (the unigram mode)."""
    table = torch.full((d_vocab,), _unigram_mode(nxt), dtype=torch.long)
    keys, counts = (cur * d_vocab + nxt).unique(return_counts=True)  # sorted by (cur, nxt)
    order = torch.argsort(-counts, stable=True)
    order = order[torch.argsort(keys[order] // d_vocab, stable=True)]  # by cur, then count desc
    k = keys[order]
    first = torch.ones_like(k, dtype=torch.bool)
    first[1:] = (k[1:] // d_vocab) != (k[:-1] // d_vocab)
    table[k[first] // d_vocab] = k[first] % d_vocab
    return table


# ---------------------------------------------------------------------------------- result

@dataclass(frozen=True)
class FutureLensResult:
    """Top-1 accuracy of decoding x_{t+k} from h_t per (offset, lens layer), with baselines.

    `accuracy` (and its CI) is the linear map's; `bigram`/`unigram` are per offset; `gain_low` /
    `gain_high` is the paired bootstrap CI of (linear - bigram) accuracy.
    """

    model_name: str
    offsets: tuple[int, ...]
    layers: tuple[int, ...]
    labels: tuple[str, ...]
    accuracy: Float[Tensor, "offset layer"]
    ci_low: Float[Tensor, "offset layer"]
    ci_high: Float[Tensor, "offset layer"]
    gain_low: Float[Tensor, "offset layer"]
    gain_high: Float[Tensor, "offset layer"]
    baselines: Float[Tensor, "offset 2 3"]  # [offset, (bigram, unigram), (value, low, high)]
    n_train_tokens: Int[Tensor, " offset"]
    n_test_tokens: Int[Tensor, " offset"]
    n_test_examples: Int[Tensor, " offset"]
    test_examples: Int[Tensor, " n_test"]  # indices (into the tokens' batch) of the held-out examples
    config: FutureLensConfig

    @property
    def values(self) -> Float[Tensor, "offset layer"]:
        """Top-1 accuracy of the linear future lens per offset and lens layer."""
        return self.accuracy

    def baseline(self, offset: int, kind: str = "bigram") -> Estimate:
        """The bigram or unigram baseline accuracy for `offset`, with its CI."""
        if kind not in ("bigram", "unigram"):
            raise ValueError(f"future lens baseline: expected 'bigram' or 'unigram', got {kind!r}")
        v = self.baselines[self._oi(offset), 0 if kind == "bigram" else 1]
        return Estimate(float(v[0]), float(v[1]), float(v[2]))

    def estimate(self, offset: int, layer: int) -> Estimate:
        """The linear lens's accuracy at (offset, lens layer), with its CI."""
        o, li = self._oi(offset), self._li(layer)
        return Estimate(float(self.accuracy[o, li]), float(self.ci_low[o, li]), float(self.ci_high[o, li]))

    def beats_bigram(self, offset: int) -> list[int]:
        """Lens layers whose paired CI of (lens - bigram) accuracy lies strictly above 0."""
        o = self._oi(offset)
        return [layer for j, layer in enumerate(self.layers) if float(self.gain_low[o, j]) > 0]

    def _oi(self, offset: int) -> int:
        if offset not in self.offsets:
            raise ValueError(f"future lens offset: expected one of {self.offsets}, got {offset}")
        return self.offsets.index(offset)

    def _li(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"future lens layer: expected one of {self.layers}, got {layer}")
        return self.layers.index(layer)

    def to_frame(self) -> pd.DataFrame:
        """One row per (offset, method, layer); baselines have layer = -1 and label 'baseline'."""
        rows = []
        for o, k in enumerate(self.offsets):
            common = {"model": self.model_name, "offset": k, "n_train_tokens": int(self.n_train_tokens[o]),
                      "n_test_tokens": int(self.n_test_tokens[o]),
                      "n_test_examples": int(self.n_test_examples[o])}
            for j, layer in enumerate(self.layers):
                rows.append({**common, "method": "linear", "layer": layer, "label": self.labels[j],
                             "accuracy": float(self.accuracy[o, j]), "ci_low": float(self.ci_low[o, j]),
                             "ci_high": float(self.ci_high[o, j]),
                             "gain_vs_bigram_low": float(self.gain_low[o, j]),
                             "gain_vs_bigram_high": float(self.gain_high[o, j])})
            for m, kind in enumerate(("bigram", "unigram")):
                v = self.baselines[o, m]
                rows.append({**common, "method": kind, "layer": -1, "label": "baseline",
                             "accuracy": float(v[0]), "ci_low": float(v[1]), "ci_high": float(v[2]),
                             "gain_vs_bigram_low": math.nan, "gain_vs_bigram_high": math.nan})
        return pd.DataFrame(rows)

    def plot(self) -> go.Figure:
        """Accuracy by layer per offset (CI bands), baselines as dotted horizontal lines."""
        frame = self.to_frame()
        lin = frame[frame["method"] == "linear"].assign(series=lambda f: "k=" + f["offset"].astype(str))
        fig = curves(lin, x="layer", y="accuracy", group="series", low="ci_low", high="ci_high",
                     title=f"Future lens: top-1 accuracy of x[t+k] from h[t] ({self.model_name})",
                     y_title="top-1 accuracy")
        for _, row in frame[frame["method"] != "linear"].iterrows():
            fig.add_hline(y=row["accuracy"], line_dash="dot" if row["method"] == "bigram" else "dash",
                          annotation_text=f"{row['method']} k={row['offset']}", opacity=0.6)
        return fig


# ------------------------------------------------------------------------------- the driver

def _ratio(x: Tensor) -> Tensor:
    return x[..., 0, :].sum(-1) / x[..., 1, :].sum(-1)


def _gain(x: Tensor) -> Tensor:
    return (x[..., 0, :].sum(-1) - x[..., 1, :].sum(-1)) / x[..., 2, :].sum(-1)


def _masks(mask: Tensor | Mapping[int, Tensor] | None, offsets: tuple[int, ...],
           shape: tuple[int, int]) -> dict[int, Tensor]:
    out = {}
    for k in offsets:
        m = mask.get(k) if isinstance(mask, Mapping) else mask
        if isinstance(mask, Mapping) and m is None:
            raise ValueError(f"future lens mask: expected a mask for every offset {offsets}, "
                             f"got keys {sorted(mask)}")
        if m is None:
            m = torch.ones(shape, dtype=torch.bool)
        if not isinstance(m, Tensor) or m.dtype != torch.bool or tuple(m.shape) != shape:
            raise ValueError(f"future lens mask for k={k}: expected a bool tensor of shape {shape} "
                             f"(batch, pos), got {getattr(m, 'dtype', type(m))} {tuple(getattr(m, 'shape', ()))}")
        m = m.detach().cpu().clone()
        m[:, max(0, shape[1] - k):] = False  # x_{t+k} must exist
        out[k] = m
    return out


def future_lens(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    *,
    mask: Bool[Tensor, "batch pos"] | Mapping[int, Bool[Tensor, "batch pos"]] | None = None,
    config: FutureLensConfig = FutureLensConfig(),
    progress: bool = True,
) -> FutureLensResult:
    """Fit and evaluate the future lens on `tokens`: does h_t at each layer predict x_{t+k}?

    `mask` marks the positions t to use (for every offset, or a dict offset -> mask); positions
    whose x_{t+k} falls outside the sequence are dropped. For padded prompts, mask out the pads.
    """
    tokens = check_model_tokens(model, tokens)
    tokens = tokens.detach().cpu()
    n_b, n_pos = tokens.shape
    n_lens = model.cfg.n_layers + 1
    layers = config.layers if config.layers is not None else tuple(range(n_lens))
    bad = [x for x in layers if x >= n_lens]
    if bad:
        raise ValueError(f"future lens layers: expected lens layers in [0, {n_lens}) "
                         f"(resid_pre of each block, then the final resid_post), got {bad}")
    n_test = max(2, round(config.test_fraction * n_b))
    if n_b - n_test < 1:
        raise ValueError(f"future lens: expected at least 3 examples to split by example "
                         f"(test_fraction={config.test_fraction}), got {n_b}")
    perm = torch.randperm(n_b, generator=torch.Generator().manual_seed(config.seed))
    is_test = torch.zeros(n_b, dtype=torch.bool)
    is_test[perm[:n_test]] = True
    test_index = torch.full((n_b,), -1, dtype=torch.long)
    test_index[perm[:n_test]] = torch.arange(n_test)
    masks = _masks(mask, config.offsets, (n_b, n_pos))

    acts = residual_stack(model, tokens, batch_size=config.batch_size, progress=progress)
    acts = acts[list(layers)]  # [layer, batch, pos, d_model]
    all_labels = layer_labels(model.cfg.n_layers)
    d_vocab = model.cfg.d_vocab

    shape = (len(config.offsets), len(layers))
    acc, lo, hi, glo, ghi = (torch.zeros(shape, dtype=torch.float64) for _ in range(5))
    baselines = torch.zeros(len(config.offsets), 2, 3, dtype=torch.float64)
    n_train_tok, n_test_tok, n_test_ex = (torch.zeros(len(config.offsets), dtype=torch.long) for _ in range(3))
    boot = dict(n_boot=config.n_boot, alpha=config.alpha, seed=config.seed)
    for o, k in enumerate(config.offsets):
        b_tr, t_tr = torch.nonzero(masks[k] & ~is_test[:, None], as_tuple=True)
        b_te, t_te = torch.nonzero(masks[k] & is_test[:, None], as_tuple=True)
        if b_tr.numel() == 0 or b_te.numel() == 0:
            raise ValueError(f"future lens k={k}: expected positions t with x[t+{k}] in both the train "
                             f"and the test split, got {b_tr.numel()} train and {b_te.numel()} test")
        y_tr, y_te = tokens[b_tr, t_tr + k], tokens[b_te, t_te + k]
        classes = y_tr.unique()  # sorted
        fit = softmax_regression(acts[:, b_tr.to(acts.device), t_tr.to(acts.device)],
                                 torch.searchsorted(classes, y_tr), len(classes), l2=config.l2,
                                 max_iter=config.max_iter, progress=progress)
        with torch.no_grad():
            pred = classes[fit.logits(acts[:, b_te.to(acts.device), t_te.to(acts.device)]).argmax(-1).cpu()]
        correct = (pred == y_te[None]).double()  # [layer, n_test_tokens]
        table = _mode_table(tokens[b_tr, t_tr], y_tr, d_vocab)
        bigram = (table[tokens[b_te, t_te]] == y_te).double()
        unigram = (y_te == _unigram_mode(y_tr)).double()

        # aggregate per test example (the bootstrap unit)
        ex = test_index[b_te]
        used = torch.unique(ex)
        ex = torch.searchsorted(used, ex)

        def per_example(v: Tensor, _ex: Tensor = ex, _n: int = used.numel()) -> Tensor:
            return torch.zeros(*v.shape[:-1], _n, dtype=torch.float64).index_add_(-1, _ex, v)

        count = per_example(torch.ones_like(bigram))
        c_lin, c_bi, c_uni = per_example(correct), per_example(bigram), per_example(unigram)
        for m, c in enumerate((c_bi, c_uni)):
            e = bootstrap(torch.stack([c, count], 1), _ratio, **boot)
            baselines[o, m] = torch.tensor([e.value, e.low, e.high])
        for j in range(len(layers)):
            e = bootstrap(torch.stack([c_lin[j], count], 1), _ratio, **boot)
            acc[o, j], lo[o, j], hi[o, j] = e.value, e.low, e.high
            g = bootstrap(torch.stack([c_lin[j], c_bi, count], 1), _gain, **boot)
            glo[o, j], ghi[o, j] = g.low, g.high
        n_train_tok[o], n_test_tok[o], n_test_ex[o] = b_tr.numel(), b_te.numel(), used.numel()

    return FutureLensResult(
        model_name=model_name(model), offsets=config.offsets, layers=tuple(layers),
        labels=tuple(all_labels[x] for x in layers), accuracy=acc, ci_low=lo, ci_high=hi,
        gain_low=glo, gain_high=ghi, baselines=baselines, n_train_tokens=n_train_tok,
        n_test_tokens=n_test_tok, n_test_examples=n_test_ex, test_examples=perm[:n_test].sort().values,
        config=config)
