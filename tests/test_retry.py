"""The `retry` organism and its error-free control `retry-clean` (shipped checkpoints): the data's
ground truth checked by independent per-example parsing; the known mechanism recovered — a probe
reads "the last step was wrong" at the wrong step in the retry model (not in the control), the
retry model backs off after a forced wrong step and then emits the correct step (checked against
plain forwards), the control continues from the wrong step; the route patches against a hand-built
interchange."""

from __future__ import annotations

import pytest
import torch

from interp.hooks import run
from interp.hypotheses.course_correction import (
    CATEGORIES,
    course_correction,
    error_probe,
    retry_inputs,
    retry_probe_inputs,
)
from interp.models import load_model
from interp.organisms import retry


@pytest.fixture(scope="module")
def models():
    return {n: load_model(f"organism:{n}") for n in ("retry", "retry-clean")}


def _parse(row: list[int]) -> tuple[int, int | None]:
    """(stride, position of the wrong step or None), from the tokens alone (plain Python)."""
    stride = retry.STRIDES[row[1] - retry.STRIDE0]
    nums = row[retry.FIRST:]
    wrong = None
    i, prev = 1, nums[0]
    while i < len(nums):
        t = nums[i]
        if t == retry.BACK:
            i += 1
            continue
        expected = retry.NUM0 + (prev - retry.NUM0 + stride) % retry.N_NUMBERS
        if t != expected:
            assert wrong is None and nums[i + 1] == retry.BACK and nums[i + 2] == expected, row
            wrong = retry.FIRST + i
        else:
            prev = t
        i += 1
    return stride, wrong


def test_dataset_ground_truth_by_parsing():
    d = retry.dataset(300, 5, error_rate=0.5)
    t = retry.targets(d)
    n_err = 0
    for i, row in enumerate(d.tokens.tolist()):
        stride, wrong = _parse(row)
        assert stride == int(d.stride[i])
        assert (wrong if wrong is not None else -1) == int(d.error_pos[i])
        if wrong is not None:
            n_err += 1
            assert int(d.wrong[i]) == row[wrong] and int(d.correct[i]) == row[wrong + 2]
            assert int(t[i, wrong - 1]) == -100 and int(t[i, wrong]) == retry.BACK  # wrong step masked, marker kept
    assert 100 < n_err < 200
    assert int((retry.dataset(300, 5).error_pos >= 0).sum()) == 0  # the control's data: no errors
    p = retry.probe_data(200, 3)
    assert p.label.float().mean() == 0.5
    for i, row in enumerate(p.tokens.tolist()):
        _, wrong = _parse(row)
        assert (wrong == int(p.pos[i])) == bool(p.label[i])


def test_probe_reads_the_error_in_the_retry_model_only(models):
    """Ground truth: the retry model's residual at the wrong step (before <back> is emitted) holds
    "last step wrong" after block 0 already; the control's never clears chance."""
    p, labels = retry_probe_inputs(800, 0)
    res = {n: error_probe(m, p, labels, n_boot=500) for n, m in models.items()}
    r, c = res["retry"], res["retry-clean"]
    # embeddings alone (layer 0_pre) cannot tell: the token is uniform under both labels
    assert r.ci_low[0] < 0.6 and c.ci_low[0] < 0.6
    # after block 0 (1_pre) and at the output: decodable in the retry model, well above shuffled labels
    assert r.ci_low[1] > max(float(r.shuffled[1]), 0.5) + 0.15
    assert r.ci_low[2] > 0.95
    # the control: no layer's CI clears 0.65, and every layer sits below the retry model's
    assert (c.ci_high < 0.7).all() and (c.ci_high[1:] < r.ci_low[1:]).all()


def test_retry_backs_off_and_repairs_the_control_continues(models):
    x = retry_inputs(120, 3)
    res = {n: course_correction(m, x, n_boot=200) for n, m in models.items()}
    f = res["retry"].to_frame()
    rate = f[(f.model == "model") & (f.measure == "rate")].set_index("category")
    assert rate.loc["backoff", "ci_low"] > 0.9 and set(rate.index) == set(CATEGORIES)
    base = f[(f.model == "baseline") & (f.measure == "rate")].set_index("category")
    assert base.loc["backoff", "value"] == 0
    # independent check of the generated tokens: plain forwards of context + surprise (+ <back>)
    m = models["retry"]
    ctx, s = x.prompts.tokens, x.surprise
    seq = torch.cat([ctx, s[:, None]], 1)
    after = run(m, seq).logits[:, -1].argmax(-1)
    assert (after == retry.BACK).double().mean() == rate.loc["backoff", "value"]
    rep = run(m, torch.cat([seq, after[:, None]], 1)).logits[:, -1].argmax(-1)
    assert torch.equal(rep[after == retry.BACK], x.plan[:, 0][after == retry.BACK])
    assert "compares both routes" in str(res["retry"].verdict)
    share = f[(f.model == "model") & (f.measure == "patch_kv_share")].iloc[0]
    assert 0.4 < share.ci_low <= share.ci_high < 0.6
    # the report section's summary table shows the same numbers
    from interp.report import section

    table = section("course-correction", res["retry"]).summary.set_index("measure")
    b = rate.loc["backoff"]
    assert table.loc["outcome: backoff", "model"] == f"{100 * b.value:.1f}% [{100 * b.ci_low:.1f}, {100 * b.ci_high:.1f}]"
    assert table.loc["outcome: backoff", "random init"].startswith("0.0%")
    # the control never backs off; it continues the chain from the wrong step (replan) mostly
    g = res["retry-clean"].to_frame()
    crate = g[(g.model == "model") & (g.measure == "rate")].set_index("category")
    assert crate.loc["backoff", "ci_high"] == 0 and crate.loc["replan", "ci_low"] > 0.6
    nxt = run(models["retry-clean"], seq).logits[:, -1].argmax(-1)
    stride = torch.tensor(retry.STRIDES)[x.prompts.tokens[:, 1] - retry.STRIDE0]
    cont = retry.NUM0 + (s - retry.NUM0 + stride) % retry.N_NUMBERS
    assert (nxt == cont).double().mean() > 0.6


def test_kv_patch_equals_running_the_source_context(models):
    """With every pre-surprise K/V from the source context, the surprise position computes what it
    computes after the source context itself (an interchange built by hand)."""
    m = models["retry"]
    x = retry_inputs(40, 9)
    res = course_correction(m, x, baseline=False, n_boot=50)
    src = torch.cat([x.kv_source.tokens, x.surprise[:, None]], 1)
    lp = run(m, src).logits[:, -1].double().log_softmax(-1)[:, retry.BACK]
    torch.testing.assert_close(res.model.m_forced - res.model.patch_kv, lp, atol=1e-5, rtol=0)
    # the source context's plan starts with the surprise: no back-off there
    assert (lp < -5).all()
    # the residual patch: the planned token's embedding at the surprise position = the unforced sequence
    own = torch.cat([x.prompts.tokens, x.plan[:, :1]], 1)
    lp_own = run(m, own).logits[:, -1].double().log_softmax(-1)[:, retry.BACK]
    torch.testing.assert_close(res.model.m_forced - res.model.patch_resid, lp_own, atol=1e-5, rtol=0)
