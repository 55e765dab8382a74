"""Activation and K/V patching: against transformer_lens.patching, invariants, bad input."""

from __future__ import annotations

import re

import pytest
import torch

from interp.graph import Node
from interp.models import new_model
from interp.patching import PatchResult, kv_patch, logit_diff, patch, patched_logits, sweep
from interp.patching.engine import check_direction
from interp.tl import patching as tlp

ATOL = 1e-4


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 50, (2, 5), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = (clean[:, 2] + 1 + torch.randint(0, 48, (2,), generator=g)) % 50
    return clean, corrupt


def _metric():
    return logit_diff(torch.tensor([1, 7]), torch.tensor([4, 9]), pos=-1)


def _full_metric(logits: torch.Tensor) -> torch.Tensor:  # a plain TransformerLens-style metric
    return logits[:, -2].log_softmax(-1)[:, 3].mean() - logits[:, -1, 5].mean()


def _clean_cache(model, tokens):
    with torch.inference_mode():
        return model.run_with_cache(tokens)[1]


@pytest.mark.parametrize("metric", [_metric(), _full_metric], ids=["position_metric", "full_logits"])
def test_resid_pre_sweep_matches_transformer_lens(any_model, pair, metric):
    clean, corrupt = pair
    ours = sweep(any_model, clean, corrupt, metric, site="resid_pre")
    ref = tlp.get_act_patch_resid_pre(any_model, corrupt, _clean_cache(any_model, clean), metric)
    assert ours.axes == ("layer", "pos")
    torch.testing.assert_close(ours.values, ref.double(), atol=ATOL, rtol=0)
    # the baselines are the unpatched runs' metrics
    with torch.inference_mode():
        torch.testing.assert_close(ours.clean_metric, float(metric(any_model(clean))), atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.corrupt_metric, float(metric(any_model(corrupt))), atol=1e-6, rtol=0)


def test_head_out_by_pos_sweep_matches_transformer_lens(any_model, pair):
    clean, corrupt = pair
    metric = _metric()
    ours = sweep(any_model, clean, corrupt, metric, site="head")
    ref = tlp.get_act_patch_attn_head_out_by_pos(any_model, corrupt, _clean_cache(any_model, clean), metric)
    assert ours.axes == ("layer", "pos", "head")
    torch.testing.assert_close(ours.values, ref.double(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("site,tl_fn", [
    ("resid_mid", tlp.get_act_patch_resid_mid),
    ("attn_out", tlp.get_act_patch_attn_out),
    ("mlp_out", tlp.get_act_patch_mlp_out),
])
def test_other_sites_match_transformer_lens(gpt2_model, pair, site, tl_fn):
    clean, corrupt = pair
    metric = _metric()
    ours = sweep(gpt2_model, clean, corrupt, metric, site=site)
    ref = tl_fn(gpt2_model, corrupt, _clean_cache(gpt2_model, clean), metric)
    torch.testing.assert_close(ours.values, ref.double(), atol=ATOL, rtol=0)


def test_noising_is_patching_corrupted_values_into_the_clean_run(llama_model, pair):
    clean, corrupt = pair
    metric = _metric()
    ours = sweep(llama_model, clean, corrupt, metric, site="resid_post", direction="noising")
    with torch.inference_mode():
        corrupt_cache = llama_model.run_with_cache(corrupt)[1]
    # resid_post[l] is resid_pre[l+1]; the last layer's is checked through the logits below
    ref = tlp.get_act_patch_resid_pre(llama_model, clean, corrupt_cache, metric)
    torch.testing.assert_close(ours.values[:-1], ref[1:].double(), atol=ATOL, rtol=0)
    # patching the whole final residual at every position gives the corrupted run's metric
    every = patch(llama_model, clean, corrupt, metric, Node(2, "resid_post"), direction="noising")
    torch.testing.assert_close(every.values.item(), every.corrupt_metric, atol=1e-5, rtol=0)


def test_kv_sweep_per_group_matches_transformer_lens_under_gqa(llama_model, pair):
    clean, corrupt = pair
    metric = _metric()
    cache = _clean_cache(llama_model, clean)
    for which, tl_fn in (("k", tlp.get_act_patch_attn_head_k_by_pos),
                         ("v", tlp.get_act_patch_attn_head_v_by_pos)):
        ours = kv_patch(llama_model, clean, corrupt, metric, which=which)
        assert ours.axes == ("layer", "pos", "kv_head") and ours.values.shape[-1] == 2
        ref = tl_fn(llama_model, corrupt, cache, metric)  # TL iterates KV groups for k and v
        torch.testing.assert_close(ours.values, ref.double(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("metric", [_metric(), _full_metric], ids=["position_metric", "full_logits"])
def test_chunking_and_prefix_skipping_do_not_change_results(any_model, pair, metric):
    clean, corrupt = pair
    # one copy per forward: a copy patching position p computes positions p.. only, reading the
    # earlier positions' keys and values from the base run; one big chunk computes them all
    one = sweep(any_model, clean, corrupt, metric, site="head", layers=[1, 2], rows=2)
    many = sweep(any_model, clean, corrupt, metric, site="head", layers=[1, 2], rows=10_000)
    torch.testing.assert_close(one.values, many.values, atol=1e-5, rtol=0)
    kv_one = kv_patch(any_model, clean, corrupt, metric, positions=[2, 3], rows=2)
    kv_many = kv_patch(any_model, clean, corrupt, metric, positions=[2, 3], rows=10_000)
    torch.testing.assert_close(kv_one.values, kv_many.values, atol=1e-5, rtol=0)


def test_copies_that_write_the_base_values_run_no_forward(any_model, pair):
    """Denoising after a one-token corruption at position 2: a patch before position 2 (and, at
    layer 0, anywhere but 2) writes the corrupted run's own residual, bit for bit, so the engine
    answers it from the corrupted run; the sweep still equals TransformerLens's per-cell patching."""
    clean, corrupt = pair
    metric = _metric()
    n_layers, seq = any_model.cfg.n_layers, clean.shape[1]
    rows = []
    handle = any_model.blocks[-1].register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    try:
        ours = sweep(any_model, clean, corrupt, metric, site="resid_pre")
    finally:
        handle.remove()
    computed = (n_layers - 1) * (seq - 2) + 1  # layers >= 1 at positions >= 2; layer 0 at 2 only
    assert sum(rows) == len(clean) * (2 + computed)  # the clean and corrupted runs, and those copies
    ref = tlp.get_act_patch_resid_pre(any_model, corrupt, _clean_cache(any_model, clean), metric)
    torch.testing.assert_close(ours.values, ref.double(), atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.values[:, :2], torch.full((n_layers, 2), ours.corrupt_metric, dtype=torch.float64),
                               atol=0, rtol=0)


# ------------------------------------------------------------------------------------ invariants

def test_patching_clean_into_clean_changes_nothing(any_model, pair):
    clean, _ = pair
    metric = _metric()
    for site in ("resid_pre", "head", "k"):
        r = sweep(any_model, clean, clean, metric, site=site)
        torch.testing.assert_close(r.values, torch.full_like(r.values, r.clean_metric), atol=1e-5, rtol=0)
    with torch.inference_mode():
        ref = any_model(clean)
    nodes = [Node(0, "resid_pre"), Node(1, "v"), Node(2, "head", pos=3, head=1)]
    torch.testing.assert_close(patched_logits(any_model, clean, clean, nodes), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("site,head", [("resid_pre", None), ("resid_mid", None), ("head", 2), ("k", 1), ("v", 0)])
def test_patching_position_p_never_changes_earlier_logits(any_model, pair, site, head):
    clean, corrupt = pair
    p = 2
    with torch.inference_mode():
        base = any_model(corrupt)
    out = patched_logits(any_model, clean, corrupt, [Node(1, site, pos=p, head=head)])
    torch.testing.assert_close(out[:, :p], base[:, :p], atol=1e-6, rtol=0)
    assert (out[:, p:] - base[:, p:]).abs().max() > 1e-4  # the patch did act from p on


def test_kv_of_earlier_positions_plus_own_residual_reproduces_clean(any_model, pair):
    clean, corrupt = pair
    # corrupt every position so that nothing is shared by accident
    corrupt = (clean + 1 + torch.arange(clean.numel()).reshape(clean.shape) % 7) % 50
    last = clean.shape[1] - 1
    kv = [Node(layer, s, pos=p) for layer in range(3) for s in ("k", "v") for p in range(last)]
    own = Node(0, "resid_pre", pos=last)
    with torch.inference_mode():
        clean_logits, corrupt_logits = any_model(clean), any_model(corrupt)
    out = patched_logits(any_model, clean, corrupt, kv + [own])
    torch.testing.assert_close(out[:, last], clean_logits[:, last], atol=1e-5, rtol=0)
    # each half alone does not: the last position needs both its residual and the K/V stream
    for partial in (kv, [own]):
        alone = patched_logits(any_model, clean, corrupt, partial)[:, last]
        assert (alone - clean_logits[:, last]).abs().max() > 1e-2
    assert (corrupt_logits[:, last] - clean_logits[:, last]).abs().max() > 1e-2


def _expanded_mha(gqa_model):
    """The same network with K/V weights repeated per query head (no grouped-query attention)."""
    cfg = dict(gqa_model.cfg.to_dict())  # a copy: never touch the shared fixture's config
    cfg["n_key_value_heads"] = None
    from interp.tl import HookedTransformerConfig
    keep = {k: v for k, v in cfg.items() if k in HookedTransformerConfig.__dataclass_fields__
            and HookedTransformerConfig.__dataclass_fields__[k].init}
    mha = new_model(HookedTransformerConfig(**keep))
    state = {}
    rep = gqa_model.cfg.n_heads // gqa_model.cfg.n_key_value_heads
    for name, value in gqa_model.state_dict().items():
        if name.split(".")[-1] in ("_W_K", "_W_V", "_b_K", "_b_V"):  # HookedTransformer: [kv_head, ...]
            name = name.replace("._", ".")
            value = torch.repeat_interleave(value, rep, dim=0)
        elif re.search(r"attn\.(_original_component\.)?[kv]\.(_original_component\.)?(weight|bias)$", name):
            # TL 4's native model: nn.Linear rows in (kv_head d_head) order
            grouped = value.reshape(gqa_model.cfg.n_key_value_heads, gqa_model.cfg.d_head, *value.shape[1:])
            value = torch.repeat_interleave(grouped, rep, dim=0).reshape(-1, *value.shape[1:])
        state[name] = value
    mha.load_state_dict(state, strict=True)
    return mha


def test_gqa_kv_patch_equals_the_same_patch_on_expanded_heads(llama_model, pair):
    clean, corrupt = pair
    metric = _metric()
    mha = _expanded_mha(llama_model)
    with torch.inference_mode():
        torch.testing.assert_close(mha(clean), llama_model(clean), atol=1e-5, rtol=0)
    # all groups of a (layer, position) at once == all heads of the expanded model
    grouped_all = kv_patch(llama_model, clean, corrupt, metric, which="kv", per_group=False)
    expanded_all = kv_patch(mha, clean, corrupt, metric, which="kv", per_group=False)
    torch.testing.assert_close(grouped_all.values, expanded_all.values, atol=1e-5, rtol=0)
    # one group == its two query heads' K/V in the expanded model
    grouped = kv_patch(llama_model, clean, corrupt, metric, which="kv", layers=[1], positions=[2])
    for g in range(2):
        nodes = [Node(1, s, pos=2, head=h) for s in ("k", "v") for h in (2 * g, 2 * g + 1)]
        expanded = patch(mha, clean, corrupt, metric, nodes)
        torch.testing.assert_close(grouped.values[0, 0, g], expanded.values[0], atol=1e-5, rtol=0)
    assert (grouped.values - grouped.corrupt_metric).abs().max() > 1e-3  # the patches did something


# ------------------------------------------------------------------------------------ results

def test_result_frame_and_plot_carry_the_values(gpt2_model, pair):
    clean, corrupt = pair
    r = sweep(gpt2_model, clean, corrupt, _metric(), site="head", layers=[2], positions=[1, 4])
    frame = r.to_frame()
    assert list(frame.columns[:4]) == ["layer", "pos", "head", "value"]
    table = torch.tensor(frame.sort_values(["layer", "pos", "head"])["value"].to_numpy()).reshape(1, 2, 4)
    torch.testing.assert_close(table, r.values)
    rec = (r.values - r.corrupt_metric) / (r.clean_metric - r.corrupt_metric)
    torch.testing.assert_close(torch.tensor(frame["normalised"].to_numpy()).reshape(1, 2, 4), rec)
    fig = r.plot()
    z = torch.tensor(fig.data[0].z, dtype=torch.float64)
    torch.testing.assert_close(z, r.values[0].T)  # rows L2.h, columns positions


# ------------------------------------------------------------------------------------ bad input

def test_bad_input_errors(llama_model, pair):
    clean, corrupt = pair
    metric = _metric()
    with pytest.raises(ValueError, match=r"corrupted tokens: expected the clean shape \(2, 5\), got \(2, 4\).*alignment"):
        sweep(llama_model, clean, corrupt[:, :4], metric)
    with pytest.raises(ValueError, match=r"metric: expected one value per example, shape \(2,\), got \(2, 3\)"):
        sweep(llama_model, clean, corrupt, lambda logits, prompts: logits[:, -1, :3])
    with pytest.raises(ValueError, match=r"layer expected in \[0, 3\), got 3"):
        patch(llama_model, clean, corrupt, metric, Node(3, "resid_pre"))
    with pytest.raises(ValueError, match=r"position expected in \[0, 5\), got 5"):
        patch(llama_model, clean, corrupt, metric, Node(1, "resid_pre", pos=5))
    with pytest.raises(ValueError, match=r"head expected in \[0, 4\), got 4"):
        patch(llama_model, clean, corrupt, metric, Node(1, "head", pos=1, head=4))
    with pytest.raises(ValueError, match=r"KV group expected in \[0, 2\), got 2.*n_key_value_heads=2"):
        patch(llama_model, clean, corrupt, metric, Node(1, "k", pos=1, head=2))
    with pytest.raises(ValueError, match=r"groups: expected KV group indices in \[0, 2\), got 3"):
        kv_patch(llama_model, clean, corrupt, metric, groups=[3])
    with pytest.raises(ValueError, match=r"heads: expected head indices in \[0, 4\), got 4"):
        sweep(llama_model, clean, corrupt, metric, site="head", heads=[4])
    with pytest.raises(ValueError, match=r"layers: expected ints in \[0, 3\), got 5"):
        sweep(llama_model, clean, corrupt, metric, layers=[5])
    with pytest.raises(ValueError, match=r"sweep site: expected one of"):
        sweep(llama_model, clean, corrupt, metric, site="pattern")
    with pytest.raises(ValueError, match="did you mean"):
        sweep(llama_model, clean, corrupt, metric, site="resid_psot")
    with pytest.raises(ValueError, match=r"direction: expected 'denoising'"):
        check_direction("forward")  # what sweep raises outside a runtime type checker
    with pytest.raises(ValueError, match=r"PatchResult: expected per-example values of shape \(3, 2\)"):
        PatchResult(torch.zeros(2, 2), ("layer",), ((0, 1, 2),), "resid_pre", "denoising", torch.zeros(2),
                    torch.ones(2))


def test_hooks_are_removed_when_a_patched_run_fails(gpt2_model, pair):
    clean, corrupt = pair
    calls = []

    def failing(logits):
        calls.append(1)
        if len(calls) > 2:  # the clean and corrupted baselines pass, the first patched run fails
            raise RuntimeError("boom")
        return logits[:, -1, 0].mean()

    with pytest.raises(RuntimeError, match="boom"):
        sweep(gpt2_model, clean, corrupt, failing, site="head")
    assert all(not hp.fwd_hooks and not hp._forward_hooks for hp in gpt2_model.hook_dict.values())
