"""Activation caching: bit-for-bit against run_with_cache, padding, disk stores, resume, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from interp.cache import collect, rows
from interp.hooks import HookError
from interp.models import save_model
from interp.prompts import Prompts
from interp.store import StoreError, open_store
from interp.tl import is_native
from interp.tokens import Batch

HOOKS = ["blocks.*.hook_resid_post", "blocks.1.attn.hook_k", "blocks.0.attn.hook_pattern",
         "blocks.2.hook_mlp_out"]


def test_bit_for_bit_with_run_with_cache(any_model):
    toks = torch.randint(0, 50, (6, 9), generator=torch.Generator().manual_seed(1))
    _, ref = any_model.run_with_cache(toks)
    cache = collect(any_model, toks, hooks=HOOKS, batch_size=6, progress=False)
    assert sorted(cache) == sorted(n for n in ref if n.endswith(("resid_post", "1.attn.hook_k",
                                                                 "0.attn.hook_pattern", "2.hook_mlp_out")))
    for name in cache:
        assert torch.equal(cache[name], ref[name]), name
    assert torch.equal(cache["resid_post", 1], ref["blocks.1.hook_resid_post"])


def test_positions_layers_and_dtype(any_model):
    toks = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(2))
    _, ref = any_model.run_with_cache(toks)
    c = collect(any_model, toks, hooks="blocks.*.hook_resid_pre", layers=[1], positions=[0, -1],
                dtype=torch.float16, progress=False)
    assert c.hook_names == ["blocks.1.hook_resid_pre"]
    want = ref["blocks.1.hook_resid_pre"][:, [0, 7]].to(torch.float16)
    assert torch.equal(c["blocks.1.hook_resid_pre"], want)
    mask = torch.zeros(8, dtype=torch.bool)
    mask[[2, 5]] = True
    c = collect(any_model, toks, hooks=["blocks.0.attn.hook_pattern"], positions=mask, progress=False)
    assert torch.equal(c["blocks.0.attn.hook_pattern"], ref["blocks.0.attn.hook_pattern"][:, :, [2, 5]])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_prompt_alone(any_model, side):
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 50, (n,), generator=g) for n in (4, 9, 6, 1)]
    batch = Batch.pad(seqs, side=side, pad_id=7)
    all_pos = collect(any_model, batch, hooks=["blocks.2.hook_resid_post", "blocks.0.attn.hook_v"],
                      progress=False)
    last = collect(any_model, batch, hooks=["blocks.2.hook_resid_post"], positions="last", progress=False)
    for i, s in enumerate(seqs):
        _, alone = any_model.run_with_cache(s[None])
        for name in ("blocks.2.hook_resid_post", "blocks.0.attn.hook_v"):
            torch.testing.assert_close(all_pos[name][i][batch.mask[i]], alone[name][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(last["blocks.2.hook_resid_post"][i, 0],
                                   alone["blocks.2.hook_resid_post"][0, -1], atol=1e-5, rtol=1e-5)


def test_bad_inputs(gpt2_model):
    toks = torch.randint(0, 50, (2, 5))
    with pytest.raises(HookError, match="closest"):
        collect(gpt2_model, toks, hooks=["blocks.0.hook_resid_psot"], progress=False)
    with pytest.raises(ValueError, match="within each prompt's length"):
        collect(gpt2_model, toks, hooks=["blocks.0.hook_resid_pre"], positions=[5], progress=False)
    with pytest.raises(TypeError, match="integer dtype"):
        collect(gpt2_model, toks.float(), hooks=["blocks.0.hook_resid_pre"], progress=False)
    with pytest.raises(ValueError, match=r"ids in \[0, 50\)"):
        collect(gpt2_model, toks + 100, hooks=["blocks.0.hook_resid_pre"], progress=False)


def test_store_roundtrip_equals_memory(any_model, tmp_path):
    toks = torch.randint(0, 50, (10, 7), generator=torch.Generator().manual_seed(4))
    mem = collect(any_model, toks, hooks=HOOKS, batch_size=3, progress=False)
    store = collect(any_model, toks, hooks=HOOKS, batch_size=3, out=tmp_path / "s", shard_bytes=2000,
                    progress=False)
    assert len(store.manifest["shards"]) > 1  # really sharded
    reopened = open_store(tmp_path / "s")
    assert reopened.complete and reopened.n_examples == 10
    for name in mem:
        assert torch.equal(reopened[name], mem[name]), name
        assert torch.equal(torch.cat(list(reopened.iter_batches(name, 4))), mem[name])
        assert torch.equal(reopened.rows(name, 2, 8), mem[name][2:8])
    # rerunning a complete build recomputes nothing and returns the same store
    again = collect(any_model, toks, hooks=HOOKS, batch_size=3, out=tmp_path / "s", progress=False)
    assert again.n_examples == 10


def test_store_detects_corruption_and_truncation(gpt2_model, tmp_path):
    toks = torch.randint(0, 50, (6, 5))
    collect(gpt2_model, toks, hooks=["blocks.0.hook_resid_post"], batch_size=2, out=tmp_path / "s",
            shard_bytes=500, progress=False)
    shard = tmp_path / "s" / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="corrupted"):
        open_store(tmp_path / "s")
    shard.write_bytes(bytes(data[:-20]))
    with pytest.raises(StoreError, match="truncated"):
        open_store(tmp_path / "s")
    with pytest.raises(StoreError, match="manifest.json"):
        open_store(tmp_path / "nothing")


def test_store_resume_refuses_a_different_build(gpt2_model, tmp_path):
    toks = torch.randint(0, 50, (4, 5))
    collect(gpt2_model, toks, hooks=["blocks.0.hook_resid_post"], out=tmp_path / "s", progress=False)
    with pytest.raises(StoreError, match="same build"):
        collect(gpt2_model, toks, hooks=["blocks.1.hook_resid_post"], out=tmp_path / "s", progress=False)


def test_killed_build_resumes_without_duplicates_or_loss(gpt2_model, tmp_path):
    model_dir = save_model(gpt2_model, tmp_path / "model")
    toks = torch.randint(0, 50, (40, 6), generator=torch.Generator().manual_seed(5))
    torch.save(toks, tmp_path / "toks.pt")
    script = textwrap.dedent(f"""
        import time, torch
        from interp.cache import collect, rows
        from interp.models import load_model
        m = load_model({str(model_dir)!r})
        toks = torch.load({str(tmp_path / 'toks.pt')!r})
        def slow():
            for i in range(0, 40, 4):
                time.sleep(0.3)
                yield toks[i:i + 4]
        collect(m, slow(), hooks=["blocks.*.hook_resid_post"], batch_size=4,
                out={str(tmp_path / 'store')!r}, shard_bytes=1, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONWARNINGS": "ignore"})
    manifest = tmp_path / "store" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if manifest.exists() and json.loads(manifest.read_text())["n_rows"] >= 12:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = json.loads(manifest.read_text())
    assert 12 <= partial["n_rows"] < 40 and not partial["complete"]
    resumed = collect(gpt2_model, toks, hooks=["blocks.*.hook_resid_post"], batch_size=4,
                      out=tmp_path / "store", shard_bytes=1, progress=False)
    whole = collect(gpt2_model, toks, hooks=["blocks.*.hook_resid_post"], batch_size=4,
                    out=tmp_path / "whole", shard_bytes=1, progress=False)
    assert resumed.n_examples == whole.n_examples == 40
    for name in whole.hook_names:
        assert torch.equal(open_store(tmp_path / "store")[name], whole[name])


# ------------------------------------------------ Prompts: named positions, padded == alone (issue 11)

# one hook of every kind (residual, block outputs, per-head, per-KV-group, attention patterns and
# scores, embedding, final norm)
KINDS = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.2.hook_resid_post",
         "blocks.1.hook_attn_out", "blocks.0.hook_mlp_out", "blocks.1.attn.hook_z", "blocks.2.attn.hook_q",
         "blocks.0.attn.hook_k", "blocks.2.attn.hook_v", "blocks.1.attn.hook_pattern",
         "blocks.0.attn.hook_attn_scores", "ln_final.hook_normalized"]


def _city_prompts(tokenizer, side):
    from tests.conftest import CITY_PROMPTS

    return Prompts.from_text([p for p, _, _ in CITY_PROMPTS], tokenizer,
                             spans={"subject": [s for _, s, _ in CITY_PROMPTS]},
                             answers=[a for _, _, a in CITY_PROMPTS], side=side)


def _tl_holds_pattern(model, name: str) -> bool:
    """TL's own run_with_cache on a native bridge (the TL 4 fixtures) holds the pattern at
    hook_attn_scores (its native attention hands the bridge only that); the toolkit's holds the
    scores (interp.native_attn, tested there against the HookedTransformer's)."""
    return is_native(model) and name.endswith("hook_attn_scores")


def _as_tl(model, name: str, t: torch.Tensor) -> torch.Tensor:
    """`t` as TL's own cache holds it: the softmax over keys of scores where TL holds the pattern."""
    return t.softmax(-1) if _tl_holds_pattern(model, name) else t


def test_collect_one_prompt_is_bit_for_bit_run_with_cache(any_model, bpe_tokenizer):
    p = _city_prompts(bpe_tokenizer, "right")
    for i in (0, 3):
        one = p.select([i])  # unpadded: one prompt alone
        _, ref = any_model.run_with_cache(one.tokens)
        cache = collect(any_model, one, hooks=KINDS, progress=False)
        for name in KINDS:
            if _tl_holds_pattern(any_model, name):  # the softmax of our scores is TL's (recomputed: not bitwise)
                torch.testing.assert_close(_as_tl(any_model, name, cache[name]), ref[name], atol=1e-6, rtol=0)
                continue
            assert torch.equal(cache[name], ref[name]), name


@pytest.mark.parametrize("side", ["left", "right"])
def test_collect_named_positions_on_padded_prompts_equal_each_prompt_alone(any_model, bpe_tokenizer, side):
    p = _city_prompts(bpe_tokenizer, side)
    assert len(set(p.lengths.tolist())) > 1 and side == p.side  # prompts of different lengths, padded
    caches = {pos: collect(any_model, p, hooks=KINDS, positions=pos, batch_size=2, progress=False)
              for pos in ("all", "last", "subject")}
    assert caches["all"].side == side
    subj = p.span("subject")
    assert int((subj[:, 1] - subj[:, 0]).min()) < int((subj[:, 1] - subj[:, 0]).max())  # spans of different widths
    for i in range(len(p)):
        alone = p.select([i])
        n = int(alone.lengths[0])
        _, ref = any_model.run_with_cache(alone.tokens)
        shift = int(p.shift()[i])
        for name in KINDS:
            q_dim = 2 if name.endswith(("pattern", "attn_scores")) else 1
            want = ref[name][0]
            got_all = caches["all"][name][i]
            got_all = got_all.narrow(q_dim - 1, shift, n)  # the caller's layout: prompt i's positions
            if q_dim == 2:  # keys: the right-padded layout the run computed on
                got_all = got_all[..., :n]
            torch.testing.assert_close(_as_tl(any_model, name, got_all), want, atol=1e-5, rtol=1e-5, msg=name)
            last = int(alone.index("last")[0])
            torch.testing.assert_close(_as_tl(any_model, name, caches["last"][name][i].select(q_dim - 1, 0)[..., :n]
                                              if q_dim == 2 else caches["last"][name][i, 0]),
                                       want.select(q_dim - 1, last), atol=1e-5, rtol=1e-5, msg=name)
            s, e = (int(x) for x in subj[i])
            got_s = caches["subject"][name][i]
            got_s = got_s.narrow(q_dim - 1, 0, e - s)
            if q_dim == 2:
                got_s = got_s[..., :n]
            torch.testing.assert_close(_as_tl(any_model, name, got_s), want.narrow(q_dim - 1, s, e - s),
                                       atol=1e-5, rtol=1e-5, msg=name)
            width = caches["subject"][name].shape[q_dim]
            rest = caches["subject"][name][i].narrow(q_dim - 1, e - s, width - (e - s))
            assert bool(rest.isnan().all()), name  # a position this prompt does not have is NaN, not a pad read
        assert caches["subject"].positions[i, : e - s].tolist() == list(range(s, e))
        assert bool((caches["subject"].positions[i, e - s:] == -1).all())


def test_rows_reads_each_prompts_named_position(gpt2_model, bpe_tokenizer):
    left = _city_prompts(bpe_tokenizer, "left")
    name = "blocks.1.hook_resid_post"
    every = collect(gpt2_model, left, hooks=[name], progress=False)  # left layout
    at_last = collect(gpt2_model, left, hooks=[name], positions="last", progress=False)
    for where in ("last", "subject"):
        got = rows(every, left, where)
        for i in range(len(left)):
            _, ref = gpt2_model.run_with_cache(left.select([i]).tokens)
            torch.testing.assert_close(got[i], ref[name][0, int(left.index(where)[i])], atol=1e-5, rtol=1e-5)
    assert torch.equal(rows(at_last, left, "last"), rows(every, left, "last"))
    with pytest.raises(ValueError, match="expected the cache's positions to include each prompt's index"):
        rows(at_last, left, "subject")


def test_collect_span_names_need_prompts_and_stores_digest_the_spans(gpt2_model, bpe_tokenizer, tmp_path):
    p = _city_prompts(bpe_tokenizer, "right")
    with pytest.raises(ValueError, match=r"positions: expected 'all' or a named position of the prompts"):
        collect(gpt2_model, p, hooks=["blocks.0.hook_resid_post"], positions="object", progress=False)
    with pytest.raises(ValueError, match="span names need Prompts"):
        collect(gpt2_model, Batch(p.tokens, p.lengths), hooks=["blocks.0.hook_resid_post"], positions="subject",
                progress=False)
    store = collect(gpt2_model, p, hooks=["blocks.0.hook_resid_post"], positions="subject", out=tmp_path / "s",
                    progress=False)
    mem = collect(gpt2_model, p, hooks=["blocks.0.hook_resid_post"], positions="subject", progress=False)
    torch.testing.assert_close(store["blocks.0.hook_resid_post"], mem["blocks.0.hook_resid_post"], equal_nan=True)
    moved = p.with_spans(subject=[(0, 1)] * len(p))  # same tokens, another span: another store content
    with pytest.raises(StoreError, match="positions"):
        collect(gpt2_model, moved, hooks=["blocks.0.hook_resid_post"], positions="subject", out=tmp_path / "s",
                progress=False)


def test_a_store_of_last_tokens_tells_teacher_forced_prompts_from_plain_tokens(gpt2_model, bpe_tokenizer, tmp_path):
    p = _city_prompts(bpe_tokenizer, "right")  # multi-token answers appended: "last" is the prompt's last token
    assert bool((p.index("last") != p.lengths - 1).any())
    hook = "blocks.0.hook_resid_post"
    store = collect(gpt2_model, p, hooks=[hook], positions="last", out=tmp_path / "s", progress=False)
    _, ref = gpt2_model.run_with_cache(p.tokens)
    torch.testing.assert_close(store[hook][:, 0], ref[hook][torch.arange(len(p)), p.index("last")], atol=1e-5, rtol=1e-5)
    with pytest.raises(StoreError, match="positions"):  # same tokens, another meaning of "last": not the same store
        collect(gpt2_model, Batch(p.tokens, p.lengths), hooks=[hook], positions="last", out=tmp_path / "s", progress=False)
