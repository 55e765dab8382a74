"""interp.decoding: cached generation vs per-prompt uncached recomputation (both families, padded
prompts, with and without interventions), the replicator view against scipy's ODE solver, and the
exact beta_l fit against a brute-force grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CITY_PROMPTS
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import solve_ivp
from scipy.optimize import minimize_scalar

from interp.arch import is_bridge
from interp.decoding import (
    euler_path,
    fit_beta,
    generate,
    multiplicative_weights,
    permutation_tv_test,
    replicator_field,
    replicator_path,
    restrict,
    sample_from,
    trajectory,
    tv_distance,
)
from interp.graph import Node
from interp.hooks import Add, HookError, Patch, Scale, block_attention, run
from interp.lens.logit import logit_lens
from interp.prompts import Prompts
from interp.tokens import Batch

TOL = 1e-5
STEPS = 6


def _city(tok, side: str) -> Prompts:
    return Prompts.from_text([p for p, _, _ in CITY_PROMPTS], tok, side=side)


def _alone(p: Prompts) -> list[torch.Tensor]:
    r = p.right()
    return [r.tokens[i, : int(r.lengths[i])].clone() for i in range(len(r))]


def _reference(model, seq, steps, edits_at, force=None):
    """Uncached: each prompt alone, the whole sequence recomputed at every step with `run`
    (edits_at(length_now) gives the interventions of that recomputation); greedy or forced."""
    toks, logits = [], []
    for s in range(steps):
        lg = run(model, seq[None], edits=edits_at(len(seq))).logits[0, -1]
        t = int(lg.argmax()) if force is None or s not in force else force[s]
        toks.append(t)
        logits.append(lg)
        seq = torch.cat([seq, torch.tensor([t])])
    return torch.tensor(toks), torch.stack(logits)


@pytest.fixture(params=["gpt2", "llama"])
def model(request, gpt2_model, llama_model):
    return gpt2_model if request.param == "gpt2" else llama_model


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["none", "new", "all"])
def test_cached_generation_equals_uncached_per_prompt(model, bpe_tokenizer, side, kind):
    p = _city(bpe_tokenizer, side)
    assert len(set(p.lengths.tolist())) > 1  # prompts of different lengths, really padded
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    node = Node(1, "resid_pre")
    ivs, edits_at = (), (lambda n: [])
    if kind == "new":  # every position from each prompt's last token on; earlier ones clean
        ivs = (Add(node, value=v),)
    elif kind == "all":  # fixed absolute positions (one inside every prompt, one generated for some)
        ivs = (Add(node, value=v, pos=(2, 12)), Scale(Node(0, "mlp_out"), factor=0.5))
    g = generate(model, p, STEPS, interventions=ivs, where="new" if kind != "all" else "all")
    # the cache is really used where the model takes one (HookedTransformer: TL 3); a Bridge recomputes
    assert g.cached == (not is_bridge(model))
    for i, seq in enumerate(_alone(p)):
        length = len(seq)
        if kind == "new":
            def edits_at(n, length=length):
                return [Add(node, value=v, pos=tuple(range(length - 1, n)))]
        elif kind == "all":
            def edits_at(n):
                return ([Add(node, value=v, pos=tuple(q for q in (2, 12) if q < n))]
                        + [Scale(Node(0, "mlp_out"), factor=0.5)])
        toks, logits = _reference(model, seq, STEPS, edits_at)
        assert torch.equal(g.tokens[i], toks), (i, g.tokens[i], toks)
        torch.testing.assert_close(g.logits[i], logits, atol=TOL, rtol=0)


def test_generation_with_per_example_knockout(model, bpe_tokenizer):
    """where='all' with a per-example BlockAttention: query = each prompt's 2nd generated position,
    sources = its first three tokens; equals the uncached recomputation with the same edit."""
    p = _city(bpe_tokenizer, "left")
    lengths = p.lengths
    q = lengths + 1
    mask = torch.zeros(len(p), 32, dtype=torch.bool)
    mask[:, 1:4] = True
    iv = block_attention(1, q, mask)
    g = generate(model, p, STEPS, interventions=[iv], where="all")
    for i, seq in enumerate(_alone(p)):
        def edits_at(n, i=i):
            return [block_attention(1, q[i:i + 1], mask[i:i + 1, :n])] if n > int(q[i]) else []
        toks, logits = _reference(model, seq, STEPS, edits_at)
        assert torch.equal(g.tokens[i], toks)
        torch.testing.assert_close(g.logits[i], logits, atol=TOL, rtol=0)
    plain = generate(model, p, STEPS)
    assert not torch.allclose(plain.logits[:, 2:], g.logits[:, 2:], atol=1e-3)  # the knockout did act
    torch.testing.assert_close(plain.logits[:, :2], g.logits[:, :2], atol=TOL, rtol=0)  # not before q


def test_forced_tokens_and_uncached_path(model, bpe_tokenizer):
    p = _city(bpe_tokenizer, "right")
    wrong = torch.arange(len(p)) + 10
    force = {1: wrong, 3: 7}
    g = generate(model, p, STEPS, force=force)
    g2 = generate(model, p, STEPS, force=force, cache=False)
    assert torch.equal(g.tokens, g2.tokens)
    torch.testing.assert_close(g.logits, g2.logits, atol=TOL, rtol=0)
    assert g.forced[:, [1, 3]].all() and not g.forced[:, [0, 2, 4, 5]].any()
    for i, seq in enumerate(_alone(p)):
        toks, logits = _reference(model, seq, STEPS, lambda n: [], force={1: int(wrong[i]), 3: 7})
        assert torch.equal(g.tokens[i], toks)
        torch.testing.assert_close(g.logits[i], logits, atol=TOL, rtol=0)
    frame = g.to_frame()
    assert len(frame) == len(p) * STEPS
    lp = torch.log_softmax(g.logits.double(), -1).gather(-1, g.tokens[..., None])[..., 0]
    np.testing.assert_allclose(frame["logprob"].to_numpy(), lp.reshape(-1).numpy(), atol=1e-9)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generation_on_a_bridge_equals_the_recomputation(bridge_model, family):
    """Regression: a TransformerBridge's forward takes no TransformerLens K/V cache (it reached the
    Hugging Face model as an unknown keyword and was ignored), so each cached step read its new
    token alone. A Bridge is recomputed at every step, and the result says so."""
    model = bridge_model(family)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(5, 40, (n,), generator=gen) for n in (5, 8)]
    g = generate(model, Batch.pad(seqs, "right"), 4)
    assert not g.cached
    for i, seq in enumerate(seqs):
        toks, logits = _reference(model, seq, 4, lambda n: [])
        assert torch.equal(g.tokens[i], toks)
        torch.testing.assert_close(g.logits[i], logits, atol=TOL, rtol=0)


def test_sampling_seeded_per_example(model, bpe_tokenizer):
    p = _city(bpe_tokenizer, "left")
    kw = dict(mode="sample", temperature=0.8, top_k=12, top_p=0.9, seed=5)
    g = generate(model, p, STEPS, **kw)
    g_uncached = generate(model, p, STEPS, cache=False, **kw)
    assert torch.equal(g.tokens, g_uncached.tokens)
    for i in range(len(p)):  # a prompt alone, on its batch row's random stream, samples the same tokens
        alone = generate(model, p.select([i]), STEPS, sample_rows=[i], **kw)
        assert torch.equal(alone.tokens[0], g.tokens[i])
        toks, _ = _reference_sampled(model, _alone(p)[i], STEPS, i, **kw)
        assert torch.equal(g.tokens[i], toks)
    # top_k = 1 sampling is greedy decoding
    greedy = generate(model, p, STEPS)
    assert torch.equal(generate(model, p, STEPS, mode="sample", top_k=1, seed=9).tokens, greedy.tokens)


def _reference_sampled(model, seq, steps, row, *, mode, temperature, top_k, top_p, seed):
    """Uncached sampling with torch.distributions' probabilities filtered by hand (numpy) in Hugging
    Face's order (temperature, top-k, then top-p on the renormalised top-k distribution), inverse
    CDF on the row's stream of uniforms (generator seeded with seed * 1_000_003 + row)."""
    u = torch.rand(steps, generator=torch.Generator().manual_seed(seed * 1_000_003 + row), dtype=torch.float64)
    toks = []
    for s in range(steps):
        lg = run(model, seq[None]).logits[0, -1].double()
        probs = torch.distributions.Categorical(logits=lg / temperature).probs.numpy()
        order = np.argsort(-probs, kind="stable")[:top_k]
        renorm = probs[order] / probs[order].sum()
        mass = np.cumsum(renorm) - renorm
        keep = order[mass < top_p]
        q = np.zeros_like(probs)
        q[keep] = probs[keep] / probs[keep].sum()
        t = int(np.searchsorted(np.cumsum(q), float(u[s]), side="right"))
        toks.append(t)
        seq = torch.cat([seq, torch.tensor([t])])
    return torch.tensor(toks), None


def test_restrict_against_hand_computation():
    z = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.4]])
    k2 = restrict(z, top_k=2)
    assert torch.isfinite(k2).tolist() == [[True, True, False, False, False]]
    probs = np.exp(z.numpy()[0] / 0.5) / np.exp(z.numpy()[0] / 0.5).sum()
    order = np.argsort(-probs)
    keep = order[: int(np.searchsorted(np.cumsum(probs[order]), 0.95) + 1)]
    got = torch.isfinite(restrict(z, temperature=0.5, top_p=0.95))[0].numpy()
    assert set(np.nonzero(got)[0].tolist()) == set(keep.tolist())
    torch.testing.assert_close(restrict(z, temperature=0.5), z / 0.5)


def test_inverse_cdf_sampling_frequencies():
    z = torch.tensor([0.3, -1.0, 2.0, 0.0, 1.1], dtype=torch.float64)
    n = 20000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # stratified: frequencies within 1/n
    toks = sample_from(z.expand(n, -1), u)
    freq = torch.bincount(toks, minlength=5).double() / n
    torch.testing.assert_close(freq, torch.distributions.Categorical(logits=z).probs, atol=2 / n, rtol=0)


def test_lens_capture_equals_logit_lens(model, bpe_tokenizer):
    p = _city(bpe_tokenizer, "left")
    g = generate(model, p, 3, lens=True, captures=[Node(0, "resid_post")])
    torch.testing.assert_close(g.lens_logits[:, :, -1], g.logits, atol=TOL, rtol=0)
    seqs = g.sequences()  # the lens at step s reads position L - 1 + s of the generated sequence
    for s in range(3):
        pos = (p.lengths - 1 + s)[:, None]
        ref = logit_lens(model, seqs, pos=pos, keep_logits=True, progress=False).logits[:, :, 0]
        torch.testing.assert_close(g.lens_logits[:, s].transpose(0, 1), ref, atol=TOL, rtol=0)
    acts = run(model, seqs, captures=[Node(0, "resid_post")]).acts["blocks.0.hook_resid_post"]
    ref = acts[torch.arange(len(p)), p.lengths - 1 + 2]
    torch.testing.assert_close(g.acts["blocks.0.hook_resid_post"][:, 2], ref, atol=TOL, rtol=0)


def test_generate_refuses_what_does_not_fit(gpt2_model):
    toks = torch.tensor([[1, 2, 3]])
    with pytest.raises(HookError, match="growing"):
        generate(gpt2_model, toks, 2, interventions=[Patch(Node(0, "resid_pre"), source=torch.zeros(1, 3, 32))])
    with pytest.raises(HookError, match="where='new'"):
        generate(gpt2_model, toks, 2, interventions=[Add(Node(0, "resid_pre"), value=1.0, pos=1)])
    with pytest.raises(ValueError, match="n_ctx"):
        generate(gpt2_model, toks, 40)
    with pytest.raises(ValueError, match="force"):
        generate(gpt2_model, toks, 2, force={5: 1})


# ------------------------------------------------------------------------------------ replicator

logit_vectors = st.lists(st.floats(-3, 3, allow_nan=False), min_size=2, max_size=8)
ODE_TOL = 1e-7  # solve_ivp DOP853 at rtol 1e-11, atol 1e-13 vs the closed form, max |dx|


@settings(max_examples=30, deadline=None)
@given(logit_vectors, st.floats(0.05, 4.0))
def test_replicator_closed_form_matches_ode(z, t_end):
    zt = torch.tensor(z, dtype=torch.float64)
    d = len(z)
    sol = solve_ivp(lambda t, x: replicator_field(torch.from_numpy(x), zt).numpy(), (0, t_end),
                    np.full(d, 1 / d), method="DOP853", rtol=1e-11, atol=1e-13, t_eval=[t_end / 2, t_end])
    closed = replicator_path(zt, [t_end / 2, t_end]).numpy()
    np.testing.assert_allclose(sol.y.T, closed, atol=ODE_TOL, rtol=0)


@settings(max_examples=30, deadline=None)
@given(logit_vectors, st.integers(1, 3), st.floats(0.1, 3.0))
def test_top_k_is_the_flow_on_a_face(z, k, temperature):
    """The top-k sampling distribution at temperature T is the replicator flow restricted to the
    top-k face, from that face's barycentre, at time 1/T (ODE on the face's coordinates)."""
    zt = torch.tensor(z, dtype=torch.float64)
    k = min(k, len(z))
    sampling = torch.softmax(restrict(zt, temperature=temperature, top_k=k), -1)
    on_face = restrict(zt, top_k=k)
    keep = torch.isfinite(on_face)
    sub = zt[keep]
    sol = solve_ivp(lambda t, x: replicator_field(torch.from_numpy(x), sub).numpy(), (0, 1 / temperature),
                    np.full(k, 1 / k), method="DOP853", rtol=1e-11, atol=1e-13)
    ode = np.zeros(len(z))
    ode[keep.numpy()] = sol.y[:, -1]
    np.testing.assert_allclose(sampling.numpy(), ode, atol=ODE_TOL, rtol=0)
    np.testing.assert_allclose(replicator_path(on_face, [1 / temperature])[0].numpy(), ode, atol=ODE_TOL, rtol=0)
    # the flow never leaves the face: off-face coordinates stay exactly 0
    assert float(replicator_field(replicator_path(on_face, [0.7])[0], on_face)[~keep].abs().sum()) == 0


@settings(max_examples=30, deadline=None)
@given(logit_vectors, st.floats(0.01, 0.5), st.integers(1, 40))
def test_multiplicative_weights_is_the_exact_discretisation(z, eta, n):
    zt = torch.tensor(z, dtype=torch.float64)
    torch.testing.assert_close(multiplicative_weights(zt, eta, n), torch.softmax(n * eta * zt, -1),
                               atol=1e-12, rtol=0)


def test_euler_converges_first_order():
    z = torch.tensor([1.5, -0.5, 0.2, 0.9], dtype=torch.float64)
    exact = replicator_path(z, [2.0])[0]
    errs = [float((euler_path(z, 2.0, n) - exact).abs().max()) for n in (50, 100, 200, 400)]
    ratios = [a / b for a, b in zip(errs, errs[1:], strict=False)]
    assert errs[-1] < 2e-3 and all(1.8 < r < 2.2 for r in ratios), (errs, ratios)


# ------------------------------------------------------------------------------------ trajectory

@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(3, 12))
def test_fit_beta_against_bounded_minimisation_and_grid(seed, d):
    g = torch.Generator().manual_seed(seed)
    p_logits = torch.randn(d, generator=g, dtype=torch.float64) * 2
    z = torch.randn(d, generator=g, dtype=torch.float64) * 2
    beta, kl = fit_beta(p_logits, z)
    logp = torch.log_softmax(p_logits, -1).numpy()

    def kl_of(b):
        logq = z.numpy() * b - np.logaddexp.reduce(z.numpy() * b)
        return float((np.exp(logp) * (logp - logq)).sum())

    grid = np.linspace(-20, 20, 40001)
    zg = grid[:, None] * z.numpy()[None]
    logq = zg - np.logaddexp.reduce(zg, axis=1, keepdims=True)
    vals = (np.exp(logp)[None] * (logp[None] - logq)).sum(1)
    assert float(kl) <= vals.min() + 1e-9
    ref = minimize_scalar(kl_of, bounds=(-100, 100), method="bounded", options=dict(xatol=1e-10))
    if abs(ref.x) < 19:
        assert abs(float(beta) - grid[vals.argmin()]) <= 1.5e-3
        assert abs(float(beta) - ref.x) < 1e-4
    assert abs(float(kl) - kl_of(float(beta))) < 1e-12


def test_fit_beta_recovers_a_tempered_distribution():
    z = torch.tensor([[0.5, 2.0, -1.0, 0.1], [1.0, 1.0, 3.0, -2.0]], dtype=torch.float64)
    beta0 = torch.tensor([0.3, -1.7], dtype=torch.float64)
    beta, kl = fit_beta(beta0[:, None] * z + 4.0, z)  # logits shifted: same distribution
    torch.testing.assert_close(beta, beta0, atol=1e-9, rtol=0)
    assert float(kl.max()) < 1e-12


@pytest.mark.parametrize("side", ["right", "left"])
def test_trajectory_padded_equals_each_prompt_alone(model, bpe_tokenizer, side):
    p = _city(bpe_tokenizer, side)
    res = trajectory(model, p, baseline=False, n_boot=50)
    assert torch.allclose(res.beta[-1], torch.ones(len(p))) and float(res.kl_left[-1].abs().max()) < 1e-6
    for i, seq in enumerate(_alone(p)):
        one = trajectory(model, seq[None], baseline=False, n_boot=50)
        torch.testing.assert_close(res.beta[:, i], one.beta[:, 0], atol=TOL, rtol=0)
        torch.testing.assert_close(res.kl_left[:, i], one.kl_left[:, 0], atol=TOL, rtol=0)
    lz = logit_lens(model, p, keep_logits=True, progress=False).logits[:, :, 0].double()
    ref = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=lz),
                                            torch.distributions.Categorical(logits=lz[-1:].expand_as(lz)))
    torch.testing.assert_close(res.kl_final.double(), ref, atol=TOL, rtol=0)  # KL(p_l || p_final)
    frame = res.to_frame()
    row = frame[(frame.quantity == "kl_final") & (frame.layer == 0)].iloc[0]
    assert row.n == len(p) and abs(row.value - float(ref[0].mean())) < TOL and row.ci_low <= row.value <= row.ci_high


# ------------------------------------------------------------------------------- forking tokens

def test_permutation_tv_test_against_scipy():
    from scipy.stats import permutation_test

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 3, (40,), generator=g)
    b = torch.cat([torch.randint(0, 3, (20,), generator=g), torch.full((20,), 2)])

    def stat(x, y):
        k = 4
        return 0.5 * np.abs(np.bincount(x, minlength=k) / len(x) - np.bincount(y, minlength=k) / len(y)).sum()

    ref = permutation_test((a.numpy(), b.numpy()), stat, n_resamples=4000, alternative="greater",
                           permutation_type="independent", random_state=1)
    tv, p = permutation_tv_test(a, b, n_perm=4000, seed=2)
    assert abs(tv - ref.statistic) < 1e-12 and abs(tv - tv_distance(a, b)) < 1e-12
    assert abs(p - ref.pvalue) < 0.03  # two Monte Carlo estimates of one p-value (4000 draws each)


def test_forking_token_is_the_forced_surprise_on_the_planning_organism():
    """The planning organism's word is fixed at `say`: resampling after each prefix of its own word
    never changes the outcome (its last syllable), but a wrong first syllable does (course
    correction fails: it drifts), so that position is a forking token and no other is needed."""
    from interp.decoding import forking_tokens
    from interp.hypotheses.course_correction import planning_inputs
    from interp.models import load_model

    model = load_model("organism:planning")
    x = planning_inputs(8, 0)
    r = x.prompts.right()
    i = 1
    prompt = r.tokens[i, : int(r.lengths[i])]
    word = x.plan[i]

    def last_syllable(gen):
        return gen[:, 3]

    clean = forking_tokens(model, prompt, word, n=24, outcome=last_syllable, n_perm=500, n_boot=200)
    assert clean.forking == [] and float(clean.tv.max()) <= 0.2
    surprise = torch.tensor([int(c) for c in x.candidates if int(c) != int(word[0])][0])
    wrong = torch.cat([surprise[None], word[1:]])
    res = forking_tokens(model, prompt, wrong, n=24, outcome=last_syllable, n_perm=500, n_boot=200)
    assert 1 in res.forking and res.tv[0] > 0.5
    frame = res.to_frame()
    assert frame.loc[0, "ci_low"] <= frame.loc[0, "value"] <= frame.loc[0, "ci_high"]
