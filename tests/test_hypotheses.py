"""Hypothesis investigations: invariants on tiny models, ground truth on the organisms, and no
verdict on random-initialised models."""

from __future__ import annotations

import pytest
import torch

from interp.hooks import Patch, run_with_interventions
from interp.hypotheses import last_token_sufficiency, routes
from interp.hypotheses.base import Outcome, random_like
from interp.hypotheses.last_token import neutral_context
from interp.hypotheses.positional_decay import _fit_decay, _profile
from interp.models import list_organisms
from interp.patching import logprob
from interp.stats import Estimate

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
    fit = _fit_decay(d, y)
    assert abs(fit["tau"] - 12.0) < 0.05 and abs(fit["a"] - 3.0) < 0.01 and abs(fit["c"] - 0.5) < 0.01
    e = lambda v: Estimate(v, v - 0.01, v + 0.01)  # noqa: E731
    assert _profile([e(0.9), e(0.9), e(0.3), e(0.3), e(0.8), e(0.8)]) == "lost in the middle"
    assert _profile([e(0.9), e(0.9), e(0.6), e(0.5), e(0.2), e(0.2)]) == "recency"
    assert _profile([e(0.5)] * 6) == "flat"


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


def test_last_token_multihop_knockout_profile(demo_run):
    r = demo_run.results["last-token"]
    L = len(r.layers) - 1
    assert r.verdict.supported, r.verdict
    assert torch.equal(r.knockout[L].kl, torch.zeros_like(r.knockout[L].kl))  # nothing blocked: KL exactly 0
    assert float(r.knockout[0].correct.mean()) < 0.2  # cutting the context from layer 0 destroys the lookup
    assert r.sufficient_from is not None and 0 < r.sufficient_from <= L
    # transplanting the clean last residual from the sufficiency layer on restores the answer
    assert float(r.transplant[r.sufficient_from].correct.mean()) > 0.9


def test_plan_ahead_future_tokens(demo_run):
    r = demo_run.results["plan-ahead"]
    assert r.verdict.supported, r.verdict
    assert not r.lens.beats_bigram(2) == []


def test_induction_copy_travels_by_the_k_route(demo_run):
    r = demo_run.results["routes"]
    assert r.verdict.supported, r.verdict
    by = {x.name: x for x in r.routes}
    k, v = by["joint -> L1 (k)"], by["joint -> L1 (v)"]
    assert r.share(k) > 0.8 and k.estimate().low > 0  # the keys of layer 1 carry the effect
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
