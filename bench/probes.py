"""Probe-fitting speed: interp.probing.fit (all layers at once) vs scikit-learn per layer.

One process, the same synthetic activations and the same train/test split for both:
12 layers x 6000 training examples (+1500 test) x d 768 x 10 classes, class signal growing with
depth on anisotropic features (uneven scales, a few outlier dimensions, an offset), like a
residual stream. scikit-learn gets the standard recipe `StandardScaler` + `LogisticRegression()`
(C=1, lbfgs, max_iter=100) per layer, which solves the same objective as ours; ours standardises
internally and also computes bootstrap CIs. A second scikit-learn run on the raw (unscaled)
features is timed for reference. Prints both times, the speed ratio and the largest accuracy gap.

    .venv/bin/python bench/probes.py [--threads 1] [--layers 12] [--train 6000] [--d 768]

Both sides run with the same number of BLAS/torch threads (default 1: on a shared machine a
multi-threaded run measures the scheduler, not the solver; with oversubscribed cores every
small parallel op waits for a descheduled thread). Wall time and process CPU time are printed.

Not part of the test suite. Goal: >= 5x faster with accuracy within 1 percentage point.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from interp.probing import control_labels, fit, shuffled_labels, split_by_group


def activations(n_layers: int, n: int, d: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    means = torch.randn(k, d, generator=g)
    scale = torch.rand(d, generator=g) * 3 + 0.2
    scale[:4] *= 20  # outlier dimensions
    x = torch.empty(n_layers, n, d)
    for layer in range(n_layers):
        s = 0.02 + 0.03 * layer
        x[layer] = (torch.randn(n, d, generator=g) + s * means[y]) * scale + 0.5
    return x, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--train", type=int, default=6000)
    ap.add_argument("--test", type=int, default=1500)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads for both sides")
    ap.add_argument("--skip-raw", action="store_true", help="skip the unscaled scikit-learn reference run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    limits = threadpool_limits(limits=args.threads)  # numpy/scipy BLAS used by scikit-learn
    n = args.train + args.test
    x, y = activations(args.layers, n, args.d, args.classes)
    train, test = split_by_group(torch.arange(n), args.test / n, seed=0)
    print(f"{args.layers} layers x {train.numel()} train / {test.numel()} test x d {args.d} x "
          f"{args.classes} classes; threads per side: {args.threads}")

    fit(x[:2, :500], y[:500], "logistic", shuffled=False, n_boot=10)  # warm-up (allocator, BLAS)
    t0, c0 = time.perf_counter(), time.process_time()
    res = fit(x, y, "logistic", shuffled=False, test_fraction=args.test / n, seed=0)
    ours_s, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
    ours = res.value.numpy()

    def sklearn_run(scale: bool, label_sets: tuple[torch.Tensor, ...] = (y,)
                    ) -> tuple[float, float, np.ndarray, list[int]]:
        accs, iters = [], []
        t, c = time.perf_counter(), time.process_time()
        for layer in range(args.layers):
            xtr, xte = x[layer, train].numpy(), x[layer, test].numpy()
            if scale:
                sc = StandardScaler().fit(xtr)
                xtr, xte = sc.transform(xtr), sc.transform(xte)
            for i, labels in enumerate(label_sets):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    m = LogisticRegression(C=1.0, max_iter=100).fit(xtr, labels[train].numpy())
                if i == 0:
                    accs.append(m.score(xte, labels[test].numpy()))
                    iters.append(int(m.n_iter_[0]))
        return time.perf_counter() - t, time.process_time() - c, np.array(accs), iters

    sk_s, sk_cpu, sk, sk_iters = sklearn_run(scale=True)
    gap = np.abs(ours - sk).max()
    print(f"ours (batched L-BFGS, all layers, with bootstrap CIs): {ours_s:7.2f} s wall, {ours_cpu:7.2f} s CPU; "
          f"iterations per layer {res.n_iter[:, 0].tolist()}")
    print(f"scikit-learn StandardScaler+LogisticRegression per layer: {sk_s:7.2f} s wall, {sk_cpu:7.2f} s CPU; "
          f"iterations per layer {sk_iters}")
    print(f"speed ratio (sklearn / ours): {sk_s / ours_s:.1f}x wall, {sk_cpu / ours_cpu:.1f}x CPU")
    print(f"largest accuracy gap: {100 * gap:.2f} pp  (ours {np.round(ours, 3).tolist()})")
    print(f"                                       (sklearn {np.round(sk, 3).tolist()})")
    # the probe as the toolkit runs it: task + Hewitt-Liang control + shuffled labels, which share
    # each pass over the activations; scikit-learn needs three fits per layer
    types = torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(1))
    t0, c0 = time.perf_counter(), time.process_time()
    full = fit(x, y, "logistic", types=types, test_fraction=args.test / n, seed=0)
    hon_s, hon_cpu = time.perf_counter() - t0, time.process_time() - c0
    sk3_s, sk3_cpu, _, _ = sklearn_run(scale=True, label_sets=(y, control_labels(y, types, seed=1),
                                                               shuffled_labels(y, seed=2)))
    print(f"with control task + shuffled baseline: ours {hon_s:.2f} s wall / {hon_cpu:.2f} s CPU, scikit-learn "
          f"(3 fits per layer) {sk3_s:.2f} s wall / {sk3_cpu:.2f} s CPU: ratio {sk3_s / hon_s:.1f}x wall, "
          f"{sk3_cpu / hon_cpu:.1f}x CPU; task accuracy moved by at most "
          f"{100 * float((full.value - res.value).abs().max()):.2f} pp; selectivity "
          f"{np.round(full.selectivity.numpy(), 3).tolist()}")
    if not args.skip_raw:
        raw_s, _, raw, raw_iters = sklearn_run(scale=False)
        print(f"reference: scikit-learn LogisticRegression on raw features: {raw_s:7.2f} s wall "
              f"(ratio {raw_s / ours_s:.1f}x), iterations {raw_iters}, largest accuracy gap to ours "
              f"{100 * np.abs(ours - raw).max():.2f} pp (it stops at max_iter=100 unconverged)")
    limits.restore_original_limits()


if __name__ == "__main__":
    main()
