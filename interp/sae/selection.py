"""Find the features that carry a labelled variable, without being told which they are.

Given feature activations [n, d_sae] on a train split and a categorical label per example (e.g.
the bridge entity of a two-hop prompt), each feature is scored by the mutual information (in
nats) between its firing (activation > 0) and the label; its preferred label is the one it fires
for most often. Selecting on a train split and testing causally (ablation) on a held-out split
keeps the selection honest (Hewitt & Liang 2019: decodable is not used; pair it with an
intervention).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor

from interp.hooks import run
from interp.sae.checks import check_sae
from interp.stats import Estimate, bootstrap
from interp.tl import HookedTransformer


def firing_mutual_information(acts: Float[Tensor, "n d_sae"], labels: Int[Tensor, "n"]) -> Float[Tensor, "d_sae"]:
    """I(1[feature fires]; label) in nats, for every feature at once (plug-in estimate)."""
    if acts.shape[0] != labels.shape[0]:
        raise ValueError(f"mutual information: expected one label per row ({acts.shape[0]}), got {labels.shape[0]}")
    fires = (acts != 0).double()  # [n, f]
    _, lab = torch.unique(labels, return_inverse=True)
    onehot = torch.nn.functional.one_hot(lab.to(acts.device)).double()  # [n, c]
    n = acts.shape[0]
    joint1 = onehot.T @ fires / n  # P(label=c, fire=1): [c, f]
    pc = onehot.mean(0)[:, None]  # [c, 1]
    joint0 = pc - joint1
    p1 = fires.mean(0)[None, :]
    p0 = 1 - p1

    def term(pj: Tensor, pf: Tensor) -> Tensor:
        ratio = pj / (pc * pf).clamp_min(1e-300)
        return torch.where(pj > 0, pj * torch.log(ratio.clamp_min(1e-300)), torch.zeros_like(pj))

    return (term(joint1, p1) + term(joint0, p0)).sum(0).float().cpu()


@dataclass(frozen=True)
class FeatureSelection:
    """Features ranked by mutual information with a label."""

    features: Int[Tensor, "k"]
    mutual_information: Float[Tensor, "d_sae"]
    preferred_label: Int[Tensor, "d_sae"]
    frequency: Float[Tensor, "d_sae"]
    mean_active: Float[Tensor, "d_sae"]  # mean activation where the feature fires (0 if never)

    @property
    def values(self) -> Tensor:
        return self.mutual_information[self.features]

    def to_frame(self) -> pd.DataFrame:
        """One row per selected feature (in rank order)."""
        f = self.features
        return pd.DataFrame({"rank": range(f.numel()), "feature": f.tolist(),
                             "mutual_information": self.mutual_information[f].tolist(),
                             "preferred_label": self.preferred_label[f].tolist(),
                             "frequency": self.frequency[f].tolist()})

    def plot(self) -> go.Figure:
        frame = self.to_frame()
        fig = go.Figure(go.Bar(x=[str(v) for v in frame["feature"]], y=frame["mutual_information"],
                               text=[f"label {v}" for v in frame["preferred_label"]]))
        fig.update_layout(title="Features ranked by mutual information with the label", xaxis_title="feature",
                          yaxis_title="I(fires; label) [nats]", template="plotly_white")
        return fig


def select_features(acts: Float[Tensor, "n d_sae"], labels: Int[Tensor, "n"], *, k: int | None = None,
                    per_label: bool = False) -> FeatureSelection:
    """The `k` features with the highest MI with `labels` (default: one per distinct label).

    With `per_label`, features are taken round robin over label values (each feature belongs to
    its preferred label; within a label, by MI): the best feature of every label first, then the
    second best, so that ``k = m * n_labels`` gives every label its `m` best features.
    """
    mi = firing_mutual_information(acts, labels)
    values, lab = torch.unique(labels, return_inverse=True)
    counts = torch.nn.functional.one_hot(lab).double().T @ (acts != 0).double().cpu()  # [c, f]
    rate = counts / torch.bincount(lab).double()[:, None]
    preferred = values[rate.argmax(0)]
    k = int(values.numel()) if k is None else k
    if not 1 <= k <= mi.numel():
        raise ValueError(f"select_features.k: expected in [1, {mi.numel()}], got {k}")
    if per_label:
        # round robin over label values: the best feature of every label, then the second best...
        queues = []
        for v in values.tolist():
            cand = ((preferred == v) & (mi > 0)).nonzero()[:, 0]
            queues.append(cand[mi[cand].argsort(descending=True)].tolist())
        order: list[int] = []
        for r in range(max((len(q) for q in queues), default=0)):
            layer = [q[r] for q in queues if r < len(q)]
            order.extend(sorted(layer, key=lambda i: -float(mi[i])))
        order += [int(i) for i in mi.argsort(descending=True) if int(i) not in set(order)]
        idx = torch.tensor(order[:k])
    else:
        idx = mi.topk(k).indices
    fires = (acts != 0).float()
    mean_active = (acts.float().sum(0) / fires.sum(0).clamp_min(1)).cpu()
    return FeatureSelection(idx, mi, preferred, fires.mean(0).cpu(), mean_active)


@contextlib.contextmanager
def steer_label(model: HookedTransformer, sae: SAE, selection: FeatureSelection, new_labels: Int[Tensor, "batch"],
                *, mask: Tensor | None = None, allow_mismatch: bool = False) -> Iterator[HookedTransformer]:
    """Within the block, rewrite the label the selected features carry (an interchange done in
    feature space): the selected features are zeroed and those whose preferred label is
    ``new_labels[b]`` are set to their mean activation, at the positions in `mask` (bool
    [batch, pos]; default all). The SAE error term is kept. The SAE's recorded hook and model are
    checked (`check_sae`; `allow_mismatch` skips that)."""
    from interp.sae.evaluation import splice

    feats = selection.features
    pref = selection.preferred_label[feats]
    mean = selection.mean_active[feats]

    def edit(f: Tensor) -> Tensor:
        new = (pref.to(f.device)[None, :] == new_labels.to(f.device)[:, None]).to(f.dtype) * mean.to(f)[None, :]
        f = f.clone()
        f[..., feats.to(f.device)] = new[:, None, :] if f.ndim == 3 else new
        return f

    with splice(model, sae, error_term=True, edit=edit, mask=mask, allow_mismatch=allow_mismatch):
        yield model


# ------------------------------------------------------------------- causal test of found features

@dataclass(frozen=True)
class LabelFeatureTest:
    """Features found by MI with a label on a train split, then ablated on a held-out split.

    Accuracies are of the model's argmax answer; drops are clean minus ablated accuracy with
    bootstrap CIs over held-out examples (random: per-example mean over `n_random` draws of the
    same number of live features). `identification` is the held-out accuracy of reading the label
    off the selected features (the preferred label of the most active one), chance 1/n_labels.
    """

    selection: FeatureSelection
    accuracy_clean: Estimate
    accuracy_selected: Estimate
    accuracy_random: Estimate
    drop_selected: Estimate
    drop_random: Estimate
    identification: Estimate
    n_labels: int
    n_train: int
    n_test: int
    label_coverage: float

    @property
    def values(self) -> dict[str, float]:
        return {"accuracy_clean": self.accuracy_clean.value, "accuracy_selected": self.accuracy_selected.value,
                "accuracy_random": self.accuracy_random.value, "drop_selected": self.drop_selected.value,
                "drop_random": self.drop_random.value, "identification": self.identification.value,
                "label_coverage": self.label_coverage}

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for name in ("accuracy_clean", "accuracy_selected", "accuracy_random", "drop_selected", "drop_random",
                     "identification"):
            e: Estimate = getattr(self, name)
            rows.append({"quantity": name, "value": e.value, "low": e.low, "high": e.high})
        return pd.DataFrame(rows)

    def plot(self) -> go.Figure:
        frame = self.to_frame()
        frame = frame[frame["quantity"].str.startswith("accuracy")]
        fig = go.Figure(go.Bar(x=frame["quantity"], y=frame["value"],
                               error_y=dict(type="data", symmetric=False, array=frame["high"] - frame["value"],
                                            arrayminus=frame["value"] - frame["low"])))
        fig.update_layout(title=f"Ablating {self.selection.features.numel()} label features vs random features",
                          yaxis_title="accuracy", template="plotly_white")
        return fig

    def __str__(self) -> str:
        k = self.selection.features.numel()
        return (f"{k} features selected by MI on {self.n_train} train prompts ({self.label_coverage:.0%} of "
                f"{self.n_labels} labels covered); held-out n={self.n_test}: label read off the features "
                f"{self.identification} (chance {1 / self.n_labels:.3f}); accuracy clean {self.accuracy_clean}, "
                f"ablating selected {self.accuracy_selected}, ablating {k} random {self.accuracy_random}; "
                f"drop selected {self.drop_selected} vs random {self.drop_random}")


def label_feature_test(
    model: HookedTransformer, sae: SAE, tokens: Int[Tensor, "n pos"], labels: Int[Tensor, "n"],
    answers: Int[Tensor, "n"], *, k: int | None = None, pos: int = -1, train_fraction: float = 0.5,
    n_random: int = 5, min_frequency: float = 0.0, per_label: bool = True, seed: int = 0, n_boot: int = 1000,
    allow_mismatch: bool = False,
) -> LabelFeatureTest:
    """Find label features at position `pos` without being told which they are, then test them.

    On a train split, features are ranked by MI between firing at `pos` and `labels`; the top
    `k` (default: one per label value, `per_label` selection) are zeroed at `pos` on the held-out
    split (error term kept) and the answer accuracy is compared with zeroing `k` random live
    features (firing at `pos` on at least one train prompt and on >= `min_frequency` of them).
    The SAE's recorded hook and model are checked first (`check_sae`; `allow_mismatch` skips that).
    """
    from interp.sae.tracing import ablate, feature_activations

    if not 0 < train_fraction < 1:
        raise ValueError(f"label_feature_test.train_fraction: expected in (0, 1), got {train_fraction}")
    check_sae(model, sae, allow_mismatch=allow_mismatch)
    n = tokens.shape[0]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_train = int(n * train_fraction)
    tr, te = perm[:n_train], perm[n_train:]
    positions = [pos]
    acts_tr = feature_activations(model, sae, tokens[tr], positions=positions, allow_mismatch=allow_mismatch)
    sel = select_features(acts_tr, labels[tr], k=k, per_label=per_label)
    chosen = sel.features
    n_labels = int(torch.unique(labels).numel())
    covered = torch.unique(sel.preferred_label[chosen]).numel() / n_labels

    answers_te = answers[te]
    toks_te = tokens[te]

    def predicted(logits: Tensor) -> Tensor:
        return logits[:, pos].argmax(-1).float()

    def correct(pred: Tensor) -> Tensor:
        return (pred.cpu().long() == answers_te).float()

    clean = correct(torch.cat([predicted(run(model, toks_te[i:i + 256]).logits)  # type: ignore[arg-type]
                               for i in range(0, toks_te.shape[0], 256)]))
    ablated = correct(ablate(model, sae, toks_te, chosen, predicted, positions=positions,
                             allow_mismatch=allow_mismatch))
    freq = (acts_tr != 0).float().mean(0)
    live = ((freq > 0) & (freq >= min_frequency)).nonzero()[:, 0]
    pool = live[~torch.isin(live, chosen)]
    if pool.numel() < chosen.numel():
        raise ValueError(f"label_feature_test: expected at least {chosen.numel()} live features outside the "
                         f"selection for the random baseline, got {pool.numel()}; lower min_frequency")
    rand = torch.stack([
        correct(ablate(model, sae, toks_te, pool[torch.randperm(pool.numel(), generator=g)[:chosen.numel()]],
                       predicted, positions=positions, allow_mismatch=allow_mismatch))
        for _ in range(n_random)]).mean(0)
    acts_te = feature_activations(model, sae, toks_te, positions=positions, allow_mismatch=allow_mismatch)[:, chosen]
    read = sel.preferred_label[chosen][acts_te.argmax(1)]
    ident = ((read == labels[te]) & (acts_te.max(1).values > 0)).float()

    def est(v: Tensor) -> Estimate:
        return bootstrap(v.float(), n_boot=n_boot, seed=seed)

    return LabelFeatureTest(sel, est(clean), est(ablated), est(rand), est(clean - ablated), est(clean - rand),
                            est(ident), n_labels, n_train, int(te.numel()), covered)
