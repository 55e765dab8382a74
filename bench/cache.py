"""Caching benchmark: throughput against a plain forward, and memory of a streamed store build.

Run: .venv/bin/python bench/cache.py [--only hooked|bridge|memory]
Prints, measured in this run:
1. caching throughput (tokens/s) of interp.cache.collect over all residual streams, as a ratio
   to a plain forward pass over the same batches, and TransformerLens's run_with_cache as a peer;
2. the Bridge row: the same on a TransformerBridge (a random-initialised Llama-shaped Hugging
   Face model with grouped-query attention, saved and loaded offline as tests/hf_zoo.py does),
   interp.cache.collect vs the Bridge's own run_with_cache, their values asserted equal (bit for
   bit), the ratio printed;
3. peak RSS of a streamed disk build of >= 4x more activation bytes than its memory budget
   (shard size + one batch of activations), measured in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings

import torch
from timing import best_of, gpt2_shaped

from interp.cache import collect
from interp.models import new_model
from interp.tl import HookedTransformerConfig

warnings.filterwarnings("ignore", category=DeprecationWarning)


def model_cfg() -> HookedTransformerConfig:
    return gpt2_shaped(n_ctx=128)


def throughput() -> None:
    model = new_model(model_cfg())
    toks = torch.randint(0, 2000, (128, 128), generator=torch.Generator().manual_seed(0))
    bs = 32
    hooks = "blocks.*.hook_resid_post"

    def plain() -> None:
        with torch.inference_mode():
            for i in range(0, len(toks), bs):
                model(toks[i: i + bs])

    def ours() -> None:
        collect(model, toks, hooks=hooks, batch_size=bs, progress=False)

    def peer() -> None:
        with torch.inference_mode():
            for i in range(0, len(toks), bs):
                model.run_with_cache(toks[i: i + bs], names_filter=lambda n: n.endswith("hook_resid_post"))

    plain()  # warm up
    ours()
    # interleaved rounds, best of each: a busy neighbour slows all three alike
    t_plain = t_ours = t_peer = float("inf")
    for _ in range(5):
        t_plain, t_ours, t_peer = min(t_plain, best_of(plain, 1)), min(t_ours, best_of(ours, 1)), min(t_peer, best_of(peer, 1))
    n_tok = toks.numel()
    print(f"plain forward      : {n_tok / t_plain:10.0f} tok/s")
    print(f"interp.collect     : {n_tok / t_ours:10.0f} tok/s   ratio to plain forward {t_plain / t_ours:.2f}x (goal >= 0.9x)")
    print(f"TL run_with_cache  : {n_tok / t_peer:10.0f} tok/s   ratio to plain forward {t_plain / t_peer:.2f}x")


def _word_tokenizer(n: int):
    """A word-level tokenizer of `n` words (a Llama folder needs a tokenizer to boot offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, **{f"w{i}": i for i in range(2, n)}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", pad_token="<unk>")


def bridge_throughput() -> None:
    """collect vs the Bridge's own run_with_cache (and a plain forward) on an HF Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from interp.models import load_model

    cfg = LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    toks = torch.randint(0, cfg.vocab_size, (64, 128), generator=torch.Generator().manual_seed(0))
    bs = 32
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(cfg.num_hidden_layers)]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(tmp)
        _word_tokenizer(cfg.vocab_size).save_pretrained(tmp)
        model = load_model(tmp, device="cpu")

    def plain() -> None:
        with torch.inference_mode():
            for i in range(0, len(toks), bs):
                model(toks[i: i + bs])

    def ours():  # noqa: ANN202
        return collect(model, toks, hooks=names, batch_size=bs, progress=False)

    def peer() -> list[dict]:
        out = []
        with torch.inference_mode():
            for i in range(0, len(toks), bs):
                _, c = model.run_with_cache(toks[i: i + bs], names_filter=names)
                out.append({n: c[n] for n in names})
        return out

    got, ref = ours(), peer()  # also the warm-up
    for n in names:
        want = torch.cat([r[n] for r in ref])
        assert torch.equal(got[n], want), f"{n}: collect differs from the Bridge's run_with_cache by " \
                                          f"{(got[n] - want).abs().max().item():.3g}"
    plain()
    t_plain = t_ours = t_peer = float("inf")
    for _ in range(5):  # interleaved rounds, best of each
        t_plain, t_ours, t_peer = min(t_plain, best_of(plain, 1)), min(t_ours, best_of(ours, 1)), min(t_peer, best_of(peer, 1))
    n_tok = toks.numel()
    print(f"Bridge (TransformerBridge, HF Llama): {cfg.num_hidden_layers} layers, d_model {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV groups, d_vocab {cfg.vocab_size}; tokens "
          f"{tuple(toks.shape)}, batch {bs}; {len(names)} hooks; values equal bit for bit")
    print(f"Bridge plain forward       : {n_tok / t_plain:10.0f} tok/s")
    print(f"Bridge interp.collect      : {n_tok / t_ours:10.0f} tok/s   ratio to plain forward {t_plain / t_ours:.2f}x")
    print(f"Bridge run_with_cache (TL) : {n_tok / t_peer:10.0f} tok/s   ratio to plain forward {t_plain / t_peer:.2f}x")
    print(f"Bridge collect vs the Bridge's run_with_cache: {t_peer / t_ours:.2f}x (>1: collect is faster)")


CHILD = r"""
import json, resource, sys, time, warnings, psutil, torch
warnings.filterwarnings("ignore")
sys.path.insert(0, "bench")
from cache import model_cfg
from interp.cache import collect
from interp.models import new_model
mode, out, n, bs, shard = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model = new_model(model_cfg())
toks = torch.randint(0, 2000, (n, 128), generator=torch.Generator().manual_seed(0))
base = psutil.Process().memory_info().rss
t0 = time.perf_counter()
if mode == "forward":  # the batch's own working set: a plain forward loop, nothing kept
    with torch.inference_mode():
        for i in range(0, n, bs):
            model(toks[i:i + bs])
    rows = n
else:
    rows = collect(model, toks, hooks="blocks.*.hook_resid_post", batch_size=bs, out=out, shard_bytes=shard,
                   progress=False).n_examples
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base": base, "peak": peak, "rows": rows, "seconds": dt}))
"""


def _child(mode: str, n: int, bs: int, shard: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        res = subprocess.run([sys.executable, "-c", CHILD, mode, f"{d}/store", str(n), str(bs), str(shard)],
                             capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def streamed_memory() -> None:
    cfg = model_cfg()
    bs, shard = 16, 32 << 20
    row_bytes = cfg.n_layers * 128 * cfg.d_model * 4
    fwd = _child("forward", 2 * bs, bs, shard)
    working = fwd["peak"] - fwd["base"]
    budget = shard + working
    print(f"memory budget      : {budget / 2**20:.0f} MiB = shard {shard / 2**20:.0f} MiB + one batch's forward "
          f"working set {working / 2**20:.0f} MiB (measured)")
    for factor in (4, 8):
        n = factor * budget // row_bytes + 1
        r = _child("store", n, bs, shard)
        data_bytes = r["rows"] * row_bytes
        grew = r["peak"] - r["base"]
        print(f"streamed build     : {data_bytes / 2**20:5.0f} MiB of activations ({data_bytes / budget:.1f}x the "
              f"budget) in {r['seconds']:.1f} s; peak RSS growth {grew / 2**20:.0f} MiB = "
              f"{grew / budget:.2f}x the budget, {grew / data_bytes:.2f}x the data")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("hooked", "bridge", "memory"), default=None, help="run one row only")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}")
    if args.only in (None, "hooked"):
        throughput()
    if args.only in (None, "bridge"):
        bridge_throughput()
    if args.only in (None, "memory"):
        streamed_memory()
