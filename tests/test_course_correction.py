"""interp.hypotheses.course_correction: per-example values of a padded batch equal each prompt alone
(both families, left and right padding); the K/V cut against a closed form (rotary, self-only
attention = the token run alone); categories against hand-built runs; the planning organism."""

from __future__ import annotations

import pytest
import torch
from conftest import CITY_PROMPTS

from interp.hooks import run
from interp.hypotheses.course_correction import (
    CATEGORIES,
    _categorise,
    course_correction,
    measure,
    planning_inputs,
)
from interp.prompts import Prompts

TOL = 1e-5
KW = dict(steps=3, surprise="lowest", candidates=torch.arange(2, 50), alternatives=None, plan=None, seed=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_each_prompt_alone(any_model, bpe_tokenizer, side):
    p = Prompts.from_text([t for t, _, _ in CITY_PROMPTS], bpe_tokenizer, side=side)
    assert len(set(p.lengths.tolist())) > 1
    batch = measure(any_model, p, **KW)
    r = p.right()
    for i in range(len(p)):
        one = measure(any_model, r.tokens[i: i + 1, : int(r.lengths[i])], **KW)
        assert int(one.surprise[0]) == int(batch.surprise[i])
        assert torch.equal(one.forced[0], batch.forced[i]) and torch.equal(one.unforced[0], batch.unforced[i])
        assert int(one.category[0]) == int(batch.category[i])
        for f in ("divergence", "m_forced", "drop_kv", "drop_resid"):
            torch.testing.assert_close(getattr(one, f)[0], getattr(batch, f)[i], atol=TOL, rtol=0)
        torch.testing.assert_close(one.notice[:, 0], batch.notice[:, i], atol=TOL, rtol=0)


def test_kv_cut_is_the_surprise_alone_under_rotary(llama_model, bpe_tokenizer):
    """Rotary, no absolute positions: a query that may read only itself at every layer computes what
    the surprise token computes as a one-token prompt (q.k of one position does not depend on it)."""
    p = Prompts.from_text([t for t, _, _ in CITY_PROMPTS], bpe_tokenizer, side="left")
    m = measure(llama_model, p, **KW)
    alone = run(llama_model, m.surprise[:, None]).logits[:, 0].double().log_softmax(-1)
    ref = alone[torch.arange(len(p)), m.unforced[:, 1]]
    torch.testing.assert_close((m.m_forced - m.drop_kv).double(), ref, atol=TOL, rtol=0)
    # m_forced itself is log p(u_1) of the forced sequence run whole (generate's step-1 logits)
    r = p.right()
    for i in range(len(p)):
        seq = torch.cat([r.tokens[i, : int(r.lengths[i])], m.surprise[i: i + 1]])
        lp = run(llama_model, seq[None]).logits[0, -1].double().log_softmax(-1)[m.unforced[i, 1]]
        assert abs(float(lp) - float(m.m_forced[i])) < TOL


def test_categories_by_hand():
    # plan u = 5 6 7 8 ; forced runs start with the surprise 9 at step 0
    u = torch.tensor([[5, 6, 7, 8, 1]] * 4)
    forced = torch.tensor([[9, 6, 7, 8, 1],   # finish: 6 7 8 after the surprise
                           [9, 5, 6, 7, 8],   # restart: 5 6 7 8 again
                           [9, 3, 4, 0, 1],   # replan: 9 3 4 0 is an alternative word
                           [9, 2, 2, 2, 2]])  # drift
    alt = torch.tensor([[9, 3, 4, 0], [5, 6, 7, 8]])
    cat = _categorise(u, forced, torch.full((4,), 9), alt, 4)
    assert [CATEGORIES[c] for c in cat.tolist()] == ["finish", "restart", "replan", "drift"]


def test_planning_organism_course_correction():
    from interp.models import load_model

    model = load_model("organism:planning")
    x = planning_inputs(48, 7)
    res = course_correction(model, x, n_boot=200)
    f = res.to_frame()
    # the clean (unforced) run follows the ground-truth word: the organism shows the behaviour
    assert f[(f.model == "model") & (f.measure == "on_plan")].value.iloc[0] >= 0.9
    # the random baseline's own plan is not the word
    assert f[(f.model == "baseline") & (f.measure == "on_plan")].value.iloc[0] <= 0.1
    rates = f[(f.model == "model") & (f.measure == "rate")]
    assert abs(rates.value.sum() - 1) < 1e-9 and set(rates.category) == set(CATEGORIES)
    # forcing a wrong first syllable moves every later step's distribution: KL > 0 with its CI
    div = f[(f.model == "model") & (f.measure == "divergence") & (f.step == 1)].iloc[0]
    assert div.ci_low > 0 and div.n == 48
    assert (res.model.surprise != res.model.unforced[:, 0]).all()
    assert torch.isin(res.model.surprise, x.candidates).all()


def test_course_correction_renders_as_a_report_section(gpt2_model, bpe_tokenizer):
    from interp.report import section

    p = Prompts.from_text([t for t, _, _ in CITY_PROMPTS], bpe_tokenizer)
    res = course_correction(gpt2_model, p, steps=2, candidates=torch.arange(2, 50), n_boot=50)
    s = section("course-correction", res)
    assert s.verdict == str(res.verdict) and len(s.figures) == 1
    f = res.to_frame()
    rates = f[(f.model == "baseline") & (f.measure == "rate")]
    assert abs(rates.value.sum() - 1) < 1e-9
