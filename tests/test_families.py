"""Every public API on six Hugging Face families (tests/hf_zoo.py) through TransformerBridge.

References: the HF model's own logits, the Bridge's own `run_with_cache`, per-cell hook runs,
HookedTransformer on the same weights, and hand computations.
"""

from __future__ import annotations

import hf_zoo
import pytest
import torch

TEXTS = ["the eiffel tower is in paris and the capital of italy is rome",
         "alice went to the market and bought apples"]


def hf_ids(folder, text: str) -> torch.Tensor:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt").input_ids


# ------------------------------------------------------------------------------------ the zoo


def test_bridge_matches_hf_logits(family, hf_folder, bridge_model):
    folder = hf_folder(family)
    hf = hf_zoo.hf_model(folder)
    bridge = bridge_model(family)
    for text in TEXTS:
        ids = hf_ids(folder, text)
        with torch.inference_mode():
            torch.testing.assert_close(bridge(ids), hf(ids).logits, rtol=0, atol=1e-5)


def test_zoo_tokenizers_bos_as_declared(family, hf_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_folder(family))
    ids = tok("the capital of france is paris").input_ids
    assert (ids[0] == tok.bos_token_id) == (family in hf_zoo.BOS_FAMILIES)
    assert len(tok) <= 200


@pytest.mark.parametrize("family_", ["gemma2", "mistral"])
def test_sliding_window_is_smaller_than_prompts(family_, hf_folder):
    """The window must matter at the prompts' lengths: widening it changes late positions' logits
    and leaves the first `WINDOW` positions alone."""
    import transformers as tf

    folder = hf_folder(family_)
    hf = hf_zoo.hf_model(folder)
    wide_cfg = tf.AutoConfig.from_pretrained(folder)
    wide_cfg.sliding_window = hf_zoo.N_CTX
    wide = tf.AutoModelForCausalLM.from_config(wide_cfg, attn_implementation="eager").eval()
    wide.load_state_dict(hf.state_dict())
    ids = hf_ids(folder, TEXTS[0])
    assert ids.shape[1] > 2 * hf_zoo.WINDOW
    with torch.inference_mode():
        a, b = hf(ids).logits, wide(ids).logits
    torch.testing.assert_close(a[:, :hf_zoo.WINDOW], b[:, :hf_zoo.WINDOW], rtol=0, atol=1e-6)
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-2


def test_gemma_softcaps_logits(bridge_model, hf_folder):
    """Final-logit soft-capping is live: every logit lies inside (-cap, cap)."""
    bridge = bridge_model("gemma2")
    ids = hf_ids(hf_folder("gemma2"), TEXTS[0])
    with torch.inference_mode():
        logits = bridge(ids)
    assert logits.abs().max() < 3.0
    assert logits.abs().max() > 1.0  # and it binds
