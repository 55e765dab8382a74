"""Generation benchmark: interp.decoding.generate with its KV cache vs without (the whole sequence
recomputed at every step), and vs TransformerLens's own `HookedTransformer.generate` with
`use_past_kv_cache=True` as the peer, on one model in one process.

Run: .venv/bin/python bench/decoding.py [--steps 48] [--batch 8] [--prompt 16]
Prints, measured in this run: wall seconds (best of interleaved rounds) and tokens/s of each, the
speed ratio cached / uncached and ours / TransformerLens; asserts before timing that the cached
and uncached runs emit identical greedy tokens with logits equal to float32 rounding, and that
TransformerLens's uncached greedy tokens are ours; prints how many rows of TransformerLens's
KV-cached greedy decoding agree (measured on TL 3.9, this learned-position config: none of 8
rows, the first difference at step 1 or 2; and it fails past n_ctx / 2 tokens, see `main`).
"""

from __future__ import annotations

import argparse
import warnings

import torch
from timing import best_of, gpt2_shaped

from interp.decoding import generate
from interp.models import new_model

warnings.filterwarnings("ignore", category=DeprecationWarning)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    # n_ctx twice the length decoded: TransformerLens 3's generate fails once a sequence passes n_ctx / 2
    # tokens on this config ("size of tensor a (33) must match ... (32)" at n_ctx 64), measured here
    model = new_model(gpt2_shaped(n_ctx=2 * (a.prompt + a.steps)))
    toks = torch.randint(0, model.cfg.d_vocab, (a.batch, a.prompt), generator=torch.Generator().manual_seed(0))

    cached = generate(model, toks, a.steps)
    uncached = generate(model, toks, a.steps, cache=False)
    assert torch.equal(cached.tokens, uncached.tokens), "cached and uncached greedy tokens differ"
    diff = float((cached.logits - uncached.logits).abs().max())
    assert diff < 1e-4, f"cached vs uncached logits: expected equal to float32 rounding, got max diff {diff:.2e}"
    def tl_generate(kv: bool) -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(toks, max_new_tokens=a.steps, do_sample=False, use_past_kv_cache=kv,
                                  stop_at_eos=False, verbose=False, return_type="tokens")[:, a.prompt:].cpu()

    tl_plain, tl_kv = tl_generate(False), tl_generate(True)
    assert torch.equal(tl_plain, cached.tokens), "TransformerLens's uncached greedy tokens differ from ours"
    same = (tl_kv == cached.tokens).all(1)
    first = [int((tl_kv[i] != cached.tokens[i]).nonzero()[0, 0]) for i in range(a.batch) if not same[i]]

    def ours() -> None:
        generate(model, toks, a.steps)

    def ours_uncached() -> None:
        generate(model, toks, a.steps, cache=False)

    t_c = t_u = t_p = t_q = float("inf")
    for _ in range(a.rounds):  # interleaved: a busy neighbour slows all alike
        t_c, t_u = min(t_c, best_of(ours, 1)), min(t_u, best_of(ours_uncached, 1))
        t_p, t_q = min(t_p, best_of(lambda: tl_generate(True), 1)), min(t_q, best_of(lambda: tl_generate(False), 1))
    n = a.batch * a.steps
    print(f"model: 6 layers, d_model 256, vocab 2000; batch {a.batch}, prompt {a.prompt} tokens, {a.steps} new tokens")
    print(f"interp cached vs uncached: identical tokens, max logit diff {diff:.1e}; TransformerLens generate without "
          f"its KV cache: identical tokens")
    print(f"TransformerLens generate with use_past_kv_cache=True: {int(same.sum())}/{a.batch} rows equal to the "
          f"uncached greedy tokens" + (f" (first difference at steps {first})" if first else ""))
    print(f"interp generate, KV cache        : {t_c:7.3f} s  {n / t_c:8.0f} tok/s")
    print(f"interp generate, no cache        : {t_u:7.3f} s  {n / t_u:8.0f} tok/s")
    print(f"TransformerLens generate, kv     : {t_p:7.3f} s  {n / t_p:8.0f} tok/s")
    print(f"TransformerLens generate, no kv  : {t_q:7.3f} s  {n / t_q:8.0f} tok/s")
    print(f"ratio cached / uncached (interp): {t_u / t_c:.2f}x faster")
    print(f"ratio ours (kv) / TransformerLens (kv): {t_p / t_c:.2f}x (above 1: ours faster)")


if __name__ == "__main__":
    main()
