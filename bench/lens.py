"""Lens benchmark: ours against the peers on the same inputs, measured in one run.

Run: .venv/bin/python bench/lens.py [--threads N]
Prints, measured in this run:
1. logit lens over all layers and positions: `interp.lens.logit_lens` (one hooked forward,
   selected positions decoded for all layers at once, KL/top-k/rank included) against
   TransformerLens's `run_with_cache` + `accumulated_resid(apply_ln=True)` + `unembed` (logits
   only), with the largest logit difference;
2. future-lens fits: `interp.lens.softmax_regression` (all layers in one batched L-BFGS) against
   scikit-learn's `LogisticRegression` fitted per layer on the same standardised features and
   split, with the largest test-accuracy gap;
3. tuned-lens training throughput (optimizer steps per second).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from timing import best_of, gpt2_shaped

from interp.lens import TunedLens, TunedLensConfig, logit_lens, residual_stack, softmax_regression
from interp.models import new_model
from interp.tl import HookedTransformerConfig

warnings.filterwarnings("ignore", category=DeprecationWarning)


def model_cfg() -> HookedTransformerConfig:
    return gpt2_shaped(n_ctx=64)


def bench_logit_lens(model, toks) -> None:
    def tl():
        with torch.no_grad():
            _, cache = model.run_with_cache(toks)
            return model.unembed(cache.accumulated_resid(apply_ln=True))

    def ours():
        return logit_lens(model, toks, pos=None, k=5, keep_logits=True, progress=False)

    diff = float((ours().logits - tl()).abs().max())
    t_tl, t_ours = best_of(tl), best_of(ours)
    print(f"logit lens ({tuple(toks.shape)} tokens, {model.cfg.n_layers + 1} lens layers, vocab "
          f"{model.cfg.d_vocab}): ours {t_ours:.3f} s (with KL, entropy, top-5) vs TransformerLens "
          f"{t_tl:.3f} s (logits only); ratio TL/ours {t_tl / t_ours:.2f}; max |logit diff| {diff:.2e}")


def bench_future_fit(model, toks, offset: int = 2, n_classes: int = 10) -> None:
    from sklearn.linear_model import LogisticRegression

    targets = toks % n_classes  # a fixed labelling of x_{t+k} into n_classes classes
    acts = residual_stack(model, toks, batch_size=64)[:, :, :-offset]  # [layer, b, pos, d]
    y = targets[:, offset:]
    n_train = int(0.75 * toks.shape[0])
    x_tr, x_te = acts[:, :n_train].flatten(1, 2), acts[:, n_train:].flatten(1, 2)
    y_tr, y_te = y[:n_train].flatten(), y[n_train:].flatten()
    l2 = 1e-3
    fit = None

    def ours():
        nonlocal fit
        fit = softmax_regression(x_tr, y_tr, n_classes, l2=l2, max_iter=200)

    t_ours = best_of(ours, 1)
    acc_ours = (fit.logits(x_te).argmax(-1) == y_te).double().mean(1)
    z_tr = ((x_tr - fit.mean[:, None]) / fit.scale[:, None]).numpy()
    z_te = ((x_te - fit.mean[:, None]) / fit.scale[:, None]).numpy()
    acc_sk = []
    t0 = time.perf_counter()
    for layer in range(acts.shape[0]):
        clf = LogisticRegression(C=1 / (l2 * len(y_tr)), max_iter=1000).fit(z_tr[layer], y_tr.numpy())
        acc_sk.append(float((torch.from_numpy(clf.predict(z_te[layer])) == y_te).double().mean()))
    t_sk = time.perf_counter() - t0
    gap = float((acc_ours - torch.tensor(acc_sk, dtype=torch.float64)).abs().max())
    print(f"future-lens fit ({acts.shape[0]} layers x {len(y_tr)} train x d {acts.shape[-1]} x "
          f"{n_classes} classes): ours {t_ours:.2f} s vs scikit-learn per layer {t_sk:.2f} s; ratio "
          f"{t_sk / t_ours:.2f}; max test-accuracy gap {100 * gap:.2f} pp")


def bench_tuned(model, toks) -> None:
    acts = residual_stack(model, toks, batch_size=64).flatten(1, 2)
    cfg = TunedLensConfig(steps=50, lr=1e-3, batch_tokens=512)
    t = best_of(lambda: TunedLens.fit(model, acts, cfg, progress=False), 1)
    print(f"tuned lens training: {cfg.steps / t:.1f} steps/s ({cfg.batch_tokens} tokens/step, "
          f"{model.cfg.n_layers} translators of d {model.cfg.d_model}, vocab {model.cfg.d_vocab})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = new_model(model_cfg())
    g = torch.Generator().manual_seed(0)
    bench_logit_lens(model, torch.randint(0, 2000, (16, 64), generator=g))
    bench_future_fit(model, torch.randint(0, 2000, (160, 64), generator=g))
    bench_tuned(model, torch.randint(0, 2000, (64, 64), generator=g))


if __name__ == "__main__":
    main()
