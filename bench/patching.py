"""Benchmark: a full resid_pre x position activation-patching sweep, ours vs TransformerLens.

A random-initialised 12-layer, d_model 768 GPT-2-shaped model (GPT-2 small's shape and
vocabulary size) on 16 tokens. Both run in this process on the same inputs:
`interp.patching.sweep` and `transformer_lens.patching.get_act_patch_resid_pre` (run once: one
full forward per patched cell). The script checks that they agree (1e-4) and prints both times
and the ratio. Not part of the test suite.

    .venv/bin/python bench/patching.py [--threads N] [--seq 16] [--rows 256]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformer_lens import HookedTransformerConfig
from transformer_lens import patching as tl_patching

from interp.models import new_model
from interp.patching import logit_diff, sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = HookedTransformerConfig(
        n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024, d_vocab=50257,
        act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard",
        seed=0, dtype=torch.float32, device="cpu")
    model = new_model(cfg)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, cfg.d_vocab, (args.batch, args.seq), generator=g)
    corrupt = clean.clone()
    corrupt[:, args.seq // 2] = torch.randint(0, cfg.d_vocab, (args.batch,), generator=g)
    right = torch.randint(0, cfg.d_vocab, (args.batch,), generator=g)
    wrong = torch.randint(0, cfg.d_vocab, (args.batch,), generator=g)
    metric = logit_diff(right, wrong, pos=-1)

    with torch.inference_mode():
        model(clean)  # warm-up (allocator, kernels) for both sides
    t0, c0 = time.perf_counter(), time.process_time()
    ours = sweep(model, clean, corrupt, metric, "resid_pre", rows=args.rows)
    t_ours, c_ours = time.perf_counter() - t0, time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        _, clean_cache = model.run_with_cache(clean)
        ref = tl_patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric)
    t_tl, c_tl = time.perf_counter() - t0, time.process_time() - c0

    err = (ours.values - ref.double().cpu()).abs().max().item()
    n_cells = ref.numel()
    print(f"model: 12 layers, d_model 768, d_vocab {cfg.d_vocab}; tokens {tuple(clean.shape)}; "
          f"{n_cells} patched cells; torch threads {torch.get_num_threads()}")
    print(f"max |ours - transformer_lens| = {err:.2e}")
    torch.testing.assert_close(ours.values, ref.double().cpu(), atol=1e-4, rtol=0)
    # wall time is what a user waits; CPU time (all threads of this process) is less sensitive
    # to other processes competing for the same cores
    print(f"interp.patching.sweep:    wall {t_ours:8.2f} s ({1e3 * t_ours / n_cells:7.1f} ms / cell), "
          f"cpu {c_ours:8.2f} s")
    print(f"get_act_patch_resid_pre:  wall {t_tl:8.2f} s ({1e3 * t_tl / n_cells:7.1f} ms / cell), "
          f"cpu {c_tl:8.2f} s")
    print(f"speed-up: {t_tl / t_ours:.1f}x wall, {c_tl / c_ours:.1f}x cpu")


if __name__ == "__main__":
    main()
