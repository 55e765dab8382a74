"""Store identity: an activation store is keyed on what determines its content (weights, config,
tokens and lengths, hooks, positions, dtype), never on the model's name. A store built otherwise is
refused with the field that differs; `overwrite=True` replaces it, keeping the user's files."""

from __future__ import annotations

import os

import pytest
import torch

from interp.atomic import DestinationError
from interp.cache import collect
from interp.models import load_model, new_model, save_model, weights_fingerprint
from interp.store import StoreError, open_store
from interp.tokens import Batch

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def _toks(n: int, pos: int, d_vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, d_vocab, (n, pos), generator=torch.Generator().manual_seed(seed))


def _assert_store_is(store, model, toks: torch.Tensor) -> None:
    """Every stored hook equals TransformerLens's own run_with_cache on `toks`, bit for bit."""
    with torch.inference_mode():
        _, ref = model.run_with_cache(toks, names_filter=HOOKS)
    for name in HOOKS:
        torch.testing.assert_close(open_store(store.path)[name], ref[name], rtol=0, atol=0)


def _copy(model):
    twin = new_model(model.cfg)
    twin.load_state_dict(model.state_dict())
    return twin


def test_store_from_another_organism_is_refused_not_returned(tmp_path):
    learned, rotary = load_model("organism:retrieval-learned"), load_model("organism:retrieval-rotary")
    assert learned.cfg.model_name == rotary.cfg.model_name == "custom"  # the name cannot tell them apart
    toks = _toks(6, 12, learned.cfg.d_vocab)
    collect(learned, toks, hooks=HOOKS, out=tmp_path / "s", progress=False)
    with pytest.raises(StoreError, match=r"different weights \(.* on disk vs .*config .*overwrite=True"):
        collect(rotary, toks, hooks=HOOKS, out=tmp_path / "s", progress=False)
    store = collect(rotary, toks, hooks=HOOKS, out=tmp_path / "s", overwrite=True, progress=False)
    _assert_store_is(store, rotary, toks)


def test_one_edited_weight_is_another_build(gpt2_model, tmp_path):
    toks = _toks(5, 7)
    collect(gpt2_model, toks, hooks=HOOKS, out=tmp_path / "s", progress=False)
    twin = _copy(gpt2_model)
    reloaded = load_model(save_model(gpt2_model, tmp_path / "m"))
    assert weights_fingerprint(twin) == weights_fingerprint(reloaded) == weights_fingerprint(gpt2_model)
    _assert_store_is(collect(reloaded, toks, hooks=HOOKS, out=tmp_path / "s", progress=False), gpt2_model, toks)
    with torch.no_grad():  # one ulp in one MLP weight
        twin.blocks[0].mlp.W_out[3, 5] = torch.nextafter(twin.blocks[0].mlp.W_out[3, 5], torch.tensor(9.0))
    with pytest.raises(StoreError, match=r"different weights \(") as err:
        collect(twin, toks, hooks=HOOKS, out=tmp_path / "s", progress=False)
    assert "config" not in str(err.value)  # only the field that differs is named


def test_fingerprint_sees_dtype_and_swaps(gpt2_model):
    base = weights_fingerprint(gpt2_model)
    assert weights_fingerprint(_copy(gpt2_model).to(torch.bfloat16)) != base
    swapped = _copy(gpt2_model)
    with torch.no_grad():
        w = swapped.blocks[1].attn.W_Q
        w[0, 0, [0, 1]] = w[0, 0, [1, 0]].clone()
    assert weights_fingerprint(swapped) != base
    assert weights_fingerprint(gpt2_model) == base  # computing it changed nothing


def test_complete_store_checks_tokens_and_lengths(gpt2_model, tmp_path):
    toks = _toks(6, 8)
    out = tmp_path / "s"
    collect(gpt2_model, toks, hooks=HOOKS, batch_size=4, out=out, progress=False)
    changed = toks.clone()
    changed[5, 7] = (changed[5, 7] + 1) % 50  # one token of the last row
    with pytest.raises(StoreError, match="different tokens"):
        collect(gpt2_model, changed, hooks=HOOKS, batch_size=4, out=out, progress=False)
    with pytest.raises(StoreError, match="more rows of data than the 6"):
        collect(gpt2_model, torch.cat([toks, toks[:1]]), hooks=HOOKS, out=out, progress=False)
    with pytest.raises(StoreError, match="got 5 rows of data for a store holding 6"):
        collect(gpt2_model, toks[:5], hooks=HOOKS, out=out, progress=False)
    # the same rows batched otherwise are the same build
    _assert_store_is(collect(gpt2_model, toks, hooks=HOOKS, batch_size=5, out=out, progress=False), gpt2_model, toks)


def test_padding_side_is_not_content_but_lengths_are(gpt2_model, tmp_path):
    seqs = [[3, 4, 5, 6], [7, 8], [9, 10, 11]]
    out = tmp_path / "s"
    right = collect(gpt2_model, Batch.pad(seqs, "right"), hooks=HOOKS, positions="last", out=out, progress=False)
    again = collect(gpt2_model, Batch.pad(seqs, "left"), hooks=HOOKS, positions="last", out=out, progress=False)
    torch.testing.assert_close(again[HOOKS[1]], right[HOOKS[1]], rtol=0, atol=0)
    shorter = Batch.pad([[3, 4, 5], [7, 8], [9, 10, 11]], "right")
    shorter = Batch(Batch.pad(seqs, "right").tokens, shorter.lengths, "right")  # same ids, one length less
    with pytest.raises(StoreError, match="different tokens"):
        collect(gpt2_model, shorter, hooks=HOOKS, positions="last", out=out, progress=False)


class _Killed(Exception):
    pass


def test_interrupted_build_resumes_only_with_its_own_tokens(gpt2_model, tmp_path):
    toks = _toks(12, 6, seed=3)
    out = tmp_path / "s"

    def first_two_batches():
        yield toks[:4]
        yield toks[4:8]
        raise _Killed

    with pytest.raises(_Killed):
        collect(gpt2_model, first_two_batches(), hooks=HOOKS, batch_size=4, out=out, shard_bytes=1, progress=False)
    partial = open_store(out)
    assert not partial.complete and partial.n_examples == 4
    other = toks.clone()
    other[0, 0] = (other[0, 0] + 1) % 50  # a row already on disk
    with pytest.raises(StoreError, match=r"different tokens .* first 4 rows"):
        collect(gpt2_model, other, hooks=HOOKS, batch_size=4, out=out, shard_bytes=1, progress=False)
    store = collect(gpt2_model, toks, hooks=HOOKS, batch_size=4, out=out, shard_bytes=1, progress=False)
    assert store.complete and store.n_examples == 12
    _assert_store_is(store, gpt2_model, toks)


def test_position_masks_with_the_same_count_are_different_builds(gpt2_model, tmp_path):
    toks = _toks(4, 6)
    a = torch.zeros(6, dtype=torch.bool)
    b = a.clone()
    a[[1, 3]] = True
    b[[2, 4]] = True
    first = collect(gpt2_model, toks, hooks=HOOKS, positions=a, out=tmp_path / "s", progress=False)
    with pytest.raises(StoreError, match="different positions"):
        collect(gpt2_model, toks, hooks=HOOKS, positions=b, out=tmp_path / "s", progress=False)
    mem = collect(gpt2_model, toks, hooks=HOOKS, positions=a, progress=False)
    torch.testing.assert_close(first[HOOKS[0]], mem[HOOKS[0]], rtol=0, atol=0)


def test_store_never_writes_into_a_user_folder_and_overwrite_keeps_user_files(gpt2_model, llama_model, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    toks = _toks(6, 5)
    with pytest.raises(DestinationError, match="not one.*notes.txt"):
        collect(gpt2_model, toks, hooks=HOOKS, out=tmp_path, progress=False)
    assert os.listdir(tmp_path) == ["notes.txt"]
    out = tmp_path / "s"
    collect(gpt2_model, toks, hooks=HOOKS, batch_size=2, shard_bytes=1, out=out, progress=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="expected an empty directory .resume=False.*overwrite=True"):
        collect(gpt2_model, toks, hooks=HOOKS, out=out, resume=False, progress=False)
    store = collect(llama_model, toks[:3], hooks=HOOKS, batch_size=3, out=out, overwrite=True, progress=False)
    _assert_store_is(store, llama_model, toks[:3])
    assert sorted(os.listdir(out)) == ["manifest.json", "notes.txt", "shard_00000.safetensors"]  # old shards gone
    assert (out / "notes.txt").read_text() == "mine"
