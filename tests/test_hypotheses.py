"""Hypothesis investigations: per-example equivalence of padded batches with each prompt run
alone (hand-written TransformerLens hooks as the reference), invariants on tiny models, ground
truth on the organisms, and no verdict on random-initialised models."""

from __future__ import annotations

import pytest
import torch

from interp.graph import Node, Site
from interp.hooks import Patch, run_with_interventions
from interp.hypotheses import distance_groups, last_token_sufficiency, multihop, positional_decay, routes
from interp.hypotheses.base import Outcome, Verdict, positions_of, random_like
from interp.hypotheses.last_token import _curves, neutral_context, neutral_prompts
from interp.hypotheses.multihop import _interchange
from interp.hypotheses.positional_decay import _fit_decay, _profile
from interp.hypotheses.routes import RouteEffect, RoutesResult, _route_effects_loop, example_specs
from interp.lens.residual import lens_hooks
from interp.models import list_organisms
from interp.probing import fit
from interp.prompts import LAST, Prompts
from interp.stats import Estimate
from interp.tl import is_native
from tests.conftest import CITY_PROMPTS

HAVE = set(list_organisms())


def need(*names: str) -> None:
    missing = [n for n in names if n not in HAVE]
    if missing:
        pytest.fail(f"shipped organisms missing: {missing} (train with `interp organisms train NAME`)")


# ------------------------------------------------------------ prompts of different lengths (bpe_tokenizer)

def city_prompts(tok, side: str = "right", roll: int = 1) -> Prompts:
    """CITY_PROMPTS (8..18 prompt tokens, multi-token names and answers) with the span `subject`
    and, as partner, another city's prompt (rolled by `roll`)."""
    texts = [p for p, _, _ in CITY_PROMPTS]
    subj = [s for _, s, _ in CITY_PROMPTS]
    ans = [a for _, _, a in CITY_PROMPTS]
    k = len(texts)
    j = [(i + roll) % k for i in range(k)]
    partner = Prompts.from_text([texts[i] for i in j], tok, spans={"subject": [subj[i] for i in j]},
                                answers=[ans[i] for i in j], side=side)
    return Prompts.from_text(texts, tok, spans={"subject": subj}, answers=ans, side=side).with_partner(partner)


def one(p: Prompts, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Prompt i alone: its real tokens (answer tokens but the last appended), its last prompt
    position and its answer tokens."""
    r = p.right()
    return (r.tokens[i, : int(r.lengths[i])], int(r.prompt_lengths[i]) - 1,
            r.answers[i, : int(r.answer_lengths[i])])


def answer_lp(logits: torch.Tensor, t: int, ans: torch.Tensor) -> float:
    """Sum over the answer's tokens of log p at their teacher-forced positions t, t+1, ..."""
    lp = logits.float().log_softmax(-1)
    return float(sum(lp[t + j, int(a)] for j, a in enumerate(ans)).detach())


def blocking(queries, keys):
    def hook(scores, hook):
        scores = scores.clone()
        for q in queries:
            scores[:, :, q, list(keys)] = float("-inf")
        return scores
    return hook


def scores_hook(layer: int) -> str:
    return Node(layer, Site.ATTN_SCORES).hook_name


def blocking_pattern(queries, keys):
    """`blocking` after the softmax: the blocked entries zeroed and each query's row renormalised."""
    def hook(pattern, hook):
        pattern = pattern.clone()
        for q in queries:
            row = pattern[:, :, q].clone()
            row[..., list(keys)] = 0
            pattern[:, :, q] = row / row.sum(-1, keepdim=True)
        return pattern
    return hook


def knockout_hooks(model, layers, queries, keys) -> list:
    """TransformerLens hooks blocking `queries` from `keys` at `layers`: on the scores, or on the
    pattern of a native bridge (the TL 4 fixtures), whose scores TL's own hooks cannot edit."""
    if is_native(model):
        return [(Node(x, Site.PATTERN).hook_name, blocking_pattern(queries, keys)) for x in layers]
    return [(scores_hook(x), blocking(queries, keys)) for x in layers]


# Padding side x positional scheme: left padding shifts positions (learned table: gpt2; rotary:
# llama); right padding is checked once (llama). Three of the four combinations keep the suite short.
PADDED = pytest.mark.parametrize("any_model,side", [("gpt2", "left"), ("llama", "left"), ("llama", "right")],
                                 indirect=["any_model"])


@PADDED
def test_last_token_padded_batch_equals_each_prompt_alone(any_model, bpe_tokenizer, side):
    p = city_prompts(bpe_tokenizer, side)
    p = p.with_partner(neutral_prompts(p))  # the neutral context, fixed so each prompt alone gets the same
    L = any_model.cfg.n_layers
    clean, neut, knock, trans, kv = _curves(any_model, p.right().with_partner(p.partner.right()), batch_size=256)
    for i in range(len(p)):
        toks, t, ans = one(p, i)
        span = range(t, len(toks))
        # reference: TransformerLens hooks on the prompt alone, unpadded
        want_clean = answer_lp(any_model(toks[None])[0], t, ans)
        assert clean.logprob[i].item() == pytest.approx(want_clean, abs=1e-5)
        for layer in range(L):
            hooks = knockout_hooks(any_model, range(layer, L), span, range(t)) if t else []
            want = answer_lp(any_model.run_with_hooks(toks[None], fwd_hooks=hooks)[0], t, ans)
            assert knock[layer].logprob[i].item() == pytest.approx(want, abs=1e-5)
        # and the investigation's own values for the prompt alone (a batch of one, unpadded)
        alone = p.select([i]).right()
        a = _curves(any_model, alone.with_partner(alone.partner.right()), batch_size=1)
        for got, ref in ((clean, a[0]), (neut, a[1])):
            torch.testing.assert_close(got.logprob[i: i + 1], ref.logprob, atol=1e-5, rtol=0)
        for curve, ref in ((knock, a[2]), (trans, a[3]), (kv, a[4])):
            for layer in range(L + 1):
                torch.testing.assert_close(curve[layer].logprob[i: i + 1], ref[layer].logprob, atol=1e-5, rtol=0)
                torch.testing.assert_close(curve[layer].kl[i: i + 1], ref[layer].kl, atol=1e-5, rtol=0)
    # the public entry point: the same per-example values, in the caller's row order
    r = last_token_sufficiency(any_model, p, baseline=random_like(any_model))
    torch.testing.assert_close(r.knockout[0].logprob, knock[0].logprob, atol=1e-5, rtol=0)
    assert r.meta["lengths"] == sorted(set(p.prompt_lengths.tolist())) and len(r.meta["lengths"]) > 2


def test_last_token_kv_and_transplant_match_hand_patches(any_model, bpe_tokenizer):
    p = city_prompts(bpe_tokenizer)
    p = p.with_partner(neutral_prompts(p))
    L = any_model.cfg.n_layers
    _, _, _, trans, kv = _curves(any_model, p, batch_size=256)
    for i in range(len(p)):
        toks, t, ans = one(p, i)
        ntoks = p.partner.right().tokens[i, : len(toks)]
        _, ncache = any_model.run_with_cache(ntoks[None])
        _, ccache = any_model.run_with_cache(toks[None])
        ivs = [Patch(Node(x, s), pos=tuple(range(t)), source=ncache[Node(x, s).hook_name])
               for x in range(1, L) for s in (Site.K, Site.V)] if t else []
        hand, _ = run_with_interventions(any_model, toks[None], ivs)
        assert kv[1].logprob[i].item() == pytest.approx(answer_lp(hand[0], t, ans), abs=1e-5)
        node = Node(1, Site.RESID_PRE)
        tp, _ = run_with_interventions(any_model, ntoks[None], [Patch(node, pos=tuple(range(t, len(toks))),
                                                                      source=ccache[node.hook_name])])
        assert trans[1].logprob[i].item() == pytest.approx(answer_lp(tp[0], t, ans), abs=1e-5)


def test_neutral_prompts_keep_last_token_and_take_another_context(bpe_tokenizer):
    p = city_prompts(bpe_tokenizer)
    n = neutral_prompts(p)
    assert torch.equal(n.lengths, p.lengths)
    for i in range(len(p)):
        toks, t, _ = one(p, i)
        mine = n.tokens[i, : len(toks)]
        assert torch.equal(mine[t:], toks[t:])  # the last prompt token and the answer tokens kept
        # the longest other prompt's context: its first t tokens, or repeated when it is shorter
        j = max((k for k in range(len(p)) if k != i), key=lambda k: int(p.prompt_lengths[k]))
        ctx = one(p, j)[0][: int(p.prompt_lengths[j]) - 1]
        assert torch.equal(mine[:t], ctx.repeat(t // len(ctx) + 1)[:t])
    # within one length it is the previous example's context (neutral_context)
    toks = torch.randint(0, 50, (6, 7), generator=torch.Generator().manual_seed(0))
    same = neutral_prompts(Prompts.from_tokens(toks, answers=torch.zeros(6, dtype=torch.long)))
    assert torch.equal(same.tokens, neutral_context(toks))


def test_multihop_interchange_padded_batch_equals_each_prompt_alone(any_model, bpe_tokenizer):
    p = city_prompts(bpe_tokenizer).right()  # the interchange reads right-padded batches
    p = p.with_partner(p.partner.right())
    names = (LAST, "subject", 4)
    pos = {str(x): positions_of(p, x) for x in names}
    ppos = {str(x): positions_of(p.partner, x) for x in names}
    outs, lds = _interchange(any_model, p, pos, ppos, batch_size=256)
    L = any_model.cfg.n_layers
    hooks = lens_hooks(L)
    for i in range(len(p)):
        toks, t, _ = one(p, i)
        ptoks, _, _ = one(p.partner, i)
        _, pcache = any_model.run_with_cache(ptoks[None])
        own, other = int(p.first_answer[i]), int(p.partner.first_answer[i])
        for name in (LAST, "subject"):
            a, b = int(pos[name][i]), int(ppos[name][i])
            for layer, h in enumerate(hooks):
                def put(act, hook, _a=a, _b=b, _h=h, _c=pcache):
                    act = act.clone()
                    act[:, _a] = _c[_h][:, _b]
                    return act
                logits = any_model.run_with_hooks(toks[None], fwd_hooks=[(h, put)])[0, t]
                want = float((logits[other] - logits[own]).detach())
                assert lds[name][layer, i].item() == pytest.approx(want, abs=1e-5)
                assert outs[name][layer].correct[i].item() == float(logits.argmax() == other)
        # an int position: the same index in both prompts
        for layer in range(L + 1):
            got = lds["4"][layer, i].item()
            alone = _interchange(any_model, p.select([i]), {"4": pos["4"][i: i + 1]}, {"4": ppos["4"][i: i + 1]}, 1)
            assert got == pytest.approx(alone[1]["4"][layer, 0].item(), abs=1e-5)


def test_multihop_int_position_beyond_a_prompt_is_nan(gpt2_model, bpe_tokenizer):
    p = city_prompts(bpe_tokenizer)
    short = int(p.prompt_lengths.min())
    pos = {"p": positions_of(p, short)}
    ppos = {"p": positions_of(p.partner, short)}
    _, lds = _interchange(gpt2_model, p, pos, ppos, batch_size=256)
    has = (p.prompt_lengths > short) & (p.partner.prompt_lengths > short)
    assert bool(torch.isnan(lds["p"][:, ~has]).all()) and bool(torch.isfinite(lds["p"][:, has]).all())


def test_multihop_end_to_end_on_prompts_of_different_lengths(llama_model, bpe_tokenizer):
    # 20 prompts (the probes split by example): the city prompts with four different partners
    parts = [city_prompts(bpe_tokenizer, "left", roll) for roll in (1, 2, 3, 4)]
    rows = [part.right() for part in parts]
    seqs = [r.tokens[i, : int(r.lengths[i])] for r in rows for i in range(len(r))]
    pseqs = [r.partner.right().tokens[i, : int(r.partner.lengths[i])] for r in rows for i in range(len(r))]

    def build(rs, ss, take):
        prs = [take(r) for r in rs]
        return Prompts.from_tokens(
            [s[: int(pl)] for s, pl in zip(ss, torch.cat([x.prompt_lengths for x in prs]), strict=True)],
            answers=[x.answers[i, : int(x.answer_lengths[i])].tolist() for x in prs for i in range(len(x))],
            spans={"subject": torch.cat([x.span("subject") for x in prs])}, side="left")

    p = build(rows, seqs, lambda r: r).with_partner(build(rows, pseqs, lambda r: r.partner))
    bridge = p.partner.first_answer  # any labels: the values compared are the interchange's
    r = multihop(llama_model, p, bridge, positions=(LAST, "subject"), baseline=random_like(llama_model))
    q = p.right().with_partner(p.partner.right())
    pos = {k: positions_of(q, k) for k in (LAST, "subject")}
    ppos = {k: positions_of(q.partner, k) for k in (LAST, "subject")}
    for i in (0, 7, 19):
        _, alone = _interchange(llama_model, q.select([i]), {k: v[i: i + 1] for k, v in pos.items()},
                                {k: v[i: i + 1] for k, v in ppos.items()}, 1)
        for k in pos:
            torch.testing.assert_close(r.iia_logit_diff[k][:, i: i + 1], alone[k], atol=1e-5, rtol=0)
    assert r.per_example.shape == (2, llama_model.cfg.n_layers + 1, 20)


@PADDED
def test_decay_padded_batch_equals_each_prompt_alone(any_model, bpe_tokenizer, side):
    p = city_prompts(bpe_tokenizer, side)
    # the fact: the subject of prompts 0-1, one token at different places in the others
    # (each prompt twice, so that the probes have enough prompts to split)
    fact = torch.cat([p.span("subject"), torch.tensor([[1, 2], [3, 4], [4, 6], [2, 3], [5, 6]])])
    rows = list(range(len(p))) * 2
    p = Prompts.from_tokens([one(p, i)[0][: int(p.prompt_lengths[i])] for i in rows],
                            answers=[one(p, i)[2].tolist() for i in rows], spans={"fact": fact}, side=side)
    dist, groups = distance_groups(p, "fact")
    want_dist = p.index(LAST) - p.index("fact")
    assert torch.equal(dist, want_dist) and len(groups) >= 3
    r = positional_decay({"m": any_model}, p, baseline={"m": random_like(any_model)}, positions_per_prompt=4)
    m = r.models["m"]
    L = any_model.cfg.n_layers
    for d, idx in m.rows.items():
        assert torch.equal(want_dist[idx], torch.full_like(idx, d))
        for k, i in enumerate(idx.tolist()):
            toks, t, ans = one(p, i)
            s = p.span("fact")[i].tolist()
            clean = answer_lp(any_model(toks[None])[0], t, ans)
            hooks = knockout_hooks(any_model, range(L), range(t, len(toks)), range(*s))
            knocked = answer_lp(any_model.run_with_hooks(toks[None], fwd_hooks=hooks)[0], t, ans)
            assert m.clean[d].logprob[k].item() == pytest.approx(clean, abs=1e-5)
            assert m.knocked[d].logprob[k].item() == pytest.approx(knocked, abs=1e-5)


def test_decay_bins_group_distances(gpt2_model, bpe_tokenizer):
    p = city_prompts(bpe_tokenizer)
    p = Prompts.from_tokens([one(p, i)[0][: int(p.prompt_lengths[i])] for i in range(len(p))],
                            answers=[one(p, i)[2].tolist() for i in range(len(p))], spans={"fact": p.span("subject")})
    dist, groups = distance_groups(p, "fact", bins=(2, 3, 100))
    for edge, idx in groups.items():
        lower = {2: 0, 3: 2, 100: 3}[edge]
        assert bool(((dist[idx] > lower) & (dist[idx] <= edge)).all())
    assert sum(len(v) for v in groups.values()) == len(p)
    with pytest.raises(ValueError, match="covering every distance"):
        distance_groups(p, "fact", bins=(1,))


@PADDED
def test_routes_padded_batch_equals_each_prompt_alone(any_model, bpe_tokenizer, side):
    p = city_prompts(bpe_tokenizer, side).right()
    # the corrupted run: the subject's last token replaced (same lengths)
    src = p.index("subject")
    corrupt = p.tokens.clone()
    corrupt[torch.arange(len(p)), src] = (corrupt[torch.arange(len(p)), src] + 1) % 50
    q = Prompts(corrupt, p.lengths, "right", p.prompt_lengths, {"subject": p.span("subject")}, p.answers,
                p.answer_lengths).to_side(side)
    p = p.to_side(side).with_partner(q)
    via = [3, 5]
    r = routes(any_model, p, source="subject", via=via, baseline=random_like(any_model))
    # the batched run (one path_patch per receiver for all examples) equals the per-example loop
    # (one path_patch per example and route, each prompt alone)
    q_right = p.right().with_partner(q.right())
    loop_total, loop_specs, loop_eff = _route_effects_loop(any_model, q_right,
                                                           example_specs(any_model, q_right, src, via))
    torch.testing.assert_close(r.total, loop_total, atol=1e-5, rtol=0)
    by_loop = {s.name: loop_eff[j] for j, s in enumerate(loop_specs)}
    assert set(by_loop) <= {x.name for x in r.routes}
    for x in r.routes:
        want = by_loop.get(x.name, torch.full((len(p),), float("nan"), dtype=torch.float64))
        torch.testing.assert_close(x.effect, want, atol=1e-5, rtol=0, equal_nan=True)
    for i in range(len(p)):
        toks, t, ans = one(p, i)
        ctoks = one(q, i)[0]
        total = answer_lp(any_model(toks[None])[0], t, ans) - answer_lp(any_model(ctoks[None])[0], t, ans)
        assert r.total[i].item() == pytest.approx(total, abs=1e-5)
        alone = routes(any_model, p.select([i]), source="subject", via=via, baseline=any_model)
        by = {x.name: x.effect[0].item() for x in alone.routes}
        for x in r.routes:
            if x.name in by:
                assert x.effect[i].item() == pytest.approx(by[x.name], abs=1e-5, nan_ok=True)
            else:
                assert torch.isnan(x.effect[i])
    # a via position outside (source, last) of a prompt is NaN for it, and left out of its n
    frame = r.to_frame()
    assert (frame.n <= len(p)).all() and (frame.n < len(p)).any()


def test_routes_default_via_past_a_shorter_prompt_is_nan(gpt2_model, bpe_tokenizer):
    # regression: a two-step route through a position beyond a shorter prompt's last token raised
    # (the engine's causal check) instead of being NaN for that prompt
    p = city_prompts(bpe_tokenizer).right()
    src = p.index("subject")
    corrupt = p.tokens.clone()
    corrupt[torch.arange(len(p)), src] = (corrupt[torch.arange(len(p)), src] + 1) % 50
    q = Prompts(corrupt, p.lengths, "right", p.prompt_lengths, {"subject": p.span("subject")}, p.answers,
                p.answer_lengths)
    p = p.with_partner(q)
    r = routes(gpt2_model, p, source="subject", baseline=gpt2_model)
    loop_total, loop_specs, loop_eff = _route_effects_loop(gpt2_model, p, example_specs(gpt2_model, p, src, None))
    by_loop = {s.name: loop_eff[j] for j, s in enumerate(loop_specs)}
    assert {x.name for x in r.routes} == set(by_loop)
    for x in r.routes:
        torch.testing.assert_close(x.effect, by_loop[x.name], atol=1e-5, rtol=0, equal_nan=True)
    vias = [x for x in r.routes if x.kind == "via"]
    assert vias and all(int(torch.isfinite(x.effect).sum()) == 1 for x in vias)  # each via: one prompt's


def test_decay_fit_and_profile_hand_cases():
    d = [1, 5, 10, 20, 40, 80]
    y = [3.0 * torch.exp(torch.tensor(-x / 12.0)).item() + 0.5 for x in d]
    f = _fit_decay(d, y)
    assert abs(f.tau - 12.0) < 0.05 and abs(f.a - 3.0) < 0.01 and abs(f.c - 0.5) < 0.01
    assert f.length == pytest.approx(12.0, abs=0.05)
    e = lambda v: Estimate(v, v - 0.01, v + 0.01)  # noqa: E731
    assert _profile([e(0.9), e(0.9), e(0.3), e(0.3), e(0.8), e(0.8)]) == "lost in the middle"
    assert _profile([e(0.9), e(0.9), e(0.6), e(0.5), e(0.2), e(0.2)]) == "recency"
    assert _profile([e(0.5)] * 6) == "flat"


def test_decay_fit_at_the_bound_or_non_monotone_is_no_length():
    # regression: a straight line (tau -> the optimiser's bound) was reported as "decays, fitted
    # length 1000000 tokens"; a curve that rises again got a length too
    d = [2, 8, 32, 64, 96, 126]
    line = _fit_decay(d, [1.0 - 0.001 * x for x in d])
    assert line.length is None and not line.decays
    assert "bound" in line.reason and line.tau == pytest.approx(line.tau_bounds[1], rel=1e-2)
    bumpy = _fit_decay(d, [3.0, 1.0, 2.5, 0.5, 0.4, 0.3])
    assert bumpy.length is None and "not monotone" in bumpy.reason
    rising = _fit_decay(d, [0.1, 0.2, 0.4, 0.8, 1.0, 1.2])
    assert rising.length is None
    # within the tolerance a small rise is noise: the exponential keeps its length
    y = [2.0 * torch.exp(torch.tensor(-x / 20.0)).item() for x in d]
    y[-1] = y[-2] + 0.01
    assert _fit_decay(d, y).length is None
    assert _fit_decay(d, y, tolerance=0.02).length == pytest.approx(20.0, rel=0.05)


def _resid_at(model, tokens, pos):
    """[layer, n, d] residuals at the lens hooks at position `pos` of each row, via TransformerLens."""
    _, cache = model.run_with_cache(tokens, names_filter=lens_hooks(model.cfg.n_layers))
    return torch.stack([cache[h][torch.arange(len(tokens)), pos] for h in lens_hooks(model.cfg.n_layers)])


def test_last_token_invariants(any_model):
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 50, (24, 7), generator=g)
    clean_logits = any_model(toks)[:, -1]
    answer = clean_logits.argmax(-1)
    res = last_token_sufficiency(any_model, Prompts.from_tokens(toks, answers=answer), baseline=random_like(any_model))
    L = any_model.cfg.n_layers
    # knockout above the final layer blocks nothing: KL exactly 0, accuracy = clean
    assert torch.equal(res.knockout[L].kl, torch.zeros(24, dtype=torch.float64))
    # transplanting the final residual reproduces the clean output; at layer 0 it is the neutral run
    torch.testing.assert_close(res.transplant[L].kl, torch.zeros(24, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.transplant[0].logprob, res.neutral.logprob, atol=1e-5, rtol=1e-5)
    # replacing no K/V (l = L) is the clean run; replacing all K/V from layer 0 matches a hand patch
    assert torch.equal(res.kv[L].correct, res.clean.correct)
    neutral = neutral_context(toks)
    _, ncache = any_model.run_with_cache(neutral)
    ivs = [Patch(Node(x, s), pos=tuple(range(6)), source=ncache[Node(x, s).hook_name])
           for x in range(L) for s in (Site.K, Site.V)]
    hand, _ = run_with_interventions(any_model, toks, ivs)
    want = Outcome.of(hand[:, -1], answer, clean_logits)
    torch.testing.assert_close(res.kv[0].logprob, want.logprob)
    assert res.clean.correct.mean() == 1.0  # the answer is the model's own argmax


def _resid_at(model, tokens, pos):
    """[layer, n, d] residuals at the lens hooks at position `pos` of each row, via TransformerLens."""
    _, cache = model.run_with_cache(tokens, names_filter=lens_hooks(model.cfg.n_layers))
    return torch.stack([cache[h][torch.arange(len(tokens)), pos] for h in lens_hooks(model.cfg.n_layers)])


def _decay_prompts(groups):
    """Prompts from (tokens [n, q + 1], answers, fact position) groups, one length each."""
    seqs = [row for t, _, _ in groups for row in t]
    answers = torch.cat([a for _, a, _ in groups])
    fact = torch.cat([torch.full((len(t),), f) for t, _, f in groups])
    return Prompts.from_tokens(seqs, answers=answers, spans={"fact": fact})


def test_decay_distance_probe_reads_each_prompts_own_last_token(gpt2_model):
    # regression: the distance probe read every set at the FIRST set's query position
    g = torch.Generator().manual_seed(0)
    groups, feats, labels = [], [], []
    for d, q in ((2, 11), (4, 9), (6, 7)):  # three lengths, three query positions
        toks = torch.randint(0, 50, (16, q + 1), generator=g)
        groups.append((toks, torch.randint(0, 50, (16,), generator=g), q - d))
        feats.append(_resid_at(gpt2_model, toks, q))
        labels.append(torch.full((16,), float(d)))
    r = positional_decay({"m": gpt2_model}, _decay_prompts(groups), baseline={"m": random_like(gpt2_model)},
                         positions_per_prompt=4)
    want = fit(torch.cat(feats, 1).float(), torch.cat(labels).double(), "ridge", seed=0)
    got = r.models["m"].distance_probe
    torch.testing.assert_close(got.value, want.value, atol=1e-6, rtol=0)


def test_decay_position_probe_never_samples_pads(gpt2_model):
    # regression: pad positions were sampled (and labelled with their index) for the position probe
    from interp.tokens import Batch

    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 50, (int(n),), generator=g) for n in torch.randint(5, 13, (24,), generator=g)]
    p = _decay_prompts([(torch.randint(0, 50, (8, 12), generator=g), torch.zeros(8, dtype=torch.long), 11 - d)
                        for d in (2, 4, 6)])
    base = {"m": random_like(gpt2_model)}
    # every real position of every prompt (k >= the longest prompt), each prompt run alone
    feats = torch.cat([_resid_at(gpt2_model, s[None].expand(len(s), -1), torch.arange(len(s))) for s in seqs], 1)
    pos = torch.cat([torch.arange(len(s)) for s in seqs]).double()
    groups = torch.cat([torch.full((len(s),), i) for i, s in enumerate(seqs)])
    want = fit(feats.float(), pos, "ridge", groups=groups, seed=0)
    for side, pad_id in (("right", 0), ("left", 7)):
        r = positional_decay({"m": gpt2_model}, p, position_prompts=Batch.pad(seqs, side=side, pad_id=pad_id),
                             baseline=base, positions_per_prompt=16)
        torch.testing.assert_close(r.models["m"].position_probe.value, want.value, atol=1e-4, rtol=0)


def test_decay_no_profile_or_length_without_behaviour(gpt2_model):
    g = torch.Generator().manual_seed(2)
    toks = [torch.randint(0, 50, (12, 10), generator=g) for _ in range(3)]
    logits = gpt2_model(torch.cat(toks))[:, -1]
    # answers the model never predicts: its clean accuracy is 0
    wrong = (logits.argmax(-1) + 1) % 50
    p = _decay_prompts([(t, wrong[i * 12:(i + 1) * 12], 9 - d) for i, (t, d) in enumerate(zip(toks, (1, 3, 5),
                                                                                          strict=True))])
    r = positional_decay({"m": gpt2_model}, p, baseline={"m": gpt2_model}, positions_per_prompt=4)
    m = r.models["m"]
    assert not m.clean_shows_behaviour and "does not clear" in m.behaviour_reason
    assert m.profile is None and m.decay_fit.length is None and not r.verdict.supported


def test_decay_refuses_fewer_than_three_distances(gpt2_model):
    p = _decay_prompts([(torch.randint(0, 50, (4, 8)), torch.zeros(4, dtype=torch.long), 7 - d) for d in (1, 2)])
    with pytest.raises(ValueError, match="at least 3 distances"):
        positional_decay({"m": gpt2_model}, p)


def test_last_token_no_layer_without_behaviour(gpt2_model):
    # regression: "sufficient from layer 0" was reported for a model whose clean accuracy is 0
    g = torch.Generator().manual_seed(4)
    toks = torch.randint(0, 50, (16, 7), generator=g)
    wrong = (gpt2_model(toks)[:, -1].argmax(-1) + 1) % 50
    r = last_token_sufficiency(gpt2_model, Prompts.from_tokens(toks, answers=wrong), baseline=gpt2_model)
    assert float(r.clean.correct.mean()) == 0.0
    assert r.sufficient_from is None and not r.clean_shows_behaviour
    assert "do not clear" in r.behaviour_reason and not r.verdict.supported


def test_last_token_measures_log_prob_when_top1_is_never_the_answer(gpt2_model):
    # a real model's top-1 is rarely exactly the answer: the measure is then the answer's log-prob
    g = torch.Generator().manual_seed(6)
    toks = torch.randint(0, 50, (24, 7), generator=g)
    second = gpt2_model(toks)[:, -1].topk(2).indices[:, 1]  # the answer is never the argmax
    r = last_token_sufficiency(gpt2_model, Prompts.from_tokens(toks, answers=second),
                               baseline=random_like(gpt2_model))
    assert float(r.clean.correct.mean()) == 0.0
    assert r.baseline_clean is not None
    lp, base_lp = r.clean.logprob.mean(), r.baseline_clean.logprob.mean()
    assert float(lp) > float(base_lp)  # the model gives its runner-up more mass than a random model
    assert r.clean_shows_behaviour and r.meta["measure"] == "logprob"
    assert "accuracy" not in (r.sufficiency_reason or r.verdict.sentence)
    assert "log p(answer)" in (r.sufficiency_reason or r.verdict.sentence)


def test_last_token_refuses_sufficiency_at_n_layers():
    # regression: "suffices from layer 2 on" on a 2-layer model is true of any 2-layer model (cutting
    # at l = n_layers blocks nothing). The induction organism's copy reads the context at layer 1
    # (its induction head), so it is never self-sufficient before the output.
    need("induction")
    from interp.hypotheses import run

    r = run.run_last_token("organism:induction", n=48)
    L = len(r.layers) - 1
    assert L == 2 and r.sufficient_from is None  # was 2 = n_layers
    assert float(r.knockout[L - 1].correct.mean()) < 0.5 < 0.9 < float(r.clean.correct.mean())
    assert r.clean_shows_behaviour and f"n_layers={L}" in r.sufficiency_reason
    assert r.verdict.supported and "not self-sufficient" in r.verdict.sentence, r.verdict


def test_routes_figure_encodes_sign():
    # regression: line width was |share| only, so a -64% route looked like the dominant one
    total = torch.ones(4, dtype=torch.float64)
    pos = RouteEffect("R@L0->3->R@L1 (k)", "via", "k", "kv", (0, 1), 3, torch.full((4,), 0.3, dtype=torch.float64))
    neg = RouteEffect("U^1 R@L1 (k)", "direct", "k", "residual", (1,), None, torch.full((4,), -0.64,
                                                                                         dtype=torch.float64))
    res = RoutesResult("m", 2, 5, 2, total, (pos, neg), torch.zeros(4), Verdict(True, "x"))
    traces = [t for t in res.plot().data if t.hovertext is not None]
    by = {t.hovertext.split(":")[0]: t for t in traces}
    p, n = by[pos.name], by[neg.name]
    assert p.line.dash == "solid" and n.line.dash == "dash"  # the sign is drawn
    assert p.line.color != n.line.color and "negative" in n.name and "negative" not in p.name
    assert n.line.width == pytest.approx(1 + 12 * 0.64) and p.line.width == pytest.approx(1 + 12 * 0.3)
    assert "share -0.64" in n.hovertext and "share +0.30" in p.hovertext
    assert n.text[-1] == "-64%" and p.text[-1] == "+30%"


def _route_prompts(clean, corrupt, ans, source):
    n = len(clean)
    src = torch.full((n,), source)
    q = Prompts.from_tokens(corrupt, answers=ans, spans={"source": src})
    return Prompts.from_tokens(clean, answers=ans, spans={"source": src}, partner=q)


def test_routes_without_clean_effect_reports_none(gpt2_model):
    g = torch.Generator().manual_seed(5)
    clean = torch.randint(0, 50, (2, 4), generator=g)  # small: every route is path-patched per example
    ans = torch.randint(0, 50, (2,), generator=g)
    # the corrupted run IS the clean run: there is no behaviour to decompose
    r = routes(gpt2_model, _route_prompts(clean, clean.clone(), ans, 1), baseline=random_like(gpt2_model))
    assert not r.clean_shows_behaviour and "does not show" in r.behaviour_reason and not r.verdict.supported


def test_routes_on_random_model_claims_nothing(gpt2_model):
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50, (8, 8), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = (clean[:, 2] + 1) % 50
    ans = torch.randint(0, 50, (8,), generator=g)
    res = routes(gpt2_model, _route_prompts(clean, corrupt, ans, 2))
    assert not res.verdict.supported
    L, via = gpt2_model.cfg.n_layers, 8 - 1 - 2 - 1  # positions strictly between source 2 and target 7
    # direct (k, v) per layer + via (k, v) per position and layer pair + joint (k, v) per layer
    assert len(res.routes) == 2 * L + 2 * via * (L * (L - 1) // 2) + 2 * L


# ------------------------------------------------------------------------------- organisms' ground truth

# The five demo investigations run once per session (conftest.demo_run, fast sizes); the tests
# below read their typed results rather than re-running them.

@pytest.fixture(scope="module")
def multihop_result(demo_run):
    return demo_run.results["multihop"]


def test_multihop_bridge_decodable_and_interchange_moves_answer(multihop_result):
    r = multihop_result
    assert r.verdict.supported, r.verdict
    bridge_at, answer_at = r.decodable_from[("last", "bridge")], r.decodable_from[("last", "answer")]
    assert bridge_at is not None and answer_at is not None
    # hop 1 before hop 2: the known mechanism, measured (not assumed by the code)
    assert bridge_at < answer_at
    # patching the last residual where the bridge (not yet the answer) sits moves the answer
    iia = r.iia_estimate("last", bridge_at)
    assert iia.low > 0.9
    assert float(r.baseline_iia["last"][bridge_at].correct.mean()) < 0.1
    # the probe at that layer is selective: above its Hewitt-Liang control and the random-init model
    p = r.probes[("last", "bridge")]
    b = r.baseline_probes[("last", "bridge")]
    i = p.layers.index(bridge_at)
    assert float(p.ci_low[i]) > float(b.ci_high[i])
    assert float(p.selectivity[i]) > 0


def test_multihop_on_random_model_claims_nothing():
    need("multihop")
    from interp.hypotheses import multihop
    from interp.hypotheses.inputs import twohop
    from interp.models import load_model

    model = random_like(load_model("organism:multihop"), seed=3)
    x = twohop("organism:multihop", model, 120, 0)
    r = multihop(model, x.prompts, x.bridge, control_types=x.control_types)
    assert not r.verdict.supported
    # no layer is reported for a behaviour the model lacks
    assert not r.clean_shows_behaviour and all(v is None for v in r.decodable_from.values())


def test_last_token_multihop_knockout_profile(demo_run):
    r = demo_run.results["last-token"]
    L = len(r.layers) - 1
    assert r.verdict.supported, r.verdict
    assert torch.equal(r.knockout[L].kl, torch.zeros_like(r.knockout[L].kl))  # nothing blocked: KL exactly 0
    assert float(r.knockout[0].correct.mean()) < 0.2  # cutting the context from layer 0 destroys the lookup
    assert r.clean_shows_behaviour
    assert r.sufficient_from is not None and 0 < r.sufficient_from < L  # a layer that blocks something
    # transplanting the clean last residual from the sufficiency layer on restores the answer
    assert float(r.transplant[r.sufficient_from].correct.mean()) > 0.9


def test_plan_ahead_future_tokens(demo_run):
    r = demo_run.results["plan-ahead"]
    assert r.verdict.supported, r.verdict
    assert r.clean_shows_behaviour and r.clean.low > 0.9 and r.baseline_clean.high < 0.2
    assert not r.lens.beats_bigram(2) == []


def test_induction_copy_travels_by_the_k_route(demo_run):
    r = demo_run.results["routes"]
    assert r.verdict.supported, r.verdict
    by = {x.name: x for x in r.routes}
    k, v = by["joint -> L1 (k)"], by["joint -> L1 (v)"]
    # the keys of layer 1 carry nearly all of the effect (K-composition; 96% on the full run)
    assert r.share(k) > 0.8 and k.estimate().low > 0
    assert abs(r.share(v)) < 0.1  # the values do not
    best = max((x for x in r.routes if x.kind != "joint"), key=lambda x: float(x.effect.mean()))
    assert best.receiver == "k" and best.via == r.source + 1  # previous-token step, then K-composition
    assert abs(float(r.baseline_total.mean())) < 0.2


def test_last_token_knockout_above_layer_0_destroys_retrieval():
    need("retrieval-learned")
    from interp.hypotheses import run

    r = run.run_last_token("organism:retrieval-learned", n=96)
    assert float(r.knockout[0].correct.mean()) < 0.1 < 0.9 < float(r.clean.correct.mean())
    assert torch.equal(r.knockout[-1].kl, torch.zeros_like(r.knockout[-1].kl))


def test_decay_schemes_differ_and_nope_learns_position(demo_run):
    r = demo_run.results["decay"]
    assert r.verdict.supported and "differ" in r.verdict.sentence, r.verdict
    nope, learned = r.models["retrieval-nope"], r.models["retrieval-learned"]
    # by construction the NoPE embedding carries no position (R^2 ~ 0 at layer 0); attention
    # builds it up with depth (Haviv et al. 2022)
    assert float(nope.position_probe.ci_high[0]) < 0.05
    assert float(nope.position_probe.ci_low[-1]) > 0.3
    assert float(learned.position_probe.ci_low[0]) > 0.05  # a learned table puts position in the embedding
    # and the shuffled-label baseline sits at 0
    assert abs(float(nope.position_probe.shuffled.max())) < 0.05
