"""Cross-position patching (partners of other lengths, named positions), cumulative K/V patching
and knockout of a whole query span: padded batches equal each prompt alone, and every value
equals a hand-written hook run (TransformerLens hooks on the unpadded prompt)."""

from __future__ import annotations

import pytest
import torch
from conftest import CITY_PROMPTS

from interp.graph import Node, Site
from interp.metrics import answer_logprob, logit_diff
from interp.patching import At, knockout, kv_patch, patch, sweep
from interp.prompts import Prompts
from interp.tl import is_native

TOL = 1e-5


def _single(tok) -> Prompts:
    """The city prompts with single-token answers (each answer's first token)."""
    texts = [p for p, _, _ in CITY_PROMPTS]
    full = Prompts.from_text(texts, tok, spans={"subject": [s for _, s, _ in CITY_PROMPTS]},
                             answers=[a for _, _, a in CITY_PROMPTS]).right()
    seqs = [full.tokens[i, : int(full.prompt_lengths[i])] for i in range(len(full))]
    return Prompts.from_tokens(seqs, spans={"subject": full.span("subject")}, answers=full.answers[:, :1])


@pytest.fixture(params=["right", "left"])
def crossed(request, bpe_tokenizer) -> Prompts:
    """Each prompt's partner is another city prompt (another length, another answer)."""
    p = _single(bpe_tokenizer)
    partner = p.select(torch.arange(len(p)).roll(1))
    assert bool((partner.lengths != p.lengths).any())
    return p.with_partner(partner.to_side(request.param)).to_side(request.param)


def _alone(p: Prompts, i: int) -> Prompts:
    return p.select([i]).right()


def _logprob_at_last(model, tokens, answer, hooks=()) -> float:
    with torch.inference_mode(), model.hooks(fwd_hooks=list(hooks)):
        logits = model(tokens[None])
    return float(logits[0, -1].float().log_softmax(-1)[answer])


def _hand_patch(model, p: Prompts, i: int, layer: int, site: str, direction: str) -> float:
    """Patch `site` at layer `layer` at each prompt's last token from the other run (noising: the
    partner's value into the clean run; denoising: the clean value into the partner's run),
    read log p(base prompt's answer) at the base prompt's last token."""
    r, q = p.right(), p.partner.right()
    clean = r.tokens[i, : int(r.lengths[i])].to(model.cfg.device)
    other = q.tokens[i, : int(q.lengths[i])].to(model.cfg.device)
    base, src = (clean, other) if direction == "noising" else (other, clean)
    name = Node(layer, site).hook_name
    _, cache = model.run_with_cache(src[None], names_filter=[name])
    value = cache[name][0, -1]

    def hook(act, hook):
        act = act.clone()
        act[0, -1] = value
        return act

    answer = int((r if direction == "noising" else q).answers[i, 0])
    return _logprob_at_last(model, base, answer, [(name, hook)])


@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_cross_position_sweep_equals_alone_and_a_hand_hook(any_model, crossed, direction):
    layers = [0, 1, any_model.cfg.n_layers - 1]
    r = sweep(any_model, crossed, answer_logprob(), site="resid_pre", layers=layers, positions=["last"],
              direction=direction)
    for i in range(len(crossed)):
        alone = sweep(any_model, _alone(crossed, i), answer_logprob(), site="resid_pre", layers=layers,
                      positions=["last"], direction=direction)
        torch.testing.assert_close(r.per_example[..., i], alone.per_example[..., 0], atol=TOL, rtol=0)
        torch.testing.assert_close(r.corrupt_values[i], alone.corrupt_values[0], atol=TOL, rtol=0)
        for j, layer in enumerate(layers):
            ref = _hand_patch(any_model, crossed, i, layer, "resid_pre", direction)
            # denoising reads the corrupted run with the clean prompts' answers (engine.read_as)
            if direction == "denoising":
                q = crossed.partner.right()
                tokens = q.tokens[i, : int(q.lengths[i])].to(any_model.cfg.device)
                name = Node(layer, "resid_pre").hook_name
                r_ = crossed.right()
                _, cache = any_model.run_with_cache(r_.tokens[i, : int(r_.lengths[i])][None].to(any_model.cfg.device),
                                                    names_filter=[name])
                value = cache[name][0, -1]

                def hook(act, hook, value=value):
                    act = act.clone()
                    act[0, -1] = value
                    return act

                ref = _logprob_at_last(any_model, tokens, int(r_.answers[i, 0]), [(name, hook)])
            assert abs(float(r.per_example[j, 0, i]) - ref) < TOL
    # the corrupted run is read at its own last token with the clean answer
    q, c = crossed.partner.right(), crossed.right()
    for i in range(len(crossed)):
        ref = _logprob_at_last(any_model, q.tokens[i, : int(q.lengths[i])].to(any_model.cfg.device), int(c.answers[i, 0]))
        assert abs(float(r.corrupt_values[i]) - ref) < TOL


def test_cross_position_patch_of_several_names_and_heads(any_model, crossed):
    """`patch` with At nodes at names (per-head output at `last`), noising; logit_diff reads the
    partner's answer as the wrong one."""
    nodes = [At(1, "head", "last", head=0), At(0, "resid_post", "last")]
    r = patch(any_model, crossed, logit_diff(), nodes, direction="noising")
    for i in range(len(crossed)):
        alone = patch(any_model, _alone(crossed, i), logit_diff(), nodes, direction="noising")
        torch.testing.assert_close(r.per_example[0, i], alone.per_example[0, 0], atol=TOL, rtol=0)


def test_int_positions_still_need_one_length(gpt2_model, crossed):
    with pytest.raises(ValueError, match=r"corrupted prompt \d+: expected its clean prompt's length"):
        sweep(gpt2_model, crossed, answer_logprob(), positions=[0, "last"])


def test_a_span_of_other_token_count_is_refused(gpt2_model, crossed):
    counts = crossed.span("subject").diff(dim=1)[:, 0]
    assert bool((counts != crossed.partner.span("subject").diff(dim=1)[:, 0]).any())
    with pytest.raises(ValueError, match=r"as many tokens in the source prompt"):
        sweep(gpt2_model, crossed, answer_logprob(), positions=["subject"], direction="noising")


# ------------------------------------------------------------------------- cumulative K/V patching

@pytest.fixture(params=["right", "left"])
def city(request, bpe_tokenizer) -> Prompts:
    from test_patching_padded import _city

    return _city(bpe_tokenizer, request.param)


def test_cumulative_kv_patch_equals_alone_and_a_hand_hook(any_model, city):
    n_layers = any_model.cfg.n_layers
    r = kv_patch(any_model, city, answer_logprob(), positions=["subject"], per_group=False, cumulative=True,
                 direction="noising")
    assert r.per_example.shape == (n_layers, 1, len(city))
    c, q = city.right(), city.partner.right()
    for i in range(len(city)):
        alone = kv_patch(any_model, _alone(city, i), answer_logprob(), positions=["subject"], per_group=False,
                         cumulative=True, direction="noising")
        torch.testing.assert_close(r.per_example[..., i], alone.per_example[..., 0], atol=TOL, rtol=0)
        n = int(c.lengths[i])
        clean = c.tokens[i, :n].to(any_model.cfg.device)
        other = q.tokens[i, :n].to(any_model.cfg.device)
        s0, s1 = c.span("subject")[i].tolist()
        names = [Node(x, s).hook_name for x in range(n_layers) for s in (Site.K, Site.V)]
        _, cache = any_model.run_with_cache(other[None], names_filter=names)
        for layer in range(n_layers):
            hooks = []
            for x in range(layer, n_layers):
                for s in (Site.K, Site.V):
                    name = Node(x, s).hook_name

                    def hook(act, hook, name=name, s0=s0, s1=s1, cache=cache):
                        act = act.clone()
                        act[0, s0:s1] = cache[name][0, s0:s1]
                        return act

                    hooks.append((name, hook))
            with torch.inference_mode(), any_model.hooks(fwd_hooks=hooks):
                logits = any_model(clean[None])
            plen, alen = int(c.prompt_lengths[i]), int(c.answer_lengths[i])
            lp = logits[0].float().log_softmax(-1)
            ref = sum(float(lp[plen - 1 + j, int(c.answers[i, j])]) for j in range(alen))
            assert abs(float(r.per_example[layer, 0, i]) - ref) < TOL
    # a cumulative cell at the last layer is the one-layer cell there
    one = kv_patch(any_model, city, answer_logprob(), positions=["subject"], per_group=False,
                   layers=[n_layers - 1], direction="noising")
    torch.testing.assert_close(r.per_example[-1], one.per_example[0], atol=TOL, rtol=0)


# ------------------------------------------------------------------------- knockout of a query span

def test_knockout_of_the_answer_span_equals_alone_and_a_hand_hook(any_model, city):
    n_layers = any_model.cfg.n_layers
    r = knockout(any_model, city, answer_logprob(), at="answer")
    c = city.right()
    assert bool((c.answer_lengths > 1).any())  # multi-token answers: a read-out span of several queries
    for i in range(len(city)):
        alone = knockout(any_model, _alone(city, i), answer_logprob(), at="answer")
        torch.testing.assert_close(r.per_example[:, i], alone.per_example[:, 0], atol=TOL, rtol=0)
        torch.testing.assert_close(r.kl_per_example[:, i], alone.kl_per_example[:, 0], atol=TOL, rtol=1e-4)
        n = int(c.lengths[i])
        plen, alen = int(c.prompt_lengths[i]), int(c.answer_lengths[i])
        tokens = c.tokens[i, :n].to(any_model.cfg.device)
        with torch.inference_mode():
            base = any_model(tokens[None])[0, plen - 1].double().log_softmax(-1)
        for start in range(n_layers):
            def hook(scores, hook, plen=plen, alen=alen):
                scores = scores.clone()
                scores[0, :, plen - 1: plen - 1 + alen, : plen - 1] = float("-inf")
                return scores

            def cut(pattern, hook, plen=plen, alen=alen):  # the same, after the softmax: zero and renormalise
                pattern = pattern.clone()
                rows = pattern[0, :, plen - 1: plen - 1 + alen].clone()
                rows[..., : plen - 1] = 0
                pattern[0, :, plen - 1: plen - 1 + alen] = rows / rows.sum(-1, keepdim=True)
                return pattern

            # TL's own hooks cannot edit a native bridge's scores (the TL 4 fixtures): edit its pattern
            site, fn = (Site.PATTERN, cut) if is_native(any_model) else (Site.ATTN_SCORES, hook)
            hooks = [(Node(x, site).hook_name, fn) for x in range(start, n_layers)]
            with torch.inference_mode(), any_model.hooks(fwd_hooks=hooks):
                logits = any_model(tokens[None])
            lp = logits[0].float().log_softmax(-1)
            ref = sum(float(lp[plen - 1 + j, int(c.answers[i, j])]) for j in range(alen))
            assert abs(float(r.per_example[start, i]) - ref) < TOL
            knocked = logits[0, plen - 1].double().log_softmax(-1)
            kl = float((base.exp() * (base - knocked)).sum())
            assert abs(float(r.kl_per_example[start, i]) - kl) < TOL + 1e-4 * kl


def test_cross_position_errors_say_what_was_expected(gpt2_model, crossed, bpe_tokenizer):
    bare = crossed.with_partner(crossed.partner.with_spans())  # the partner without 'subject'
    bare = bare.with_partner(Prompts(bare.partner.tokens, bare.partner.lengths, bare.partner.side,
                                     answers=bare.partner.answers))
    with pytest.raises(ValueError, match=r"expected the span 'subject' in both prompts"):
        patch(gpt2_model, bare, answer_logprob(), [At(0, "resid_pre", "subject")], direction="noising")
    from test_patching_padded import _city

    multi = _city(bpe_tokenizer)  # multi-token answers
    other = multi.partner.select(torch.arange(len(multi)).roll(1))
    with pytest.raises(ValueError, match=r"denoising with prompts of different lengths"):
        sweep(gpt2_model, multi.with_partner(other), answer_logprob(), positions=["last"], direction="denoising")
    # noising reads the clean run at the clean prompts; the corrupted run's metric cannot carry the
    # clean multi-token answers, so it is NaN (and the patched values are still the clean prompts')
    r = sweep(gpt2_model, multi.with_partner(other), answer_logprob(), positions=["last"], direction="noising")
    assert bool(torch.isnan(r.corrupt_values).all()) and bool(torch.isfinite(r.per_example).all())
