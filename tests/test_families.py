"""Every public API on six Hugging Face families (tests/hf_zoo.py) through TransformerBridge.

References: the HF model's own logits, the Bridge's own `run_with_cache`, per-cell hook runs,
HookedTransformer on the same weights, and hand computations.
"""

from __future__ import annotations

import re

import hf_zoo
import pytest
import torch

from interp.arch import Arch
from interp.tl import HAS_HOOKED_TRANSFORMER, TL_VERSION

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


def test_collect_streams_a_bridge_to_a_store(family, bridge_model, tmp_path):
    """Regression: a store's content key (config fingerprint) refused a TransformerBridge's config."""
    from interp.cache import collect

    bridge = bridge_model(family)
    tokens = torch.randint(2, hf_zoo.VOCAB, (4, 9), generator=torch.Generator().manual_seed(2))
    hook = "blocks.1.hook_resid_pre"
    store = collect(bridge, tokens, hooks=[hook], out=tmp_path / "store", progress=False)
    torch.testing.assert_close(store[hook][:], collect(bridge, tokens, hooks=[hook], progress=False)[hook],
                               rtol=0, atol=0)


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


def test_future_lens_reads_the_hf_hidden_states(family, bridge_model, hf_folder):
    """The future lens's inputs (`residual_stack`: resid_pre of each block) are HF's own
    hidden_states; on period-2 sequences (x_(t+2) = x_t) the lens decodes x_(t+2) from the
    embedding layer on every held-out token, as the (x_t -> x_(t+2)) table does."""
    from interp.lens import FutureLensConfig, future_lens, residual_stack

    bridge, hf = bridge_model(family), hf_zoo.hf_model(hf_folder(family))
    g = torch.Generator().manual_seed(6)
    pairs = torch.randint(10, 18, (80, 2), generator=g)
    tokens = pairs.repeat(1, 5)  # a b a b ...: 10 tokens
    stack = residual_stack(bridge, tokens, progress=False)
    with torch.inference_mode():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(stack[:-1], torch.stack(hidden[:-1]), rtol=1e-5, atol=1e-5)
    r = future_lens(bridge, tokens, config=FutureLensConfig(offsets=(2,), layers=(0,)), progress=False)
    assert float(r.accuracy[0, 0]) == 1.0 and float(r.baselines[0, 0, 0]) == 1.0


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


# ----------------------------------------------------------------------------- investigations


def hf_answer_lp(hf, toks: torch.Tensor, t: int, ans: torch.Tensor) -> float:
    """HF's own log p(answer) of one unpadded prompt: the answer's tokens at t, t+1, ..."""
    with torch.inference_mode():
        lp = hf(toks).logits[0].double().log_softmax(-1)
    return float(sum(lp[t + j, int(a)] for j, a in enumerate(ans)))


def one(p, i: int):
    r = p.right()
    return alone(p, i), int(r.prompt_lengths[i]) - 1, r.answers[i, : int(r.answer_lengths[i])]


def with_corrupt_subject(p, shift: int = 1):
    """`p` with, as partner, the same prompts whose subject's last token is another token."""
    from interp.prompts import Prompts

    r = p.right()
    src = r.index("subject")
    bad = r.tokens.clone()
    rows = torch.arange(len(r))
    bad[rows, src] = 2 + (bad[rows, src] - 2 + shift) % (hf_zoo.VOCAB - 2)
    q = Prompts(bad, r.lengths, "right", r.prompt_lengths, {"subject": r.span("subject")}, r.answers, r.answer_lengths)
    return r.with_partner(q)


def test_last_token_on_text_prompts(family, bridge_model, hf_folder):
    """Clean log p(answer) per example is HF's own on the prompt alone; cutting the last
    positions' attention to the context from layer 0 equals running them alone (rotary and
    learned-free families: attention sees only relative positions) or, for GPT-2's learned
    positions, the Bridge with the attention scores blocked by hand."""
    from interp.hypotheses import last_token_sufficiency

    bridge, hf = bridge_model(family), hf_zoo.hf_model(hf_folder(family))
    p = city(tokenizer(hf_folder, family), side="left")
    r = last_token_sufficiency(bridge, p, baseline=bridge)
    for i in range(len(p)):
        toks, t, ans = one(p, i)
        assert r.clean.logprob[i].item() == pytest.approx(hf_answer_lp(hf, toks, t, ans), abs=1e-4)
        if family == "gpt2":
            def block(scores, hook, t=t):
                scores = scores.clone()
                scores[:, :, t:, :t] = float("-inf")
                return scores
            with torch.inference_mode():
                lp = bridge.run_with_hooks(toks, fwd_hooks=[(f"blocks.{x}.attn.hook_attn_scores", block)
                                                            for x in range(2)])[0].double().log_softmax(-1)
            want = float(sum(lp[t + j, int(a)] for j, a in enumerate(ans)))
        else:
            want = hf_answer_lp(hf, toks[:, t:], 0, ans)
        assert r.knockout[0].logprob[i].item() == pytest.approx(want, abs=1e-4)
    assert r.meta["lengths"] == sorted(set(p.prompt_lengths.tolist()))


def test_routes_on_text_prompts(family, bridge_model, hf_folder):
    """The batched route effects equal the per-example loop (each prompt alone, one path patch per
    route); the total effect is HF's own clean-minus-corrupted log p(answer)."""
    from interp.hypotheses import routes
    from interp.hypotheses.routes import _route_effects_loop, example_specs

    bridge, hf = bridge_model(family), hf_zoo.hf_model(hf_folder(family))
    p = with_corrupt_subject(city(tokenizer(hf_folder, family)).select([0, 2, 3, 5]))  # lengths 7..14
    via = [3]
    r = routes(bridge, p, source="subject", via=via, baseline=bridge)
    src = p.index("subject")
    loop_total, loop_specs, loop_eff = _route_effects_loop(bridge, p, example_specs(bridge, p, src, via))
    torch.testing.assert_close(r.total, loop_total, atol=1e-5, rtol=0)
    by_loop = {s.name: loop_eff[j] for j, s in enumerate(loop_specs)}
    for x in r.routes:
        want = by_loop.get(x.name, torch.full((len(p),), float("nan"), dtype=torch.float64))
        torch.testing.assert_close(x.effect, want, atol=1e-5, rtol=0, equal_nan=True)
    for i in range(len(p)):
        toks, t, ans = one(p, i)
        want = hf_answer_lp(hf, toks, t, ans) - hf_answer_lp(hf, alone(p.partner, i), t, ans)
        assert r.total[i].item() == pytest.approx(want, abs=1e-4)


def test_multihop_interchange_on_text_prompts(family, bridge_model, hf_folder):
    """Patching the partner's residual at a named position into each prompt equals a hand patch
    (the Bridge's own run_with_hooks) on the prompt alone."""
    from interp.hypotheses.base import positions_of
    from interp.hypotheses.multihop import _interchange
    from interp.lens.residual import lens_hooks
    from interp.prompts import LAST

    bridge = bridge_model(family)
    p = city(tokenizer(hf_folder, family))
    k = len(p)
    partner = p.select([(i + 1) % k for i in range(k)])
    p = p.with_partner(partner.right())
    names = (LAST, "subject")
    pos = {str(x): positions_of(p, x) for x in names}
    ppos = {str(x): positions_of(p.partner, x) for x in names}
    outs, lds = _interchange(bridge, p, pos, ppos, batch_size=256)
    hooks = lens_hooks(2)
    for i in range(k):
        toks, t, _ = one(p, i)
        ptoks, _, _ = one(p.partner, i)
        with torch.inference_mode():
            _, pcache = bridge.run_with_cache(ptoks)
        for name in names:
            a, b = int(pos[str(name)][i]), int(ppos[str(name)][i])
            for layer, hook in enumerate(hooks):
                def put(act, hook, a=a, b=b, src=pcache[hook]):
                    act = act.clone()
                    act[:, a] = src[:, b]
                    return act
                with torch.inference_mode():
                    logits = bridge.run_with_hooks(toks, fwd_hooks=[(hook, put)])[0]
                own, other = int(p.first_answer[i]), int(p.partner.first_answer[i])
                want = float(logits[t, other] - logits[t, own])
                assert lds[str(name)][layer, i].item() == pytest.approx(want, abs=1e-4)
                assert outs[str(name)][layer].correct[i].item() == float(logits[t].argmax() == other)


def test_multihop_and_positional_decay_end_to_end(family, bridge_model, hf_folder):
    """The public entry points run on text prompts of the family's tokenizer, with the random
    baseline built for the Bridge (the Hugging Face class's own initialisation)."""
    from interp.hypotheses import multihop, positional_decay
    from interp.hypotheses.base import random_like
    from interp.prompts import Prompts

    bridge = bridge_model(family)
    tok = tokenizer(hf_folder, family)
    base = random_like(bridge)
    assert type(base) is type(bridge) and not torch.equal(base.W_U, bridge.W_U)
    p = city(tok)
    k = len(p)
    parts = [p.with_partner(p.select([(i + roll) % k for i in range(k)]).right()) for roll in (1, 2, 3, 4)]
    rows = [x.right() for x in parts]
    big = Prompts.from_tokens([alone(x, i)[0, : int(x.prompt_lengths[i])] for x in rows for i in range(k)],
                              answers=[x.answers[i, : int(x.answer_lengths[i])].tolist() for x in rows for i in range(k)],
                              spans={"subject": torch.cat([x.span("subject") for x in rows])})
    pbig = Prompts.from_tokens([alone(x.partner, i)[0, : int(x.partner.prompt_lengths[i])] for x in rows for i in range(k)],
                               answers=[x.partner.answers[i, : int(x.partner.answer_lengths[i])].tolist()
                                        for x in rows for i in range(k)],
                               spans={"subject": torch.cat([x.partner.span("subject") for x in rows])})
    big = big.with_partner(pbig)
    bridge_tok = pbig.first_answer
    m = multihop(bridge, big, bridge_tok, baseline=base)
    assert m.model_name == bridge.cfg.model_name and set(m.iia) >= {"last"}
    at = torch.arange(len(big)) % 3  # one fact token at different distances from the query
    decay_p = big.with_partner(None).with_spans(fact=torch.stack([at, at + 1], 1))
    d = positional_decay({family: bridge}, decay_p, baseline={family: base}, positions_per_prompt=4)
    assert set(d.models) == {family}


def hf_greedy(hf, toks: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    """HF's own greedy continuation of one unpadded prompt, recomputed from scratch at every step
    (no EOS stop): the tokens and each step's last-position logits [steps, d_vocab]."""
    seq, logits = toks, []
    with torch.inference_mode():
        for _ in range(steps):
            z = hf(seq).logits[0, -1].double()
            logits.append(z)
            seq = torch.cat([seq, z.argmax()[None, None]], 1)
    return seq[0, toks.shape[1]:].tolist(), torch.stack(logits)


def test_generate_and_course_correction_on_text_prompts(family, bridge_model, hf_folder):
    """Greedy `generate` on a left-padded batch is HF's greedy continuation of each prompt alone
    (tokens and logits), with and without the K/V cache (a Bridge recomputes: a regression, its
    cached steps read the new token alone); course-correction's unforced and forced
    continuations are HF's, its log p(recovery token) at the surprise is HF's, and cutting the
    surprise's attention to the context equals reading the surprise alone (relative-position
    families; GPT-2's learned positions differ)."""
    from interp.decoding import generate
    from interp.hypotheses.course_correction import course_correction, prompt_inputs

    bridge, hf = bridge_model(family), hf_zoo.hf_model(hf_folder(family))
    p = city(tokenizer(hf_folder, family), side="left").select([0, 1, 2])
    ctx = prompt_inputs(p).prompts  # the prompts without their answers
    steps = 3
    want = [hf_greedy(hf, alone(ctx, i), steps) for i in range(len(ctx))]
    for cache in (True, False):
        g = generate(bridge, ctx.to_side("left"), steps, cache=cache)
        assert not g.cached
        for i, (toks, logits) in enumerate(want):
            assert g.tokens[i].tolist() == toks, (cache, i)
            torch.testing.assert_close(g.logits[i].double(), logits, rtol=0, atol=1e-4)
    surprise = torch.tensor([int(lg[0].argmin()) for _, lg in want])  # each prompt's least likely token
    r = course_correction(bridge, prompt_inputs(p, surprise=surprise), steps=2, baseline=False, n_boot=10)
    m = r.model
    for i in range(len(ctx)):
        toks = alone(ctx, i)
        assert m.unforced[i].tolist() == want[i][0]
        forced = torch.cat([toks, surprise[i].view(1, 1)], 1)
        cont, lg = hf_greedy(hf, forced, 2)
        assert m.forced[i].tolist() == [int(surprise[i])] + cont
        u1 = int(m.target[i])
        assert u1 == want[i][0][1]
        assert m.m_forced[i].item() == pytest.approx(float(lg[0].log_softmax(-1)[u1]), abs=1e-4)
        if family != "gpt2":
            cut = hf_greedy(hf, surprise[i].view(1, 1), 1)[1][0].log_softmax(-1)[u1]
            assert m.drop_kv[i].item() == pytest.approx(m.m_forced[i].item() - float(cut), abs=1e-4)


# ------------------------------------------------------------------------------ probes, SAEs


def test_probe_on_toolkit_activations_matches_sklearn(family, bridge_model):
    """A linear probe (which of 3 tokens sits at the last position) on the toolkit's cached
    activations: accuracy within a point of scikit-learn's on the same features and split."""
    from sklearn.linear_model import LogisticRegression

    from interp.cache import collect
    from interp.probing import fit, split_by_group

    bridge = bridge_model(family)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(2, hf_zoo.VOCAB, (240, 6), generator=g)
    labels = torch.randint(0, 3, (240,), generator=g)
    tokens[:, -1] = 10 + labels  # the label is the last token: decodable at every layer
    tokens[:, -2] = torch.randint(2, hf_zoo.VOCAB, (240,), generator=g)
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(2)]
    cache = collect(bridge, tokens, hooks=hooks, positions="last", progress=False)
    x = torch.stack([cache[h][:, 0] for h in hooks]).double()
    res = fit(x, labels, "logistic", shuffled=False, n_boot=100, tol=1e-7, max_iter=500)
    train, test = split_by_group(torch.arange(240), 0.25, seed=0)
    for layer in range(2):
        z = x[layer]
        z = ((z - z[train].mean(0)) / z[train].std(0, correction=0)).numpy()
        acc = LogisticRegression(C=1.0, tol=1e-8, max_iter=2000).fit(z[train], labels[train].numpy()).score(
            z[test], labels[test].numpy())
        assert abs(float(res.value[layer]) - acc) <= 0.02
    assert float(res.value[0]) > 0.6  # chance is 1/3


def test_sae_trains_on_the_bridge_and_traces(family, bridge_model):
    """sae-lens trains from the toolkit's activations of a Bridge; the trace's firing frequencies
    and `feature_activations` equal the SAE's own encoding of the Bridge's run_with_cache."""
    from interp.graph import Node, Site
    from interp.sae import TrainConfig, feature_activations, trace, train

    bridge = bridge_model(family)
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(2, hf_zoo.VOCAB, (64, 10), generator=g)
    node = Node(1, Site.RESID_PRE)
    res = train(bridge, tokens, node, TrainConfig(d_sae=32, sae_kwargs={"k": 4}, batch_size=128,
                                                  training_samples=2048, dead_feature_window=10**6))
    sae = res.sae
    assert sae.cfg.metadata.hook_name == node.hook_name and sae.cfg.d_in == Arch.of(bridge).d_model
    held = torch.randint(2, hf_zoo.VOCAB, (8, 10), generator=g)
    with torch.inference_mode():
        _, ref_cache = bridge.run_with_cache(held)
        want = sae.encode(ref_cache[node.hook_name].reshape(-1, sae.cfg.d_in).to(sae.dtype))
    got = feature_activations(bridge, sae, held, positions="all")
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    t = trace(bridge, sae, held, features=[0, 1, 2], k=3)
    torch.testing.assert_close(t.frequency, (want[:, :3] != 0).float().mean(0), rtol=0, atol=1e-6)


# ------------------------------------------------------------------- the command line, end to end


@pytest.mark.parametrize("family_", ["llama", "gpt2"])  # a BOS-prepending and a byte-level tokenizer
def test_cli_run_last_token_on_a_local_hf_folder(family_, hf_folder, tmp_path):
    """config + safetensors + tokenizer folder -> interp.load_model(path) (a TransformerBridge) ->
    `interp run last-token --model PATH --prompts FILE.jsonl` on text prompts; the log p(answer)
    it reports is HF's own on each prompt alone."""
    import json

    from typer.testing import CliRunner

    from interp import cli_run, load_model
    from interp.arch import is_bridge
    from interp.prompts import read_prompts

    folder = hf_folder(family_)
    path = tmp_path / "city.jsonl"
    path.write_text("".join(json.dumps({"prompt": t, "answer": a, "spans": {"subject": s}}) + "\n" for t, s, a in CITY))
    out = tmp_path / "r.html"
    res = CliRunner().invoke(cli_run.app, ["last-token", "--model", str(folder), "--prompts", str(path),
                                           "--out", str(out)])
    assert res.exit_code == 0, (res.output, res.exception)
    assert out.is_file() and "Verdict" in out.read_text()
    model = load_model(folder)
    assert is_bridge(model)
    p = read_prompts(path, model.tokenizer)
    hf = hf_zoo.hf_model(folder)
    want = sum(hf_answer_lp(hf, *one(p, i)) for i in range(len(p))) / len(p)
    got = re.search(r"log p\(answer\) (-?[0-9.]+)", " ".join(res.output.split()))
    assert got is not None, res.output
    assert float(got.group(1)) == pytest.approx(want, abs=2e-3)


# ------------------------------------------------------------ the same weights loaded both ways


@pytest.mark.skipif(not HAS_HOOKED_TRANSFORMER, reason=f"kind='hooked' needs a HookedTransformer, which "
                    f"transformer-lens {TL_VERSION} removed (4.0)")
@pytest.mark.parametrize("family_", ["gpt2", "llama"])
def test_bridge_and_hookedtransformer_agree_on_lenses_and_investigations(family_, hf_folder, bridge_model):
    """The HF folder as a TransformerBridge and as a HookedTransformer (TransformerLens's own
    conversion, `load_model(kind="hooked")`): logit lens logits agree to 1e-4 and the last-token
    investigation's per-example values (clean, knockout, K/V and transplant curves) to 1e-4."""
    from interp import load_model
    from interp.arch import is_bridge
    from interp.hypotheses import last_token_sufficiency
    from interp.lens import logit_lens

    folder = hf_folder(family_)
    bridge, hooked = bridge_model(family_), load_model(folder, kind="hooked")
    assert is_bridge(bridge) and not is_bridge(hooked)
    p = city(tokenizer(hf_folder, family_), side="left")
    a = logit_lens(bridge, p, at="subject", keep_logits=True, progress=False)
    b = logit_lens(hooked, p, at="subject", keep_logits=True, progress=False)
    # HookedTransformer centres the unembedding (logits shift by a per-position constant)
    torch.testing.assert_close(a.logits.log_softmax(-1), b.logits.log_softmax(-1), rtol=0, atol=1e-4)
    ra = last_token_sufficiency(bridge, p, baseline=bridge)
    rb = last_token_sufficiency(hooked, p, baseline=hooked)
    torch.testing.assert_close(ra.clean.logprob, rb.clean.logprob, rtol=0, atol=1e-4)
    for ca, cb in ((ra.knockout, rb.knockout), (ra.kv, rb.kv), (ra.transplant, rb.transplant)):
        for x, y in zip(ca, cb, strict=True):
            torch.testing.assert_close(x.logprob, y.logprob, rtol=0, atol=1e-4)


# ------------------------------------------------------------- the README's families x APIs table


def _families_covered(path, name: str) -> set[str]:
    """The families a test runs on, read from its source: the `family` fixture (all of them), a
    `parametrize("family_", [...])` or `parametrize("family_,x", [(family, x), ...])` list, or
    test_dtype's FAMILIES."""
    import ast

    tree = ast.parse(path.read_text())
    consts = {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Tuple)}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            if "family" in [a.arg for a in node.args.args]:
                return set(hf_zoo.FAMILIES)
            for dec in node.decorator_list:
                if (isinstance(dec, ast.Call) and ast.unparse(dec.func).endswith("parametrize")
                        and ast.literal_eval(dec.args[0]).split(",")[0] == "family_"):
                    values = dec.args[1].elts  # "family_": names; "family_,other": tuples
                    return {ast.literal_eval(v.elts[0] if isinstance(v, ast.Tuple) else v) for v in values}
                if isinstance(dec, ast.Name) and dec.id == "FAMILY":
                    return set(consts["FAMILIES"])
            return set()
    raise AssertionError(f"README families table: expected a test {name} in {path.name}, got none")


def test_readme_families_table_cells_are_tests():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Any model: Hugging Face families", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("| ") and "::" in r]
    header = next(r for r in section.splitlines() if r.startswith("| API |"))
    fams = [c.strip() for c in header.strip("|").split("|")][2:]
    assert fams == list(hf_zoo.FAMILIES)
    assert len(rows) >= 15
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        file, name = cells[1].strip("`").split("::")
        covered = _families_covered(root / "tests" / file, name)
        marked = {f for f, c in zip(fams, cells[2:], strict=True) if c == "✓"}
        assert marked and marked == covered, (row, covered)
