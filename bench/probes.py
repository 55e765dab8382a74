"""Probe-fitting speed: interp.probing.fit against its physical floor and against scikit-learn.

One process, the same synthetic activations and the same train/test split for every run:
12 layers x 6000 training examples (+1500 test) x d 768 x 10 classes, class signal growing with
depth on anisotropic features (uneven scales, a few outlier dimensions, an offset), like a
residual stream.

Floor. The solver (`interp.probing.multinomial_lbfgs`) touches the activations only through two
products per iteration over a layer's standardised training rows: the direction's logits D Z^T
and the gradient G^T Z (its line search costs no pass), with the width of the label sets still
running. The floor is the time of exactly those passes and nothing else: the solver's own count
of products per layer and width (from a second, identical solver run, checked to take the same
iterations as the fit), each product timed alone as the same BLAS call on the same [n, d] layer in
this process and thread count (best of 5). `ratio to floor` = our fit time (best of 2; it includes
the standardisation, the test predictions and the bootstrap CIs) over that floor, in wall time and
in process CPU time (on a loaded machine the CPU ratio is the steadier one). At ~10-30
outputs per row the products are compute-bound, so the memory-streaming time of the same passes
(a plain column sum over the layer, also printed) is a lower, unreachable bound.

Peer. scikit-learn gets the standard recipe `StandardScaler` + `LogisticRegression()` (C=1,
lbfgs, max_iter=100) per layer, which solves the same objective as ours; ours standardises
internally and also computes bootstrap CIs. Then the probe as the toolkit runs it: task +
Hewitt-Liang control + shuffled labels (one fit for us, three per layer for scikit-learn). A
scikit-learn run on the raw (unscaled) features is timed for reference.

    .venv/bin/python bench/probes.py [--threads 1] [--layers 12] [--train 6000] [--d 768]

Both sides run with the same number of BLAS/torch threads (default 1: on a shared machine a
multi-threaded run measures the scheduler, not the solver). Wall time and process CPU time are
printed. Not part of the test suite. Goals: ratio to floor <= 1.5x; accuracy within 1 percentage
point of scikit-learn.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from interp.probing import (
    LogisticFit,
    control_labels,
    fit,
    multinomial_lbfgs,
    shuffled_labels,
    split_by_group,
)


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


def best(fn: Callable[[], object], repeats: int) -> np.ndarray:
    """The smallest (wall, CPU) seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return np.array(times).min(axis=0)


def floor_seconds(x: torch.Tensor, train: torch.Tensor, solved: LogisticFit, l2: float, repeats: int = 5
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """(product floor, memory-stream bound, passes), (wall, CPU) seconds: the solver's passes, each
    timed alone."""
    k, d = solved.weight.shape[2], x.shape[-1]
    floor, stream = np.zeros(2), np.zeros(2)
    passes = 0
    g = torch.Generator().manual_seed(0)
    for layer in range(x.shape[0]):
        z = (x[layer, train] - solved.mean[layer]) / solved.scale[layer]  # the solver's rows
        n = z.shape[0]
        t_stream = best(lambda z=z: z.sum(dim=0), repeats)
        for j in range(solved.n_forward.shape[1]):
            n_f, n_g = int(solved.n_forward[layer, j]), int(solved.n_gradient[layer, j])
            if n_f + n_g == 0:
                continue
            w = torch.randn((j + 1) * k, d + 1, generator=g)
            resid = torch.randn((j + 1) * k, n, generator=g)
            t_f = best(lambda w=w, z=z: torch.addmm(w[:, d:], w[:, :d], z.T), repeats)
            t_g = best(lambda w=w, z=z, r=resid, n=n: torch.addmm(w[:, :d], r, z, beta=l2, alpha=1.0 / n), repeats)
            floor += n_f * t_f + n_g * t_g
            stream += (n_f + n_g) * t_stream
            passes += n_f + n_g
    return floor, stream, passes


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
    frac = args.test / n
    train, test = split_by_group(torch.arange(n), frac, seed=0)
    l2 = 1.0 / train.numel()  # C = 1
    types = torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(1))
    control, shuffled = control_labels(y, types, seed=1), shuffled_labels(y, seed=2)  # as fit(seed=0) draws them
    print(f"{args.layers} layers x {train.numel()} train / {test.numel()} test x d {args.d} x "
          f"{args.classes} classes; threads per side: {args.threads}")

    fit(x[:2, :500], y[:500], "logistic", shuffled=False, n_boot=10)  # warm-up (allocator, BLAS)

    def ours(label_sets: tuple[torch.Tensor, ...], **kw: object) -> dict:
        out: dict = {}
        walls, cpus = [], []
        for _ in range(2):
            t0, c0 = time.perf_counter(), time.process_time()
            out["res"] = fit(x, y, "logistic", test_fraction=frac, seed=0, **kw)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        out["wall"], out["cpu"] = min(walls), min(cpus)
        # the fit's own solver call, repeated alone: its pass counts define the floor
        classes, coded = torch.unique(torch.stack(label_sets), return_inverse=True)
        t0, c0 = time.perf_counter(), time.process_time()
        solved = multinomial_lbfgs(x, coded[:, train], classes.numel(), l2=l2, rows=train)
        out["solver"] = np.array([time.perf_counter() - t0, time.process_time() - c0])
        if not torch.equal(solved.n_iter, out["res"].n_iter):
            raise RuntimeError("bench: the repeated solver run took other iterations than the fit")
        out["floor"], out["stream"], out["passes"] = floor_seconds(x, train, solved, l2)
        out["ratio"] = np.array([out["wall"], out["cpu"]]) / out["floor"]  # (wall, CPU)
        return out

    def describe(name: str, o: dict) -> None:
        fl, st, sv = o["floor"], o["stream"], o["solver"]
        print(f"{name}: fit {o['wall']:.2f} s wall / {o['cpu']:.2f} s CPU (solver alone {sv[0]:.2f} / "
              f"{sv[1]:.2f} s); {o['passes']} passes over a layer's training rows; floor {fl[0]:.2f} s wall / "
              f"{fl[1]:.2f} s CPU -> fit {o['ratio'][0]:.2f}x wall, {o['ratio'][1]:.2f}x CPU (solver alone "
              f"{sv[0] / fl[0]:.2f}x, {sv[1] / fl[1]:.2f}x); memory-stream bound of the same passes "
              f"{st[0]:.2f} s ({o['wall'] / st[0]:.1f}x)")

    task = ours((y,), shuffled=False)
    res = task["res"]
    describe("ours, task only", task)

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
    ours_acc = res.value.numpy()
    gap = np.abs(ours_acc - sk).max()
    print(f"  iterations per layer: ours {res.n_iter[:, 0].tolist()}; scikit-learn {sk_iters}")
    print(f"scikit-learn StandardScaler+LogisticRegression per layer: {sk_s:7.2f} s wall, {sk_cpu:7.2f} s CPU")
    print(f"speed ratio (sklearn / ours): {sk_s / task['wall']:.1f}x wall, {sk_cpu / task['cpu']:.1f}x CPU")
    print(f"largest accuracy gap: {100 * gap:.2f} pp  (ours {np.round(ours_acc, 3).tolist()})")
    print(f"                                       (sklearn {np.round(sk, 3).tolist()})")

    # the probe as the toolkit runs it: task + Hewitt-Liang control + shuffled labels share each
    # pass over the activations; scikit-learn needs three fits per layer
    full = ours((y, control, shuffled), types=types)
    describe("ours, task + control + shuffled", full)
    sk3_s, sk3_cpu, _, _ = sklearn_run(scale=True, label_sets=(y, control, shuffled))
    print(f"  scikit-learn (3 fits per layer) {sk3_s:.2f} s wall / {sk3_cpu:.2f} s CPU: ratio "
          f"{sk3_s / full['wall']:.1f}x wall, {sk3_cpu / full['cpu']:.1f}x CPU; task accuracy moved by at most "
          f"{100 * float((full['res'].value - res.value).abs().max()):.2f} pp; selectivity "
          f"{np.round(full['res'].selectivity.numpy(), 3).tolist()}")
    print(f"ratio to floor: {full['ratio'][0]:.1f}x  (wall; CPU {full['ratio'][1]:.1f}x; task + control + "
          f"shuffled, the probe as fit() runs it; task only {task['ratio'][0]:.1f}x wall, "
          f"{task['ratio'][1]:.1f}x CPU)")
    if not args.skip_raw:
        raw_s, _, raw, raw_iters = sklearn_run(scale=False)
        print(f"reference: scikit-learn LogisticRegression on raw features: {raw_s:7.2f} s wall "
              f"(ratio {raw_s / task['wall']:.1f}x), iterations {raw_iters}, largest accuracy gap to ours "
              f"{100 * np.abs(ours_acc - raw).max():.2f} pp (it stops at max_iter=100 unconverged)")
    limits.restore_original_limits()


if __name__ == "__main__":
    main()
