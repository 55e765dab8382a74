"""interp.probing against scikit-learn (logistic, ridge, CV choice) and planted ground truth."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression, Ridge, RidgeCV
from sklearn.model_selection import GridSearchCV, PredefinedSplit

from interp.cache import collect
from interp.graph import Node, Site
from interp.models import load_model, new_model
from interp.organisms import multihop
from interp.probing import (
    FRAME_COLUMNS,
    _Line,
    control_labels,
    fit,
    group_folds,
    multinomial_lbfgs,
    ridge_cv,
    shuffled_labels,
    split_by_group,
)
from interp.stats import bootstrap


def _classes(n_layers=3, n=600, d=16, k=4, strength=(0.0, 0.6, 2.0), seed=0, dtype=torch.float32):
    """Gaussian classes whose separation grows with the layer; features on uneven scales."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    means = torch.randn(k, d, generator=g)
    scale = torch.rand(d, generator=g) * 5 + 0.1
    x = torch.stack([(torch.randn(n, d, generator=g) + s * means[y]) * scale + 3.0 for s in strength])
    return x.to(dtype), y


def _standardised(x, train):
    mu, sd = x[train].mean(0), x[train].std(0, correction=0)
    return (x - mu) / sd


def test_split_by_group_keeps_examples_whole():
    groups = torch.arange(40).repeat_interleave(3)  # 3 rows (tokens) per example
    train, test = split_by_group(groups, 0.25, seed=3)
    assert set(groups[train].tolist()).isdisjoint(groups[test].tolist())
    assert sorted(torch.cat([train, test]).tolist()) == list(range(120))
    assert len(set(groups[test].tolist())) == 10  # 25% of the 40 examples
    folds = group_folds(groups, 4, seed=0)
    for gid in range(40):
        assert len(set(folds[groups == gid].tolist())) == 1
    assert torch.bincount(folds).tolist() == [30, 30, 30, 30]


def test_logistic_accuracy_and_weights_match_sklearn():
    x, y = _classes(dtype=torch.float64)  # float64 in, float64 solve: the optimum can be compared tightly
    res = fit(x, y, "logistic", shuffled=False, n_boot=200, tol=1e-7, max_iter=500)
    train, test = split_by_group(torch.arange(len(y)), 0.25, seed=0)
    for layer in range(x.shape[0]):
        z = _standardised(x[layer].double(), train).numpy()
        sk = LogisticRegression(C=1.0, tol=1e-8, max_iter=2000).fit(z[train], y[train].numpy())
        acc = sk.score(z[test], y[test].numpy())
        assert abs(float(res.value[layer]) - acc) <= 0.01, (layer, float(res.value[layer]), acc)
        # same optimum: the decision function on the test rows agrees
        ours = x[layer, test].double() @ res.coef[layer].double().T + res.intercept[layer].double()
        theirs = torch.from_numpy(sk.decision_function(z[test]))
        torch.testing.assert_close(ours - ours.mean(1, keepdim=True), theirs - theirs.mean(1, keepdim=True),
                                   atol=1e-4, rtol=1e-4)
    assert res.value[2] > 0.9 and res.value[0] < 0.45


def test_logistic_default_tolerance_within_one_point_of_sklearn_defaults():
    x, y = _classes(n=800, d=24, k=5, strength=(0.3, 0.5, 0.8), seed=1)
    res = fit(x, y, "logistic", shuffled=False, n_boot=100)
    train, test = split_by_group(torch.arange(len(y)), 0.25, seed=0)
    for layer in range(3):
        z = _standardised(x[layer].double(), train).numpy()
        acc = LogisticRegression().fit(z[train], y[train].numpy()).score(z[test], y[test].numpy())
        assert abs(float(res.value[layer]) - acc) <= 0.01


def test_stacked_label_sets_each_equal_their_own_sklearn_fit_and_count_one_pass_each_way_per_iteration():
    # task, control and shuffled labels solved together on the training rows of each layer; each
    # must be the optimum scikit-learn finds for that label set alone, and every iteration makes
    # one logit and one gradient pass at the width of the label sets still running
    x, y = _classes(n=500, d=12, k=3, strength=(0.4, 1.5), seed=3, dtype=torch.float64)
    types = torch.arange(500) % 40
    sets = torch.stack([y, control_labels(y, types, seed=1), shuffled_labels(y, seed=2)])
    train, _ = split_by_group(torch.arange(500), 0.25, seed=0)
    before = x.clone()
    solved = multinomial_lbfgs(x, sets[:, train], 3, l2=1.0 / train.numel(), rows=train, tol=1e-8, max_iter=500)
    assert torch.equal(x, before)  # standardised in a buffer, never in place
    for layer in range(2):
        torch.testing.assert_close(solved.mean[layer], x[layer, train].mean(0))
        torch.testing.assert_close(solved.scale[layer], x[layer, train].std(0, correction=0))
        z = _standardised(x[layer], train)[train].numpy()
        for j in range(3):
            sk = LogisticRegression(C=1.0, tol=1e-10, max_iter=5000).fit(z, sets[j, train].numpy())
            ours = torch.from_numpy(z) @ solved.weight[layer, j].T + solved.bias[layer, j]
            theirs = torch.from_numpy(sk.decision_function(z))
            torch.testing.assert_close(ours - ours.mean(1, keepdim=True), theirs - theirs.mean(1, keepdim=True),
                                       atol=1e-4, rtol=1e-4)
        # hand count: a label set leaves the batch after its last iteration
        a, b, c = sorted(solved.n_iter[layer].tolist(), reverse=True)
        assert solved.n_forward[layer].tolist() == [a - b, b - c, c]
        assert solved.n_gradient[layer].tolist() == [a - b, b - c, c + 1]  # + the gradient at the start


def test_warm_start_changes_the_path_not_the_optimum():
    # residual-stream-like layers (each adds a little to the previous one): at a tight tolerance
    # starting each layer from the previous solution reaches the optimum found from zeros
    g = torch.Generator().manual_seed(4)
    n, d, k = 600, 20, 4
    y = torch.randint(0, k, (n,), generator=g)
    means = torch.randn(k, d, generator=g, dtype=torch.float64)
    layers = [torch.randn(n, d, generator=g, dtype=torch.float64) + 0.5 * means[y]]
    for _ in range(3):
        layers.append(layers[-1] + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64) + 0.2 * means[y])
    x = torch.stack(layers)
    kw = dict(l2=1e-3, tol=1e-8, max_iter=1000)
    cold = multinomial_lbfgs(x, y[None], k, **kw)
    warm = multinomial_lbfgs(x, y[None], k, warm_start=True, **kw)
    assert bool(cold.converged.all()) and bool(warm.converged.all())
    torch.testing.assert_close(warm.weight, cold.weight, atol=5e-5, rtol=0)
    torch.testing.assert_close(warm.bias, cold.bias, atol=5e-5, rtol=0)
    assert torch.equal(warm.n_iter[0], cold.n_iter[0])  # the first layer has nothing to start from
    assert warm.n_forward[1:, 0].tolist() == (warm.n_iter[1:, 0] + 1).tolist()  # + the warm start's pass


def test_line_restriction_equals_autograd_objective_and_slope():
    # the line search evaluates f(w + a d) from the logits at w and d's logits alone; check the
    # value and the derivative in a against torch's cross-entropy and autograd on the full model
    g = torch.Generator().manual_seed(5)
    t, k, n, d, l2 = 2, 3, 50, 6, 0.05
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    lab = torch.randint(0, k, (t, 1, n), generator=g)
    w = torch.randn(t, k, d + 1, generator=g, dtype=torch.float64)
    direction = torch.randn(t, k, d + 1, generator=g, dtype=torch.float64)
    logits = torch.einsum("tkd,nd->tkn", w[..., :d], z) + w[..., d:]
    slope = torch.einsum("tkd,nd->tkn", direction[..., :d], z) + direction[..., d:]
    wv, dv = w[..., :d], direction[..., :d]
    line = _Line(logits=logits, slope=slope, label_logit=logits.gather(1, lab).sum(dim=(1, 2)),
                 label_slope=slope.gather(1, lab).sum(dim=(1, 2)), ww=(wv * wv).sum(dim=(1, 2)),
                 wd=(wv * dv).sum(dim=(1, 2)), dd=(dv * dv).sum(dim=(1, 2)), l2=l2, n=n)
    step = torch.tensor([0.3, 1.7], dtype=torch.float64, requires_grad=True)
    f, df, _, prob = line.at(step.detach())
    point = w + step[:, None, None] * direction
    ce = torch.stack([torch.nn.functional.cross_entropy(z @ point[j, :, :d].T + point[j, :, d], lab[j, 0])
                      for j in range(t)])
    ref = ce + 0.5 * l2 * (point[..., :d] ** 2).sum(dim=(1, 2))
    (grad,) = torch.autograd.grad(ref.sum(), step)
    torch.testing.assert_close(f, ref.detach())
    torch.testing.assert_close(df, grad)
    torch.testing.assert_close(prob.sum(1), torch.ones(t, n, dtype=torch.float64))


def test_nonfinite_features_are_reported_by_row_and_layer():
    x, y = _classes(n=200, seed=6)
    x[1, 17, 3] = float("nan")
    x[2, 150, 0] = float("inf")
    for kind, labels in (("logistic", y), ("ridge", y.double())):
        with pytest.raises(ValueError, match=r"NaN/Inf in 2 of 200 rows \[17, 150\] at layers \[1, 2\]"):
            fit(x, labels, kind)


def test_ridge_coefficients_equal_sklearn_ridge():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 300, 12, generator=g, dtype=torch.float64) * torch.linspace(0.5, 4, 12, dtype=torch.float64) + 1.5
    target = x[1] @ torch.randn(12, generator=g, dtype=torch.float64) + 0.3 * torch.randn(300, generator=g, dtype=torch.float64)
    res = fit(x, target, "ridge", standardize=False, alphas=(7.0,), shuffled=False, n_boot=100)
    train, _ = split_by_group(torch.arange(300), 0.25, seed=0)
    for layer in range(2):
        sk = Ridge(alpha=7.0).fit(x[layer, train].numpy(), target[train].numpy())
        torch.testing.assert_close(res.coef[layer, 0], torch.from_numpy(sk.coef_), atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(float(res.intercept[layer, 0]), float(sk.intercept_), atol=1e-9, rtol=1e-7)
    assert res.value[1] > 0.9  # test R^2 of the layer that holds the signal


def _ridge_data(seed=0, n=240, d=10, layers=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(layers, n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    noise = torch.tensor([0.3, 3.0, 30.0], dtype=torch.float64)[:layers, None]
    y = (x @ w) + noise * torch.randn(layers, n, generator=g, dtype=torch.float64)  # one target per layer
    return x, y


ALPHAS = (1e-2, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4)


def test_ridge_loo_alpha_equals_sklearn_ridgecv():
    x, y = _ridge_data()
    for layer in range(3):
        coef, intercept, alpha = ridge_cv(x[layer:layer + 1], y[layer][:, None], ALPHAS)
        sk = RidgeCV(alphas=ALPHAS).fit(x[layer].numpy(), y[layer].numpy())
        assert float(alpha[0, 0]) == sk.alpha_
        torch.testing.assert_close(coef[0, 0], torch.from_numpy(sk.coef_), atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(float(intercept[0, 0]), float(sk.intercept_), atol=1e-9, rtol=1e-7)
    chosen = [float(ridge_cv(x[i:i + 1], y[i][:, None], ALPHAS)[2]) for i in range(3)]
    assert chosen[0] < chosen[2]  # noisier target, stronger regularisation


def test_ridge_kfold_alpha_equals_gridsearch_on_same_folds():
    x, y = _ridge_data(seed=1)
    groups = torch.arange(60).repeat_interleave(4)  # 4 rows per example: folds must keep them together
    folds = group_folds(groups, 5, seed=2)
    for layer in range(3):
        _, _, alpha = ridge_cv(x[layer:layer + 1], y[layer][:, None], ALPHAS, folds=folds)
        search = GridSearchCV(Ridge(), {"alpha": list(ALPHAS)}, cv=PredefinedSplit(folds.numpy()))
        search.fit(x[layer].numpy(), y[layer].numpy())
        assert float(alpha[0, 0]) == search.best_params_["alpha"]


def test_shuffled_labels_give_chance_and_noise_gives_chance():
    x, y = _classes(n=1200, k=4, strength=(0.0, 3.0), seed=2)
    types = torch.arange(1200) % 100
    res = fit(x, y, "logistic", types=types, n_boot=300)
    n_test = res.n_test
    half = 3 * (0.25 * 0.75 / n_test) ** 0.5  # 3 binomial standard errors around 1/4
    assert abs(float(res.shuffled[0]) - 0.25) < half and abs(float(res.shuffled[1]) - 0.25) < half
    assert res.ci_low[0] < 0.25 + half and res.ci_high[0] > 0.25 - half  # layer 0: pure noise
    assert res.value[1] > 0.95


def test_planted_signal_found_with_ci_above_control():
    g = torch.Generator().manual_seed(5)
    n, d, k = 1000, 32, 5
    types = torch.randint(0, 80, (n,), generator=g)  # word types; the label does not follow the type
    y = torch.randint(0, k, (n,), generator=g)
    direction = torch.randn(k, d, generator=g)
    noise = torch.randn(2, n, d, generator=g)
    x = noise.clone()
    x[1] += 1.5 * direction[y]  # linear signal planted in layer 1 only
    res = fit(x, y, "logistic", types=types, layers=[4, 7], n_boot=300, meta={"target": "planted"})
    assert res.layers == (4, 7)
    assert float(res.ci_low[1]) > float(res.control[1]) + 0.3
    assert float(res.selectivity[1]) > 0.5
    assert abs(float(res.selectivity[0])) < 0.1
    frame = res.to_frame()
    assert list(frame.columns) == list(FRAME_COLUMNS)
    np.testing.assert_allclose(frame["value"], res.value.numpy())
    np.testing.assert_allclose(frame["selectivity"], (res.value - res.control).numpy())
    assert frame["target"].tolist() == ["planted", "planted"] and frame["layer"].tolist() == [4, 7]


def test_control_task_is_solvable_by_memorising_types():
    # features that encode the type (one-hot) let a probe memorise type -> control label:
    # the control accuracy must then be high, which is what selectivity subtracts
    g = torch.Generator().manual_seed(0)
    n, n_types = 900, 30
    types = torch.randint(0, n_types, (n,), generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    onehot = torch.nn.functional.one_hot(types, n_types).float()
    x = (onehot + 0.05 * torch.randn(n, n_types, generator=g))[None]
    ctrl = control_labels(y, types, seed=1)
    for t in range(n_types):  # one control label per type
        assert ctrl[types == t].unique().numel() <= 1
    res = fit(x, y, "logistic", types=types, C=100.0, n_boot=100)
    assert float(res.control[0]) > 0.95
    assert float(res.value[0]) < 0.6  # the task label is independent of the type


def test_ci_is_the_stats_bootstrap_over_test_examples():
    x, y = _classes(n=400, k=3, strength=(1.0,), seed=4)
    res = fit(x, y, "logistic", n_boot=500, seed=7, shuffled=False)
    _, test = split_by_group(torch.arange(400), 0.25, seed=7)
    correct = (res.predict(x[:, test])[0] == y[test]).double()
    est = bootstrap(correct[:, None], n_boot=500, alpha=0.05, seed=7)
    torch.testing.assert_close(float(res.value[0]), est.value)
    torch.testing.assert_close(float(res.ci_low[0]), est.low)
    torch.testing.assert_close(float(res.ci_high[0]), est.high)


def test_grouped_rows_ridge_r2_and_saved_outputs(tmp_path):
    g = torch.Generator().manual_seed(3)
    n_ex, per = 150, 4
    groups = torch.arange(n_ex).repeat_interleave(per)
    pos = torch.arange(per).repeat(n_ex).double()  # absolute position: a regression target
    x = torch.randn(2, n_ex * per, 8, generator=g, dtype=torch.float64)
    x[1, :, 0] += 3 * pos  # layer 1 encodes position linearly
    res = fit(x, pos, "ridge", groups=groups, types=groups, n_boot=200)
    train, test = split_by_group(groups, 0.25, seed=0)
    pred = res.predict(x[:, test])
    for layer in range(2):
        sse = ((pos[test] - pred[layer]) ** 2).sum()
        sst = ((pos[test] - pos[test].mean()) ** 2).sum()
        torch.testing.assert_close(float(res.value[layer]), float(1 - sse / sst))
    assert res.ci_low[1] > 0.8 and res.value[0] < 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = res.save(tmp_path / "out")
    back = pd.read_parquet(paths["parquet"])
    pd.testing.assert_frame_equal(back, res.to_frame())
    numeric = ["layer", "value", "ci_low", "ci_high", "control", "selectivity", "regularisation"]
    pd.testing.assert_frame_equal(pd.read_csv(paths["csv"])[numeric], res.to_frame()[numeric])
    html = paths["html"].read_text()
    assert "plotly" in html and "Probe r2 by layer" in html


def test_errors_name_expected_and_received():
    x = torch.randn(2, 10, 3)
    with pytest.raises(ValueError, match="test_fraction: expected a value in"):
        fit(x, torch.arange(10) % 2, test_fraction=1.5)
    with pytest.raises(ValueError, match="logistic probe labels: expected integer class ids"):
        fit(x, torch.linspace(0, 1, 10))
    with pytest.raises(ValueError, match="C: expected a positive"):
        fit(x, torch.arange(10) % 2, C=0.0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        fit(x, torch.zeros(10, dtype=torch.long), shuffled=False)


def test_ground_truth_multihop_bridge_decodable_above_control_only_in_trained_model():
    """On two-hop prompts the bridge b is decodable at the last position above its Hewitt-Liang
    control in the trained organism, and in no layer of a random-initialised model of the same
    shape. Control: a random label per fact token a>b (1,024 types), the token a probe could
    memorise if the model merely copied that fact to the last position. (A random model decodes
    b ~9% of the time, above the 1/32 chance, by such memorisation, but no better than the
    control: the reason the control is needed.)"""
    trained = load_model("organism:multihop")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        random = new_model(trained.cfg)
    data = multihop.dataset(1500, seed=123, two_hop_share=1.0)
    types = data.tokens[torch.arange(1500), data.fact1_pos]
    results = {}
    for name, model in (("trained", trained), ("random", random)):
        nodes = [Node(layer, Site.RESID_POST) for layer in range(model.cfg.n_layers)]
        cache = collect(model, data.tokens, hooks=nodes, positions="last", progress=False)
        feats = torch.stack([cache[node.hook_name][:, 0] for node in nodes])
        results[name] = fit(feats, data.bridge, types=types, n_boot=300)
    t, r = results["trained"], results["random"]
    assert bool((t.ci_low > t.control).any()), t.to_frame().to_string()
    assert not bool((r.ci_low > r.control).any()), r.to_frame().to_string()
    assert float(t.selectivity.max()) > float(r.selectivity.max()) + 0.1
