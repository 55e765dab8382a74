"""bf16 and fp16 models through every API, on two HF families (tests/hf_zoo.py), against the fp32
run of the same weights.

The model computes in its own dtype (activations come back in it); statistics are computed in
at least float32 (lens KL and log-probs, probes, SAE training, investigation outcomes in
float64). Tolerances, measured on the zoo's 2-layer models (max abs difference vs fp32, with
the bound asserted): log p(answer) bf16 0.11 nats (bound 0.25), fp16 0.013 (0.03); lens KL
bf16 0.016 (0.05), fp16 0.0015 (0.005); cached residuals bf16 2% of their range (4%), fp16
0.3% (1%).
"""

from __future__ import annotations

import hf_zoo
import pytest
import torch

from interp.arch import device_of, dtype_of

FAMILIES = ("llama", "gemma2")
TOL = {torch.bfloat16: dict(lp=0.25, kl=0.05, act=0.04), torch.float16: dict(lp=0.03, kl=0.005, act=0.01)}
HALF = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
FAMILY = pytest.mark.parametrize("family_", FAMILIES)

CITY = [("the eiffel tower is in", "eiffel tower", " paris"), ("the colosseum is in", "colosseum", " rome"),
        ("big ben is in", "big ben", " london"), ("the statue of liberty is in", "statue of liberty", " new york"),
        ("the brandenburg gate is in", "brandenburg gate", " berlin"), ("the capital of france is", "france", " paris")]


def city(hf_folder, family):
    from transformers import AutoTokenizer

    from interp.prompts import Prompts

    tok = AutoTokenizer.from_pretrained(hf_folder(family))
    return Prompts.from_text([t for t, _, _ in CITY], tok, spans={"subject": [s for _, s, _ in CITY]},
                             answers=[a for _, _, a in CITY], side="left")


@FAMILY
@HALF
def test_half_model_runs_in_its_dtype_and_caches_in_it(family_, dtype, bridge_model, hf_folder):
    from interp.cache import collect

    half, full = bridge_model(family_, dtype), bridge_model(family_)
    assert dtype_of(half) == dtype and device_of(half) == device_of(full)
    p = city(hf_folder, family_)
    hook = "blocks.1.hook_resid_post"
    a = collect(half, p, hooks=[hook], positions="last", progress=False)[hook]
    b = collect(full, p, hooks=[hook], positions="last", progress=False)[hook]
    assert a.dtype == dtype
    assert float((a.float() - b).abs().max()) <= TOL[dtype]["act"] * float(b.abs().max())


@FAMILY
@HALF
def test_lenses_compute_in_float32(family_, dtype, bridge_model, hf_folder):
    from interp.lens import TunedLens, TunedLensConfig, logit_lens

    half, full = bridge_model(family_, dtype), bridge_model(family_)
    p = city(hf_folder, family_)
    a = logit_lens(half, p, at="subject", progress=False)
    b = logit_lens(full, p, at="subject", progress=False)
    assert a.kl.dtype == torch.float32 and a.answer_logprob.dtype == torch.float32
    torch.testing.assert_close(a.kl[-1], torch.zeros_like(a.kl[-1]), rtol=0, atol=1e-6)
    torch.testing.assert_close(a.kl, b.kl, rtol=0, atol=TOL[dtype]["kl"])
    torch.testing.assert_close(a.answer_logprob, b.answer_logprob, rtol=0, atol=TOL[dtype]["lp"])
    tokens = torch.randint(2, hf_zoo.VOCAB, (16, 10), generator=torch.Generator().manual_seed(0))
    lens = TunedLens.fit(half, tokens, TunedLensConfig(steps=3), progress=False)
    assert lens.delta.dtype == torch.float32 and lens.delta.grad is not None
    assert all(p.grad is None for p in half.parameters())


# each dtype's tolerance and each family once (the two full grids above already cross them)
@pytest.mark.parametrize("family_,dtype", [("llama", torch.bfloat16), ("gemma2", torch.float16)],
                         ids=["llama-bf16", "gemma2-fp16"])
def test_investigation_and_patching_agree_with_fp32(family_, dtype, bridge_model, hf_folder):
    from interp.hypotheses import last_token_sufficiency
    from interp.metrics import answer_logprob
    from interp.patching import sweep

    half, full = bridge_model(family_, dtype), bridge_model(family_)
    p = city(hf_folder, family_)
    a = last_token_sufficiency(half, p, baseline=half)
    b = last_token_sufficiency(full, p, baseline=full)
    assert a.clean.logprob.dtype == torch.float64
    tol = TOL[dtype]["lp"]
    torch.testing.assert_close(a.clean.logprob, b.clean.logprob, rtol=0, atol=tol)
    for x, y in zip(a.knockout + a.kv + a.transplant, b.knockout + b.kv + b.transplant, strict=True):
        torch.testing.assert_close(x.logprob, y.logprob, rtol=0, atol=tol)
    q = p.with_partner(p.select([1, 2, 3, 4, 5, 0]))
    sa = sweep(half, q, answer_logprob(), site="resid_pre", positions=["last"], direction="noising")
    sb = sweep(full, q, answer_logprob(), site="resid_pre", positions=["last"], direction="noising")
    torch.testing.assert_close(sa.values.double(), sb.values.double(), rtol=0, atol=tol)


@FAMILY
def test_probes_and_sae_training_upcast_half_activations(family_, bridge_model):
    """Statistics in at least float32: a probe on bf16 features is the probe on the same features
    upcast (bit for bit), and an SAE trained from a bf16 model is a float32 SAE equal to the one
    trained on the upcast activations."""
    from interp.cache import collect
    from interp.graph import Node, Site
    from interp.probing import fit
    from interp.sae import TrainConfig, train

    half = bridge_model(family_, torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(2, hf_zoo.VOCAB, (80, 8), generator=g)
    labels = (tokens[:, -1] % 2).long()
    hook = Node(1, Site.RESID_PRE).hook_name
    acts = collect(half, tokens, hooks=[hook], positions="last", progress=False)[hook][:, 0]
    assert acts.dtype == torch.bfloat16
    r16 = fit(acts[None], labels, "logistic", shuffled=False, n_boot=50)
    r32 = fit(acts[None].float(), labels, "logistic", shuffled=False, n_boot=50)
    assert torch.equal(r16.value, r32.value) and torch.equal(r16.coef, r32.coef)
    cfg = TrainConfig(d_sae=16, sae_kwargs={"k": 4}, batch_size=40, training_samples=400, dead_feature_window=10**6)
    s16 = train(None, acts, config=cfg).sae
    s32 = train(None, acts.float(), config=cfg).sae
    assert s16.dtype == torch.float32
    torch.testing.assert_close(s16.W_dec, s32.W_dec, rtol=0, atol=0)
    from_model = train(half, tokens, Node(1, Site.RESID_PRE), cfg).sae
    assert from_model.dtype == torch.float32 and from_model.cfg.metadata.hook_name == hook
