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
    prompt_inputs,
    read_course_inputs,
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
    # with a back-off marker 3: "9 3 5 6 7" retracts the surprise and resumes the plan
    back = torch.tensor([[9, 3, 5, 6, 7], [9, 3, 6, 7, 8]])
    cat = _categorise(u[:2], back, torch.full((2,), 9), None, 4, backoff=3)
    assert [CATEGORIES[c] for c in cat.tolist()] == ["backoff", "drift"]


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
    assert abs(rates.value.sum() - 1) < 1e-9 and set(rates.category) == set(CATEGORIES) - {"backoff"}
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


def _one_token_surprise(model, tok, texts):
    """A word that is one token after every prompt and never the model's own next token."""
    p = Prompts.from_text(texts, tok)
    from interp.decoding import generate

    greedy = set(generate(model, p, 1).tokens[:, 0].tolist())
    for word in (" the", " in", " is", " b", " t"):
        ids = {tuple(Prompts.from_text([t], tok, answers=[word]).answers[0].tolist()) for t in texts}
        if len(ids) == 1 and len(next(iter(ids))) == 1 and next(iter(ids))[0] not in greedy:
            return word, next(iter(ids))[0]
    raise AssertionError("no one-token surprise")


def test_any_prompts_with_a_chosen_surprise(gpt2_model, bpe_tokenizer, tmp_path, monkeypatch):
    """JSONL through an HF tokenizer: the context is the prompt (answer tokens dropped), the plan is
    the answer, the forced token is meta.surprise; m_forced against a plain forward; the CLI runs."""
    import json

    from typer.testing import CliRunner

    from interp import cli_run
    from interp.hypotheses import run as runner

    texts = [t for t, _, _ in CITY_PROMPTS]
    word, sid = _one_token_surprise(gpt2_model, bpe_tokenizer, texts)
    path = tmp_path / "cc.jsonl"
    path.write_text("".join(json.dumps({"prompt": t, "answer": a, "meta": {"surprise": word}}) + "\n"
                            for t, _, a in CITY_PROMPTS))
    x = read_course_inputs(str(path), bpe_tokenizer)
    ref = Prompts.from_text(texts, bpe_tokenizer)
    assert torch.equal(x.prompts.tokens, ref.tokens) and torch.equal(x.prompts.lengths, ref.lengths)
    assert (x.surprise == sid).all()
    answers = Prompts.from_text(texts, bpe_tokenizer, answers=[a for _, _, a in CITY_PROMPTS]).answers
    assert torch.equal(x.plan, answers)
    res = course_correction(gpt2_model, x, steps=2, n_boot=50)
    assert (res.model.forced[:, 0] == sid).all() and (res.model.unforced[:, 0] != sid).all()
    for i in range(len(texts)):  # log p(u_1) after prompt + surprise, a plain forward of one prompt
        ids = ref.tokens[i, : int(ref.lengths[i])]
        lp = run(gpt2_model, torch.cat([ids, torch.tensor([sid])])[None]).logits[0, -1].double().log_softmax(-1)
        assert abs(float(lp[res.model.unforced[i, 1]]) - float(res.model.m_forced[i])) < TOL
    # a token forced after every prompt, given directly, is the same run
    same = course_correction(gpt2_model, prompt_inputs(ref), steps=2, surprise=sid, n_boot=50)
    torch.testing.assert_close(same.model.divergence, res.model.divergence, atol=TOL, rtol=0)
    # a surprise that is the model's own next token is refused, naming the rows
    own = int(res.model.unforced[0, 0])
    with pytest.raises(ValueError, match="differ from the model's own next token"):
        course_correction(gpt2_model, prompt_inputs(ref), steps=2, surprise=own, baseline=False)
    # the CLI: any model, --prompts, the surprise as text
    model = gpt2_model
    monkeypatch.setattr(runner, "load", lambda spec: model)
    monkeypatch.setattr(model, "tokenizer", bpe_tokenizer, raising=False)
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    out = tmp_path / "cc.html"
    r = CliRunner().invoke(cli_run.app, ["course-correction", "--model", "my-model", "--prompts", str(plain),
                                         "--surprise", word, "--steps", "2", "--out", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    assert out.is_file() and "course-correction:" in r.output
    with pytest.raises(ValueError, match="--prompts FILE.jsonl"):
        runner.run_course_correction("my-model")


def test_a_given_surprise_that_is_the_baselines_own_token_leaves_that_row_out(gpt2_model, bpe_tokenizer):
    """Regression: a surprise given per prompt may be the random-initialised model's own next
    token; that row has no surprise to measure (NaN, left out of n) instead of stopping the run."""
    from interp.decoding import generate
    from interp.models import random_like

    p = Prompts.from_text([t for t, _, _ in CITY_PROMPTS], bpe_tokenizer)
    own = generate(gpt2_model, p, 1).tokens[:, 0]
    base = generate(random_like(gpt2_model, 0), p, 1).tokens[:, 0]
    s = torch.where(torch.arange(len(p)) == 0, base, (own + 1) % 50)
    s = torch.where(s == own, (own + 2) % 50, s)
    assert int(s[0]) == int(base[0]) and (s != own).all()
    res = course_correction(gpt2_model, prompt_inputs(p, surprise=s), steps=2, n_boot=50)
    hit = s == base
    assert bool(hit[0]) and torch.isnan(res.baseline.m_forced[hit]).all()
    assert torch.isfinite(res.baseline.m_forced[~hit]).all() and torch.isfinite(res.model.m_forced).all()
    f = res.to_frame()
    rates = f[(f.model == "baseline") & (f.measure == "rate")]
    assert (rates.n == int((~hit).sum())).all() and abs(rates.value.sum() - 1) < 1e-9


@pytest.mark.parametrize("side", ["right", "left"])
def test_route_interchanges_against_plain_forwards(any_model, bpe_tokenizer, side):
    """Both families (GQA included), padded prompts of 5 lengths: with every pre-surprise K/V taken
    from a source context, the surprise position computes what it computes after that context
    (source + surprise run alone); with the planned token's embedding it computes the unforced
    sequence's step."""
    from interp.hypotheses.course_correction import CourseInputs

    p = Prompts.from_text([t for t, _, _ in CITY_PROMPTS], bpe_tokenizer, side=side)
    r = p.right()
    g = torch.Generator().manual_seed(4)
    src = [torch.randint(2, 50, (int(n),), generator=g) for n in r.lengths]
    x = CourseInputs(p, None, torch.arange(2, 50), None, surprise=torch.full((len(p),), 7),
                     kv_source=Prompts.from_tokens(src, side=side))
    from interp.decoding import generate

    if bool((generate(any_model, p, 1).tokens[:, 0] == 7).any()):
        pytest.skip("the fixture's own next token is the surprise")
    res = course_correction(any_model, x, steps=3, baseline=False, n_boot=50)
    m = res.model
    for i in range(len(p)):
        u1 = m.unforced[i, 1]
        lp = run(any_model, torch.cat([src[i], torch.tensor([7])])[None]).logits[0, -1].double().log_softmax(-1)
        assert abs(float(m.m_forced[i] - m.patch_kv[i]) - float(lp[u1])) < TOL
        own = torch.cat([r.tokens[i, : int(r.lengths[i])], m.unforced[i, :1]])
        lp = run(any_model, own[None]).logits[0, -1].double().log_softmax(-1)
        assert abs(float(m.m_forced[i] - m.patch_resid[i]) - float(lp[u1])) < TOL
