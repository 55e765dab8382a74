"""Hypothesis investigations: invariants on tiny models, ground truth on the organisms, and no
verdict on random-initialised models."""

from __future__ import annotations

import pytest
import torch

from interp.hooks import Patch, run_with_interventions
from interp.hypotheses import DistanceSet, last_token_sufficiency, positional_decay, routes
from interp.hypotheses.base import Outcome, Verdict, random_like
from interp.hypotheses.last_token import neutral_context
from interp.hypotheses.positional_decay import _fit_decay, _profile
from interp.hypotheses.routes import RouteEffect, RoutesResult
from interp.lens.residual import lens_hooks
from interp.models import list_organisms
from interp.patching import logprob
from interp.probing import fit
from interp.stats import Estimate
from interp.tokens import Batch

HAVE = set(list_organisms())


def need(*names: str) -> None:
    missing = [n for n in names if n not in HAVE]
    if missing:
        pytest.fail(f"shipped organisms missing: {missing} (train with `interp organisms train NAME`)")


# ---------------------------------------------------------------------------- invariants, tiny models

def test_last_token_invariants(any_model):
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 50, (24, 7), generator=g)
    clean_logits = any_model(toks)[:, -1]
    answer = clean_logits.argmax(-1)
    res = last_token_sufficiency(any_model, toks, answer, baseline=random_like(any_model))
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
    from interp.graph import Node, Site

    ivs = [Patch(Node(x, s), pos=tuple(range(6)), source=ncache[Node(x, s).hook_name])
           for x in range(L) for s in (Site.K, Site.V)]
    hand, _ = run_with_interventions(any_model, toks, ivs)
    want = Outcome.of(hand[:, -1], answer, clean_logits)
    torch.testing.assert_close(res.kv[0].logprob, want.logprob)
    assert res.clean.correct.mean() == 1.0  # the answer is the model's own argmax


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


def test_decay_distance_probe_reads_each_sets_own_query(gpt2_model):
    # regression: the distance probe read every set at the FIRST set's query position
    g = torch.Generator().manual_seed(0)
    sets, feats, labels = {}, [], []
    for d, q in ((2, 11), (4, 9), (6, 7)):  # one length, three query positions
        toks = torch.randint(0, 50, (16, 12), generator=g)
        sets[d] = DistanceSet(toks, torch.randint(0, 50, (16,), generator=g), (q - d,), query_pos=q)
        feats.append(_resid_at(gpt2_model, toks, q))
        labels.append(torch.full((16,), float(d)))
    r = positional_decay({"m": gpt2_model}, sets, baseline={"m": random_like(gpt2_model)}, positions_per_prompt=4)
    want = fit(torch.cat(feats, 1).float(), torch.cat(labels).double(), "ridge", seed=0)
    got = r.models["m"].distance_probe
    torch.testing.assert_close(got.value, want.value, atol=1e-6, rtol=0)


def test_decay_position_probe_never_samples_pads(gpt2_model):
    # regression: pad positions were sampled (and labelled with their index) for the position probe
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 50, (int(n),), generator=g) for n in torch.randint(5, 13, (24,), generator=g)]
    sets = {d: DistanceSet(torch.randint(0, 50, (8, 12), generator=g), torch.zeros(8, dtype=torch.long), (11 - d,),
                           query_pos=11) for d in (2, 4, 6)}
    base = {"m": random_like(gpt2_model)}
    # every real position of every prompt (k >= the longest prompt), each prompt run alone
    feats = torch.cat([_resid_at(gpt2_model, s[None].expand(len(s), -1), torch.arange(len(s))) for s in seqs], 1)
    pos = torch.cat([torch.arange(len(s)) for s in seqs]).double()
    groups = torch.cat([torch.full((len(s),), i) for i, s in enumerate(seqs)])
    want = fit(feats.float(), pos, "ridge", groups=groups, seed=0)
    for side, pad_id in (("right", 0), ("left", 7)):
        r = positional_decay({"m": gpt2_model}, sets, position_tokens=Batch.pad(seqs, side=side, pad_id=pad_id),
                             baseline=base, positions_per_prompt=16)
        torch.testing.assert_close(r.models["m"].position_probe.value, want.value, atol=1e-4, rtol=0)


def test_decay_no_profile_or_length_without_behaviour(gpt2_model):
    g = torch.Generator().manual_seed(2)
    sets = {d: DistanceSet(torch.randint(0, 50, (12, 10), generator=g), torch.randint(0, 50, (12,), generator=g),
                           (9 - d,), query_pos=9) for d in (1, 3, 5)}
    logits = gpt2_model(torch.cat([s.tokens for s in sets.values()]))[:, -1]
    # answers the model never predicts: its clean accuracy is 0
    wrong = (logits.argmax(-1) + 1) % 50
    sets = {d: DistanceSet(s.tokens, wrong[i * 12:(i + 1) * 12], s.fact_pos, s.query_pos)
            for i, (d, s) in enumerate(sets.items())}
    r = positional_decay({"m": gpt2_model}, sets, baseline={"m": random_like(gpt2_model)}, positions_per_prompt=4)
    m = r.models["m"]
    assert not m.clean_shows_behaviour and "does not clear" in m.behaviour_reason
    assert m.profile is None and m.decay_fit.length is None and not r.verdict.supported


def _alone_knockout(model, prompt, from_layer):
    """Log-softmax at the last position of `prompt` run alone, with its attention to every earlier
    position blocked at layers >= from_layer (hand-written TransformerLens hooks)."""
    T = prompt.shape[0] - 1

    def block(scores, hook):
        scores = scores.clone()
        scores[:, :, T, :T] = float("-inf")
        return scores

    hooks = [(f"blocks.{x}.attn.hook_attn_scores", block) for x in range(from_layer, model.cfg.n_layers)] if T else []
    return model.run_with_hooks(prompt[None], fwd_hooks=hooks)[0, -1].log_softmax(-1)


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_padded_batch_matches_each_prompt_alone(any_model, side):
    # regression: a padded batch was read at position -1 (pads under right padding)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(1, 50, (n,), generator=g) for n in (5, 8, 5, 8, 6, 6, 8, 5)]
    # neutral: another prompt's context of the same length, last token kept
    neutral = []
    for i, s in enumerate(seqs):
        j = next(j for j in range(i + 1, i + len(seqs)) if len(seqs[j % len(seqs)]) == len(s)) % len(seqs)
        neutral.append(torch.cat([seqs[j][:-1], s[-1:]]))
    answer = torch.stack([any_model(s[None])[0, -1].argmax() for s in seqs])
    r = last_token_sufficiency(any_model, Batch.pad(seqs, side=side, pad_id=3), answer,
                               neutral=Batch.pad(neutral, side=side, pad_id=3), baseline=random_like(any_model))
    L = any_model.cfg.n_layers
    clean = torch.stack([_alone_knockout(any_model, s, L)[a] for s, a in zip(seqs, answer, strict=True)]).double()
    torch.testing.assert_close(r.clean.logprob, clean, atol=1e-5, rtol=0)
    neut = torch.stack([any_model(s[None])[0, -1].log_softmax(-1)[a] for s, a in zip(neutral, answer, strict=True)])
    torch.testing.assert_close(r.neutral.logprob, neut.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(r.transplant[0].logprob, neut.double(), atol=1e-5, rtol=0)
    for layer in range(L):
        want = torch.stack([_alone_knockout(any_model, s, layer)[a] for s, a in zip(seqs, answer, strict=True)])
        torch.testing.assert_close(r.knockout[layer].logprob, want.double(), atol=1e-5, rtol=0)
    assert r.clean.correct.mean() == 1.0


def test_fixed_position_investigations_refuse_padded_batches(gpt2_model):
    # they read fixed positions: a padded batch is refused with a clear error, never read at pads
    padded = Batch.pad([torch.arange(1, 6), torch.arange(1, 9)])
    with pytest.raises(ValueError, match="padded Batch with lengths 5..8"):
        DistanceSet(padded, torch.zeros(2, dtype=torch.long), (1,))
    with pytest.raises(ValueError, match="padded Batch"):
        routes(gpt2_model, padded, padded, lambda row, i: logprob(0), source=1)
    unpadded = Batch.of(torch.arange(1, 9).repeat(2, 1))  # a Batch without padding is fine
    assert DistanceSet(unpadded, torch.zeros(2, dtype=torch.long), (1,)).tokens.shape == (2, 8)


def test_last_token_no_layer_without_behaviour(gpt2_model):
    # regression: "sufficient from layer 0" was reported for a model whose clean accuracy is 0
    g = torch.Generator().manual_seed(4)
    toks = torch.randint(0, 50, (16, 7), generator=g)
    wrong = (gpt2_model(toks)[:, -1].argmax(-1) + 1) % 50
    r = last_token_sufficiency(gpt2_model, toks, wrong, baseline=random_like(gpt2_model))
    assert float(r.clean.correct.mean()) == 0.0
    assert r.sufficient_from is None and not r.clean_shows_behaviour
    assert "does not clear" in r.behaviour_reason and not r.verdict.supported


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


def test_routes_without_clean_effect_reports_none(gpt2_model):
    g = torch.Generator().manual_seed(5)
    clean = torch.randint(0, 50, (2, 4), generator=g)  # small: every route is path-patched per example
    ans = torch.randint(0, 50, (2,), generator=g)
    # the corrupted run IS the clean run: there is no behaviour to decompose
    r = routes(gpt2_model, clean, clean.clone(), lambda row, i: logprob(int(ans[i])), source=1,
               baseline=random_like(gpt2_model))
    assert not r.clean_shows_behaviour and "does not show" in r.behaviour_reason and not r.verdict.supported


def test_routes_on_random_model_claims_nothing(gpt2_model):
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50, (8, 8), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = (clean[:, 2] + 1) % 50
    ans = torch.randint(0, 50, (8,), generator=g)
    res = routes(gpt2_model, clean, corrupt, lambda row, i: logprob(int(ans[i])), source=2)
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
    r = multihop(model, x.tokens, x.bridge, x.answer, partner_tokens=x.partner_tokens,
                 partner_answer=x.partner_answer, positions=x.positions, control_types=x.control_types)
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
    # the keys of layer 1 carry most of the effect (the from-scratch organism sends the rest through
    # its queries: a duplicate-token head, in its declared circuit)
    assert r.share(k) > 0.5 and k.estimate().low > 0
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
