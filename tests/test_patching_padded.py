"""Padded prompts of different lengths: every patching function's per-example values equal running
each prompt alone (unpadded), on both fixture families, with left and right padding."""

from __future__ import annotations

import pytest
import torch
from conftest import CITY_PROMPTS

from interp.graph import Node
from interp.metrics import answer_logprob, from_scalar, logit_diff
from interp.patching import At, attribute, knockout, kv_patch, patch, path_patch, sweep
from interp.prompts import Prompts
from interp.stats import bootstrap

TOL = 1e-5


def _city(tok, side: str = "right") -> Prompts:
    """The city prompts (multi-token subjects and answers) with a partner of the same lengths: the
    subject's tokens replaced (symmetric token replacement), another answer."""
    texts = [p for p, _, _ in CITY_PROMPTS]
    clean = Prompts.from_text(texts, tok, spans={"subject": [s for _, s, _ in CITY_PROMPTS]},
                              answers=[a for _, _, a in CITY_PROMPTS])
    r = clean.right()
    seqs, answers = [], []
    for i in range(len(clean)):
        t = r.tokens[i, : int(r.prompt_lengths[i])].clone()
        s0, s1 = r.span("subject")[i].tolist()
        t[s0:s1] = (t[s0:s1] - 2 + 7) % 48 + 2  # ids 0 and 1 are <s> and <unk>
        a = r.answers[i, : int(r.answer_lengths[i])]
        seqs.append(t)
        answers.append(((a - 2 + 5) % 48 + 2).tolist())
    bad = Prompts.from_tokens(seqs, spans={"subject": r.span("subject")}, answers=answers)
    assert torch.equal(bad.lengths, clean.lengths)
    return clean.with_partner(bad.to_side(side)).to_side(side)


@pytest.fixture(params=["right", "left"])
def city(request, bpe_tokenizer) -> Prompts:
    p = _city(bpe_tokenizer, request.param)
    assert len(set(p.lengths.tolist())) >= 4  # prompts of different lengths
    return p


def _tl_metric(logits):  # a TransformerLens-style metric: the last position of the logits it gets
    return logits[:, -1].log_softmax(-1)[:, 3].mean() - logits[:, -2, 5].mean()


METRICS = {"answer_logprob": answer_logprob(), "logit_diff": logit_diff(), "tl_scalar": _tl_metric}


def _alone(prompts: Prompts, i: int) -> Prompts:
    one = prompts.select([i])
    assert one.tokens.shape[1] == int(prompts.lengths[i])  # unpadded
    return one


def _check_cells(padded, alone, i: int, length: int, pos_axis: int = 1) -> None:
    """padded [..., pos, ..., n] vs one prompt's [..., pos<length, ..., 1]; cells past the
    prompt's end are NaN in the padded result."""
    mine = padded.per_example[..., i]
    ref = alone.per_example[..., 0]
    inside = mine.narrow(pos_axis, 0, length)
    torch.testing.assert_close(inside, ref, atol=TOL, rtol=0)
    outside = mine.narrow(pos_axis, length, mine.shape[pos_axis] - length)
    assert bool(torch.isnan(outside).all())


@pytest.mark.parametrize("site", ["resid_pre", "head", "k", "v", "mlp_out"])
def test_sweep_padded_equals_each_prompt_alone(any_model, city, site):
    metric = METRICS["answer_logprob"] if site != "v" else METRICS["logit_diff"]
    r = sweep(any_model, city, metric, site=site)
    assert r.per_example.shape[-1] == len(city)
    for i in range(len(city)):
        alone = sweep(any_model, _alone(city, i), metric, site=site)
        _check_cells(r, alone, i, int(city.lengths[i]))
        torch.testing.assert_close(r.clean_values[i], alone.clean_values[0], atol=TOL, rtol=0)
        torch.testing.assert_close(r.corrupt_values[i], alone.corrupt_values[0], atol=TOL, rtol=0)
    # `.values` is the mean over the examples that have the cell
    torch.testing.assert_close(r.values[:, 0], r.per_example[:, 0].mean(-1))
    assert bool((r.n[0, -1] == 1).all()) and bool((r.n[0, 0] == len(city)).all())


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_every_metric_kind_is_per_example_under_padding(any_model, city, metric):
    m = METRICS[metric]
    r = sweep(any_model, city, m, site="resid_pre", layers=[1], positions=[0, 5, "subject", "last"])
    assert r.coords[1] == (0, 5, "subject", "last")
    for i in range(len(city)):
        alone = sweep(any_model, _alone(city, i), m, site="resid_pre", layers=[1],
                      positions=[0, 5, "subject", "last"])
        torch.testing.assert_close(r.per_example[..., i], alone.per_example[..., 0], atol=TOL, rtol=0)


def test_a_named_span_is_patched_whole(gpt2_model, city):
    r = sweep(gpt2_model, city, answer_logprob(), site="head", layers=[1], positions=["subject"])
    for i in range(len(city)):
        s0, s1 = city.span("subject")[i].tolist()
        one = _alone(city, i)
        for h in range(gpt2_model.cfg.n_heads):
            nodes = [Node(1, "head", pos=p, head=h) for p in range(s0, s1)]
            ref = patch(gpt2_model, one, answer_logprob(), nodes)
            torch.testing.assert_close(r.per_example[0, 0, h, i], ref.per_example[0, 0], atol=TOL, rtol=0)
    assert (r.effect.abs() > 1e-3).any()


def test_patch_and_kv_patch_padded_equal_each_prompt_alone(any_model, city):
    nodes = [At(1, "resid_pre", "subject"), Node(2, "head", pos=3, head=1)]
    r = patch(any_model, city, logit_diff(), nodes)
    kv = kv_patch(any_model, city, answer_logprob(), layers=[0, 2])
    kv_all = kv_patch(any_model, city, answer_logprob(), which="v", positions=["subject", 2], per_group=False)
    for i in range(len(city)):
        one = _alone(city, i)
        torch.testing.assert_close(r.per_example[0, i], patch(any_model, one, logit_diff(), nodes).per_example[0, 0],
                                   atol=TOL, rtol=0)
        _check_cells(kv, kv_patch(any_model, one, answer_logprob(), layers=[0, 2]), i, int(city.lengths[i]))
        ref = kv_patch(any_model, one, answer_logprob(), which="v", positions=["subject", 2], per_group=False)
        torch.testing.assert_close(kv_all.per_example[..., i], ref.per_example[..., 0], atol=TOL, rtol=0)


def test_old_positional_order_and_explicit_corrupt_agree(gpt2_model, city):
    clean = city.with_partner(None)
    a = sweep(gpt2_model, city, answer_logprob(), site="k", layers=[1])
    b = sweep(gpt2_model, clean, answer_logprob(), site="k", layers=[1], corrupt=city.partner)
    c = sweep(gpt2_model, clean, city.partner, answer_logprob(), "k", layers=[1])
    torch.testing.assert_close(b.per_example, a.per_example, equal_nan=True)
    torch.testing.assert_close(c.per_example, a.per_example, equal_nan=True)


@pytest.mark.parametrize("stream", ["kv", "residual", "logits"])
def test_path_patch_padded_equals_each_prompt_alone(any_model, city, stream):
    n_kv = any_model.cfg.n_key_value_heads or any_model.cfg.n_heads
    if stream == "kv":  # up at the subject, then right to the last position (routes' K/V-first class)
        senders = [At(0, "resid_pre", "subject"), [At(0, "head", "subject", head=1), At(0, "head", -3, head=2)]]
        receivers = [At(1, "k", "subject", head=g) for g in range(n_kv)] + [At(1, "v", "subject", head=0)]
        kw = dict(stream="kv", reader="last")
    elif stream == "residual":
        senders = [At(0, "head", "last", head=h) for h in range(2)]
        receivers = [At(2, "v", "last", head=g) for g in range(n_kv)]
        kw = dict(stream="residual")
    else:
        senders = [At(1, "head", "last", head=0), At(2, "mlp_out", "answer")]
        receivers, kw = "logits", {}
    r = path_patch(any_model, city, answer_logprob(), senders, receivers, **kw)
    assert (r.per_example - r.corrupt_values).abs().max() > 1e-4  # the paths carry some effect
    for i in range(len(city)):
        alone = path_patch(any_model, _alone(city, i), answer_logprob(), senders, receivers, **kw)
        torch.testing.assert_close(r.per_example[..., i], alone.per_example[..., 0], atol=TOL, rtol=0)


def test_knockout_padded_equals_each_prompt_alone(any_model, city):
    for kw in (dict(at="last"), dict(at="last", sources="subject"), dict(at=-2, sources=[0, "subject"], heads=[1, 3])):
        r = knockout(any_model, city, answer_logprob(), **kw)
        assert r.kl_per_example[0].min() > 1e-6
        for i in range(len(city)):
            alone = knockout(any_model, _alone(city, i), answer_logprob(), **kw)
            torch.testing.assert_close(r.per_example[:, i], alone.per_example[:, 0], atol=TOL, rtol=0)
            torch.testing.assert_close(r.kl_per_example[:, i], alone.kl_per_example[:, 0], atol=TOL, rtol=1e-4)


def test_knockout_per_example_at_tensor_equals_the_named_position(gpt2_model, city):
    by_name = knockout(gpt2_model, city, answer_logprob(), at="last", sources="subject")
    by_tensor = knockout(gpt2_model, city, answer_logprob(), at=city.index("last"), sources=city.span_mask("subject"))
    torch.testing.assert_close(by_tensor.per_example, by_name.per_example)


@pytest.mark.parametrize("site", ["resid_pre", "head"])
def test_attribute_padded_equals_each_prompt_alone(any_model, city, site):
    r = attribute(any_model, city, answer_logprob(), site=site)
    for i in range(len(city)):
        _check_cells(r, attribute(any_model, _alone(city, i), answer_logprob(), site=site), i, int(city.lengths[i]))


# ------------------------------------------------------------------------------ CIs and frames

def test_cis_are_the_bootstrap_of_the_kept_values(gpt2_model, city):
    r = sweep(gpt2_model, city, answer_logprob(), site="resid_pre", layers=[1, 2], alpha=0.1, n_boot=500)
    low, high = r.ci()
    frame = r.to_frame()
    assert list(frame.columns[:6]) == ["layer", "pos", "value", "ci_low", "ci_high", "n"]
    checked = 0
    for li in range(2):
        for p in range(r.per_example.shape[1]):
            kept = r.per_example[li, p][~torch.isnan(r.per_example[li, p])]
            row = frame[(frame.layer == r.coords[0][li]) & (frame.pos == p)].iloc[0]
            assert row["n"] == kept.numel() == int(r.n[li, p])
            if kept.numel() < 2:
                assert torch.isnan(low[li, p]) and torch.isnan(high[li, p])
                continue
            est = bootstrap(kept, n_boot=500, alpha=0.1)
            torch.testing.assert_close(low[li, p].item(), est.low, atol=1e-12, rtol=0)
            torch.testing.assert_close(high[li, p].item(), est.high, atol=1e-12, rtol=0)
            torch.testing.assert_close(row["value"], est.value, atol=1e-12, rtol=0)
            torch.testing.assert_close(row["ci_low"], est.low, atol=1e-12, rtol=0)
            checked += 1
    assert checked > 10 and int(r.n.min()) == 1  # cells with all examples and cells with fewer


def test_knockout_frame_has_cis(gpt2_model, city):
    r = knockout(gpt2_model, city, answer_logprob(), at="last", sources="subject")
    frame = r.to_frame()
    est = bootstrap(r.per_example[0])
    assert frame["ci_low"].iloc[0] == pytest.approx(est.low) and frame["ci_high"].iloc[0] == pytest.approx(est.high)
    assert frame["n"].tolist() == [len(city)] * len(r.start_layers)


# ------------------------------------------------------------------------------ regressions, bad input

def test_scalar_metric_reads_each_prompts_own_positions(gpt2_model, city):
    """Regression: `from_scalar` applied the TL-style metric to each example's padded row, so
    `logits[:, -1]` read a pad position for every prompt shorter than the longest."""
    m = from_scalar(_tl_metric)
    r = city.right()
    with torch.inference_mode():
        logits = gpt2_model(r.tokens)
        got = m(logits, r)
        want = torch.stack([_tl_metric(gpt2_model(_alone(r, i).tokens)) for i in range(len(r))])
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_lengths_must_match_per_row(gpt2_model, bpe_tokenizer):
    city = _city(bpe_tokenizer)
    swapped = city.partner.select([2, 1, 0, 3, 4])
    with pytest.raises(ValueError, match=r"corrupted prompt 0: expected its clean prompt's length 15, got 11"):
        sweep(gpt2_model, city, answer_logprob(), corrupt=swapped)
    with pytest.raises(ValueError, match=r"expected prompts with a partner .* or corrupt=\.\.\., got neither"):
        sweep(gpt2_model, city.with_partner(None), answer_logprob())


def test_patched_logits_left_padding_is_the_right_padded_result_realigned(any_model, bpe_tokenizer):
    from interp.patching import patched_logits

    right = _city(bpe_tokenizer, "right")
    left = _city(bpe_tokenizer, "left")
    nodes = [At(1, "resid_pre", "subject"), Node(2, "v", pos=1, head=0)]
    out_r = patched_logits(any_model, right, nodes)
    out_l = patched_logits(any_model, left, nodes)
    for i in range(len(right)):
        n = int(right.lengths[i])
        torch.testing.assert_close(out_l[i, -n:], out_r[i, :n], atol=TOL, rtol=0)
        with torch.inference_mode():  # the patch acts: not the corrupted run's logits
            base = any_model(_alone(right, i).partner.tokens)[0]
        assert (out_r[i, :n] - base).abs().max() > 1e-4


def test_a_non_finite_patched_cell_is_named(gpt2_model, city):
    """A per-example metric that is NaN in one patched copy only raises, naming the cell."""
    plain = sweep(gpt2_model, city, answer_logprob(), layers=[2], positions=[0, "subject"])
    target = float(plain.per_example[0, 1, 0])
    assert abs(target - float(plain.corrupt_values[0])) > 1e-3 and abs(target - float(plain.clean_values[0])) > 1e-6

    def metric(logits, prompts):
        v = answer_logprob()(logits, prompts)
        return torch.where((v - target).abs() < 1e-6, torch.full_like(v, float("nan")), v)

    with pytest.raises(ValueError, match=r"NaN/Inf for 1 of 2 \(first: Node\(L2 resid_pre @subject\)\)"):
        sweep(gpt2_model, city, metric, layers=[2], positions=[0, "subject"])


def test_path_patch_many_equals_one_call_per_request(any_model, city):
    """Many requests (different streams, receiver layers and the logits) in one call: each row
    equals its own path_patch call, on padded prompts."""
    from interp.patching import Path, path_patch_many

    n_kv = any_model.cfg.n_key_value_heads or any_model.cfg.n_heads
    specs = [
        Path(At(0, "resid_pre", "subject"), [At(0, "k", "subject", head=g) for g in range(n_kv)], "kv", "last"),
        Path([At(0, "attn_out", "subject")], [At(1, "v", "subject", head=g) for g in range(n_kv)], "kv", "last"),
        Path([At(0, "head", "subject", head=1), [At(0, "head", 2, head=0), At(1, "mlp_out", "subject")]],
             [At(2, "k", "subject", head=0), At(2, "v", 1)], "residual"),
        Path([At(1, "head", "last", head=2)], [At(2, "q", "last", head=h) for h in range(2)]),
        Path([At(1, "resid_post", "subject")], [At(2, "k", "subject", head=1)], "any", ["last", -2]),
        Path([At(2, "mlp_out", "last")], "logits", label="direct"),
    ]
    many = path_patch_many(any_model, city, logit_diff(), specs, rows=24)  # several chunks
    rows = []
    for spec in specs:
        one = path_patch(any_model, city, logit_diff(), spec.senders, spec.receivers, stream=spec.stream,
                         reader=spec.reader)
        rows.append(one.per_example)
    torch.testing.assert_close(many.per_example, torch.cat(rows), atol=1e-6, rtol=0)
    assert len(many.coords[0]) == many.per_example.shape[0] == 7
    assert many.coords[0][-1] == "direct: Node(L2 mlp_out @last)"
    effects = (many.per_example - many.corrupt_values).abs().amax(-1)
    assert int((effects > 1e-4).sum()) >= 5  # the requests carry effects


def test_scalar_metric_returning_none_is_a_clear_type_error(gpt2_model, city):
    """Regression: a TL-style metric returning None reached torch.as_tensor (a RuntimeError about
    dtype inference) instead of saying what was expected."""
    with pytest.raises(TypeError, match=r"scalar metric: expected a scalar tensor or number, got NoneType"):
        sweep(gpt2_model, city, lambda logits: None, layers=[0])


def test_a_padded_batch_is_accepted_and_means_match_the_per_example_values(gpt2_model, city):
    from interp.tokens import Batch

    clean = Batch(city.tokens, city.lengths, city.side)
    bad = Batch(city.partner.tokens, city.partner.lengths, city.partner.side)
    metric = from_scalar(_tl_metric)
    r = sweep(gpt2_model, clean, bad, metric, site="resid_pre", layers=[2])
    ref = sweep(gpt2_model, city, metric, site="resid_pre", layers=[2])
    torch.testing.assert_close(r.per_example, ref.per_example, equal_nan=True)
    # effect: the paired mean over each cell's examples; values: the mean of the kept values
    kept = ~torch.isnan(r.per_example)
    want = torch.where(kept, r.per_example - r.corrupt_values, torch.zeros_like(r.per_example)).sum(-1) / kept.sum(-1)
    torch.testing.assert_close(r.effect, want)
    torch.testing.assert_close(r.values[0, 0].item(), r.per_example[0, 0].mean().item())


def test_bad_positions_say_what_was_expected(gpt2_model, city):
    with pytest.raises(ValueError, match=r"PatchResult.alpha: expected 0 < alpha < 1"):
        sweep(gpt2_model, city, answer_logprob(), layers=[0], alpha=5.0)
    with pytest.raises(ValueError, match=r"expected .*a span name among \['answer', 'last', 'subject'\], got 'object'"):
        patch(gpt2_model, city, answer_logprob(), At(1, "resid_pre", "object"))
    with pytest.raises(ValueError, match=r"positions: expected ints in \[0, 25\) \(prompt coordinates\) or span names"):
        sweep(gpt2_model, city, answer_logprob(), positions=[25])
    with pytest.raises(ValueError, match=r"expected a \[batch=5\] integer tensor"):
        patch(gpt2_model, city, answer_logprob(), At(1, "resid_pre", torch.tensor([1, 2])))
    with pytest.raises(ValueError, match=r"reader: expected query positions >= the key position \d+ .* in prompt \d"):
        path_patch(gpt2_model, city, answer_logprob(), At(0, "head", "subject", head=0), At(1, "k", "last", head=0),
                   stream="kv", reader="subject")
    with pytest.raises(ValueError, match=r"sources: expected positions in \[0, target=\d+\].* in prompt 0"):
        knockout(gpt2_model, city, answer_logprob(), at="subject", sources="last")
