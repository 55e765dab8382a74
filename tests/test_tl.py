"""interp.tl: HookedTransformer checkpoints on TransformerLens's native TransformerBridge.

On TL 3.x the reference is the HookedTransformer of the same weights; on TL 4 (no
HookedTransformer) it is TransformerLens 4's own `convert_tl_checkpoint`.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from interp import tl
from interp.models import config_to_dict, organisms_dir
from tests.conftest import _randomise, gpt2_config, llama_config

ORGANISMS = ["induction", "planning", "retrieval-rotary", "retrieval-nope"]
needs_hooked = pytest.mark.skipif(not tl.HAS_HOOKED_TRANSFORMER,
                                  reason=f"transformer-lens {tl.TL_VERSION} has no HookedTransformer to compare with")


def _checkpoint(name: str) -> tuple[dict, dict]:
    d = organisms_dir() / name
    return json.loads((d / "config.json").read_text()), load_file(d / "model.safetensors")


@needs_hooked
@pytest.mark.parametrize("name", ORGANISMS)
def test_organism_on_the_native_bridge_equals_its_hooked_transformer(name):
    from interp.models import load_model

    ref = load_model(f"organism:{name}")
    cfg, state = _checkpoint(name)
    bridge = tl.native_from_hooked(cfg, state)
    assert tl.is_native(bridge) and not tl.is_native(ref)
    tokens = torch.randint(0, ref.cfg.d_vocab, (3, min(ref.cfg.n_ctx, 24)), generator=torch.Generator().manual_seed(0))
    want_logits, want = ref.run_with_cache(tokens)
    got_logits, got = bridge.run_with_cache(tokens)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    n = ref.cfg.n_layers
    for hook in [f"blocks.{n - 1}.hook_resid_post", "blocks.0.hook_resid_pre", f"blocks.{n - 1}.attn.hook_z",
                 "blocks.0.attn.hook_v", "blocks.0.attn.hook_pattern"]:
        torch.testing.assert_close(got[hook], want[hook], atol=1e-4, rtol=1e-4, msg=hook)
    if cfg["positional_embedding_type"] == "rotary":  # keys in the native adjacent-pair order
        perm = tl.rotary_pairs_permutation(ref.cfg.d_head, ref.cfg.rotary_dim)
        assert bridge.cfg.rotary_adjacent_pairs
        torch.testing.assert_close(got["blocks.0.attn.hook_k"], want["blocks.0.attn.hook_k"][..., perm])
        assert not torch.allclose(got["blocks.0.attn.hook_k"], want["blocks.0.attn.hook_k"])
    else:
        torch.testing.assert_close(got["blocks.0.attn.hook_k"], want["blocks.0.attn.hook_k"])


@needs_hooked
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_random_models_of_both_families_convert_exactly(family):
    """GQA (separate _W_K/_W_V), RMSNorm, gated MLP, rotary and learned positions, LN biases."""
    from interp.models import new_model

    cfg = (gpt2_config if family == "gpt2" else llama_config)()
    ref = _randomise(new_model(cfg), 5)
    with torch.no_grad():  # a nonzero unembedding bias must survive the conversion
        ref.unembed.b_U.copy_(torch.randn(ref.cfg.d_vocab_out, generator=torch.Generator().manual_seed(1)))
        if family == "llama":  # Llama's gated MLP has no biases, nor has the native one
            for block in ref.blocks:
                block.mlp.b_in.zero_()
                block.mlp.b_out.zero_()
    bridge = tl.native_from_hooked(config_to_dict(ref.cfg), ref.state_dict())
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(bridge(tokens), ref(tokens), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(tl.TL_MAJOR < 4, reason="TL 4 only: its own converter is the reference")
@pytest.mark.parametrize("name", ORGANISMS)
def test_conversion_equals_transformer_lens_4s_converter(name):
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

    cfg, state = _checkpoint(name)
    bcfg = tl.native_config(cfg)
    ours = tl.native_state_dict(state, bcfg)
    theirs = convert_tl_checkpoint({k: v for k, v in state.items() if "rotary" not in k}, bcfg)
    assert sorted(ours) == sorted(theirs)
    perm = tl.rotary_pairs_permutation(bcfg.d_head, bcfg.rotary_dim or bcfg.d_head)
    for key, t in theirs.items():
        if cfg["positional_embedding_type"] == "rotary" and key.endswith(("q.weight", "k.weight", "q.bias", "k.bias")):
            h = t.reshape(-1, bcfg.d_head, *t.shape[1:])  # their dims are the halves layout
            t = h[:, perm].reshape(t.shape)
        torch.testing.assert_close(ours[key], t, msg=key)


@needs_hooked
def test_gated_mlp_biases_without_a_native_equivalent_are_refused():
    from interp.models import new_model

    llama = _randomise(new_model(llama_config()), 5)  # random gated-MLP biases: the native MLP has none
    with pytest.raises(ValueError, match=r"nonzero \['blocks.0.mlp.in.bias"):
        tl.native_from_hooked(config_to_dict(llama.cfg), llama.state_dict())


def test_unsupported_features_are_refused_by_name():
    cfg, _ = _checkpoint("induction")
    with pytest.raises(ValueError, match=r"parallel_attn_mlp.*HookedTransformer"):
        tl.native_config(cfg | {"parallel_attn_mlp": True})
    with pytest.raises(ValueError, match=r"positional_embedding_type='alibi'"):
        tl.native_config(cfg | {"positional_embedding_type": "alibi"})


@needs_hooked
def test_the_config_field_list_is_transformer_lens_3s():
    import dataclasses

    from interp.tl import HookedTransformerConfig

    assert tl.HOOKED_CONFIG_FIELDS == tuple(f.name for f in dataclasses.fields(HookedTransformerConfig) if f.init)
