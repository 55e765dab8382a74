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


# ------------------------------------------------------------------ prompts through each tokenizer

CITY = [("the eiffel tower is in", "eiffel tower", " paris"), ("the colosseum is in", "colosseum", " rome"),
        ("big ben is in", "big ben", " london"), ("the statue of liberty is in", "statue of liberty", " new york"),
        ("the brandenburg gate is in", "brandenburg gate", " berlin"), ("the capital of france is", "france", " paris")]


def tokenizer(hf_folder, family):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_folder(family))


def city(tok, side: str = "right"):
    from interp.prompts import Prompts

    return Prompts.from_text([t for t, _, _ in CITY], tok, spans={"subject": [s for _, s, _ in CITY]},
                             answers=[a for _, _, a in CITY], side=side)


def alone(p, i: int) -> torch.Tensor:
    """Prompt i's real tokens (with its teacher-forced answer tokens), unpadded: [1, len]."""
    r = p.right()
    return r.tokens[i: i + 1, : int(r.lengths[i])]


# ----------------------------------------------------------------------------------- caching


def test_collect_equals_the_bridges_own_run_with_cache(family, bridge_model):
    from interp.cache import collect
    from interp.graph import Node, Site

    bridge = bridge_model(family)
    tokens = torch.randint(2, hf_zoo.VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    nodes = [Node(layer, s) for layer in range(2) for s in (Site.RESID_PRE, Site.ATTN_OUT, Site.MLP_OUT,
                                                             Site.RESID_POST, Site.K, Site.V, Site.Q)]
    cache = collect(bridge, tokens, hooks=nodes, progress=False)
    with torch.inference_mode():
        _, ref = bridge.run_with_cache(tokens)
    for n in nodes:
        torch.testing.assert_close(cache[n.hook_name], ref[n.hook_name], rtol=0, atol=0)


def test_collect_on_padded_text_prompts_equals_each_prompt_alone(family, bridge_model, hf_folder):
    from interp.cache import collect

    bridge = bridge_model(family)
    p = city(tokenizer(hf_folder, family), side="left")
    cache = collect(bridge, p, hooks=["blocks.1.hook_resid_post"], positions="last", progress=False)
    for i in range(len(p)):
        with torch.inference_mode():
            _, ref = bridge.run_with_cache(alone(p, i))
        want = ref["blocks.1.hook_resid_post"][0, int(p.index("last")[i])]
        torch.testing.assert_close(cache["blocks.1.hook_resid_post"][i, 0], want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- lenses


def test_logit_lens_equals_hf_hidden_states_through_hf_norm_and_head(family, bridge_model, hf_folder):
    """Each lens layer l < L is HF's hidden_states[l] through HF's final norm, lm_head and soft cap;
    the last lens layer is the HF model's own logits (soft-capped Gemma included)."""
    from interp.lens import logit_lens

    bridge, hf = bridge_model(family), hf_zoo.hf_model(hf_folder(family))
    p = city(tokenizer(hf_folder, family), side="left")
    r = logit_lens(bridge, p, at="subject", keep_logits=True, progress=False)
    for i in range(len(p)):
        pos = int(p.index("subject")[i])
        with torch.inference_mode():
            out = hf(alone(p, i), output_hidden_states=True)
            want = torch.stack([hf_zoo.hf_decode(hf, h[0, pos]) for h in out.hidden_states[:-1]]
                               + [out.logits[0, pos]])
        torch.testing.assert_close(r.logits[:, i, 0], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r.kl[-1], torch.zeros_like(r.kl[-1]), rtol=0, atol=1e-5)


def test_tuned_lens_on_each_family(family, bridge_model):
    """Untrained translators are the logit lens; trained ones are closer to the final
    distribution on held-out prompts at every layer but the last; the model is untouched."""
    from interp.lens import TunedLens, TunedLensConfig, logit_lens

    bridge = bridge_model(family)
    g = torch.Generator().manual_seed(1)
    train, held = (torch.randint(2, hf_zoo.VOCAB, (n, 12), generator=g) for n in (48, 16))
    untrained = TunedLens.for_model(bridge).run(bridge, held, pos=None, keep_logits=True, progress=False)
    logit = logit_lens(bridge, held, pos=None, keep_logits=True, progress=False)
    torch.testing.assert_close(untrained.logits, logit.logits, rtol=1e-5, atol=1e-5)
    before = {k: v.clone() for k, v in bridge.state_dict().items()}
    lens = TunedLens.fit(bridge, train, TunedLensConfig(steps=60, lr=1e-2, batch_tokens=256), progress=False)
    logit_kl, tuned_kl = lens.compare(bridge, held).values
    assert (tuned_kl[:-1] < logit_kl[:-1]).all()
    assert all(p.grad is None for p in bridge.parameters())
    assert all(torch.equal(v, before[k]) for k, v in bridge.state_dict().items())
