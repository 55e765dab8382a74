"""interp.native_attn: hook_attn_scores on TransformerLens's native TransformerBridge (the TL 4
organisms) holds the real pre-softmax scores, and editing them re-weights the attention.

References: the HookedTransformer of the same weights (TL 3), a hand computation from TL's own
cached q/k, TL's own pattern, and a knockout written on TL's pattern hook (renormalised row)."""

from __future__ import annotations

import pytest
import torch

from interp import tl
from interp.hooks import Capture, HookError, Map, block_attention, run
from interp.models import config_to_dict, new_model
from interp.native_attn import attach_hooks, can_edit_scores
from tests.conftest import _randomise, gpt2_config, llama_config

TOKENS = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(4))


def _pair(family: str):
    """(a native bridge, the HookedTransformer of the same weights or None on TL 4)."""
    cfg = (gpt2_config if family == "gpt2" else llama_config)()
    model = _randomise(new_model(cfg), 7)
    if not tl.HAS_HOOKED_TRANSFORMER:
        assert tl.is_native(model)
        return model, None
    if family == "llama":  # the native gated MLP has no biases
        with torch.no_grad():
            for block in model.blocks:
                block.mlp.b_in.zero_()
                block.mlp.b_out.zero_()
    return tl.native_from_hooked(config_to_dict(model.cfg), model.state_dict()), model


def _scores(model, layer: int) -> torch.Tensor:
    name = f"blocks.{layer}.attn.hook_attn_scores"
    return run(model, TOKENS, captures=[Capture(name)], logits=False).acts[name]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_captured_scores_are_the_pre_softmax_scores(family):
    bridge, ref = _pair(family)
    _, cache = bridge.run_with_cache(TOKENS)
    for layer in range(bridge.cfg.n_layers):
        got = _scores(bridge, layer)
        causal = torch.ones(9, 9, dtype=torch.bool).tril()
        assert torch.isneginf(got[..., ~causal]).all() and torch.isfinite(got[..., causal]).all()
        # TL's own pattern is their softmax
        torch.testing.assert_close(got.softmax(-1), cache[f"blocks.{layer}.attn.hook_pattern"], atol=1e-6, rtol=0)
        if ref is not None:  # TL 3: HookedTransformer's own scores (rotary in the halves layout)
            _, want = ref.run_with_cache(TOKENS)
            torch.testing.assert_close(got, want[f"blocks.{layer}.attn.hook_attn_scores"], atol=1e-5, rtol=1e-5)
        if family == "gpt2":  # no rotary: q.k / sqrt(d_head) from TL's cached q and k
            q, k = cache[f"blocks.{layer}.attn.hook_q"], cache[f"blocks.{layer}.attn.hook_k"]
            hand = torch.einsum("bqhd,bkhd->bhqk", q, k) / bridge.cfg.d_head ** 0.5
            torch.testing.assert_close(got[..., causal], hand[..., causal], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_scores_edits_reweight_the_attention(family):
    bridge, _ = _pair(family)
    if not can_edit_scores(bridge):
        pytest.skip(f"transformer-lens {tl.TL_VERSION}'s native attention applies hook_pattern after the value "
                    f"product, so a scores edit cannot reach the output (the refusal is tested)")
    with torch.inference_mode():
        plain = bridge(TOKENS)
    # an edit that changes nothing leaves the output as it was
    same = run(bridge, TOKENS, edits=[Map(f"blocks.{layer}.attn.hook_attn_scores", fn=lambda s: s.clone())
                                      for layer in range(bridge.cfg.n_layers)]).logits
    torch.testing.assert_close(same, plain, atol=1e-6, rtol=0)
    # a knockout equals zeroing the row's blocked entries of TL's pattern and renormalising
    blocked = [1, 3, 4]

    def cut(pattern, hook):
        pattern = pattern.clone()
        row = pattern[:, :, 6].clone()
        row[..., blocked] = 0
        pattern[:, :, 6] = row / row.sum(-1, keepdim=True)
        return pattern

    with torch.inference_mode():
        want = bridge.run_with_hooks(TOKENS, fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", cut) for layer in (1, 2)])
    got = run(bridge, TOKENS, edits=[block_attention(layer, 6, blocked) for layer in (1, 2)]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[:, 6:], plain[:, 6:], atol=1e-3)
    torch.testing.assert_close(got[:, :6], plain[:, :6], atol=1e-6, rtol=0)  # earlier queries untouched


def test_scores_edits_without_the_pattern_seam_are_refused():
    bridge, _ = _pair("gpt2")
    if can_edit_scores(bridge):
        pytest.skip(f"transformer-lens {tl.TL_VERSION}'s native attention has the pattern seam (edits work)")
    with pytest.raises(NotImplementedError, match="applies hook_pattern before the value product"):
        run(bridge, TOKENS, edits=[block_attention(1, 6, [1])])


def test_nested_scores_servers_are_refused():
    bridge, _ = _pair("gpt2")
    name = "blocks.1.attn.hook_attn_scores"
    with attach_hooks(bridge, [(name, lambda s, hook: None)]):
        with pytest.raises(NotImplementedError, match="nested"):
            with attach_hooks(bridge, [(name, lambda s, hook: None)]):
                pass
    with pytest.raises(HookError, match="causal"):  # (the intervention's own validation still applies)
        block_attention(1, 2, [5])
