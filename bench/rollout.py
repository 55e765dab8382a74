"""Benchmark: continuous-thought (hidden) rollouts — ours, K/V-cached and recomputed, vs the
Hugging Face Coconut loop.

A random-initialised GPT-2-shaped model (6 layers, d_model 256, 2000-token vocabulary) built as a
Hugging Face `GPT2LMHeadModel` and converted to a HookedTransformer with TransformerLens's own
weight conversion, so the two run the same weights. Measured in this process on the same
prompts (best of `--repeats`):

- `interp.rollout.rollout(mode="hidden")` with the K/V cache (default) and with ``cache=False``
  (the whole sequence recomputed at every step);
- the floor: the same number of K/V-cached TransformerLens forwards without hooks (the cost of
  the model itself, before the rollout's hooks, captures and bookkeeping);
- the peer: Coconut's loop in Hugging Face, the last position's ``hidden_states[-1]`` fed back
  as the next ``inputs_embeds`` with ``past_key_values`` (one position per step).

Prints the max |ours - HF| of the step logits (checked < 1e-3) and the ratios. Not part of the
test suite.

    .venv/bin/python bench/rollout.py [--threads N] [--batch 8] [--prompt 32] [--steps 32] [--repeats 3]
"""

from __future__ import annotations

import argparse

import torch
from timing import best_of
from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
from transformers import GPT2Config, GPT2LMHeadModel

from interp.rollout import new_kv_cache, rollout
from interp.tl import HookedTransformer, HookedTransformerConfig


def models(n_ctx: int) -> tuple[GPT2LMHeadModel, HookedTransformer]:
    hf = GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=256, n_head=8, n_positions=n_ctx, vocab_size=2000)).eval()
    cfg = HookedTransformerConfig(n_layers=6, d_model=256, n_heads=8, d_head=32, d_mlp=1024, n_ctx=n_ctx, d_vocab=2000,
                                  act_fn="gelu_new", normalization_type="LN", eps=1e-5, device="cpu")
    tl = HookedTransformer(cfg)
    tl.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    return hf, tl.eval()


def hf_loop(hf: GPT2LMHeadModel, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Coconut's loop: the step logits [batch, steps, vocab]."""
    out = []
    with torch.no_grad():
        o = hf(ids, output_hidden_states=True, use_cache=True)
        for _ in range(steps):
            out.append(o.logits[:, -1])
            h = o.hidden_states[-1][:, -1:]
            o = hf(inputs_embeds=h, past_key_values=o.past_key_values, output_hidden_states=True, use_cache=True)
    return torch.stack(out, 1)


def tl_floor(tl: HookedTransformer, ids: torch.Tensor, steps: int) -> None:
    """steps + 1 K/V-cached forwards (prefill, then one position each), no hooks."""
    kv = new_kv_cache(tl, ids.shape[0])
    with torch.no_grad():
        tl(ids, past_kv_cache=kv, attention_mask=torch.ones_like(ids))
        for _ in range(steps):
            tl(ids[:, :1], past_kv_cache=kv, attention_mask=torch.ones_like(ids[:, :1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf, tl = models(args.prompt + args.steps + 1)
    ids = torch.randint(0, 2000, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    ours = rollout(tl, ids, args.steps, mode="hidden")
    ref = hf_loop(hf, ids, args.steps)
    err = float((ours.logits - ref).abs().max())
    if err > 1e-3:
        raise SystemExit(f"ours and the HF loop disagree: max |diff| = {err:.2e}")
    t_kv = best_of(lambda: rollout(tl, ids, args.steps, mode="hidden"), args.repeats)
    t_re = best_of(lambda: rollout(tl, ids, args.steps, mode="hidden", cache=False), args.repeats)
    t_hf = best_of(lambda: hf_loop(hf, ids, args.steps), args.repeats)
    t_fl = best_of(lambda: tl_floor(tl, ids, args.steps), args.repeats)
    print(f"model: 6 layers, d_model 256, d_vocab 2000; batch {args.batch}, prompt {args.prompt}, {args.steps} hidden steps")
    print(f"max |ours - HF Coconut loop| (step logits) = {err:.2e}")
    print(f"interp.rollout (K/V cache): {t_kv:7.3f} s")
    print(f"interp.rollout (recompute): {t_re:7.3f} s")
    print(f"floor (TL forwards, no hooks): {t_fl:7.3f} s")
    print(f"HF loop (past_key_values):  {t_hf:7.3f} s")
    print(f"ratio to floor: {t_kv / t_fl:.2f}x; ratio to HF loop: {t_kv / t_hf:.2f}x (TL floor / HF: "
          f"{t_fl / t_hf:.2f}x); K/V cache speed-up over recompute: {t_re / t_kv:.1f}x")


if __name__ == "__main__":
    main()
