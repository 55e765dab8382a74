"""interp.baseline: one baseline policy for every investigation (issue 12, item 5). A spy on
`random_like` shows when the random-initialised model is built: never for "none" or for "auto"
above the size limit, exactly once per investigation for "random", and released when the
investigation returns; without a baseline the result and the verdict say so and how to get one;
"auto" on an organism is today's result (the random baseline built by hand and passed in)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import interp.baseline as policy
from interp.baseline import baseline_for, parameter_bytes
from interp.decoding import trajectory
from interp.hypotheses import last_token_sufficiency, multihop, plan_ahead, positional_decay, routes
from interp.hypotheses.course_correction import course_correction
from interp.prompts import Prompts


@pytest.fixture
def spy(monkeypatch):
    """Every model `random_like` builds, as a weak reference (the real function builds it)."""
    built: list[weakref.ref] = []
    real = policy.random_like

    def counting(model, seed=0, **kw):
        m = real(model, seed, **kw)
        built.append(weakref.ref(m))
        return m

    monkeypatch.setattr(policy, "random_like", counting)
    return built


def _argmax(model, toks: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(toks)[:, -1].argmax(-1)


def _routes_prompts(model, g) -> Prompts:
    """Clean prompts answered by the model's own argmax; the corrupted source token is the one that
    lowers log p(answer) most, so the clean-minus-corrupted effect is positive by construction."""
    clean = torch.randint(0, 50, (4, 5), generator=g)
    ans = _argmax(model, clean)
    corrupt = clean.clone()
    for i in range(len(clean)):
        cands = clean[i].repeat(50, 1)
        cands[:, 2] = torch.arange(50)
        with torch.inference_mode():
            lp = model(cands)[:, -1].log_softmax(-1)[:, ans[i]]
        corrupt[i, 2] = int(lp.argmin())
    src = torch.full((4,), 2)
    q = Prompts.from_tokens(corrupt, answers=ans, spans={"source": src})
    return Prompts.from_tokens(clean, answers=ans, spans={"source": src}, partner=q)


def investigations(model):
    """name -> run(baseline) -> (result, verdict text), each on tiny inputs."""
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 50, (8, 7), generator=g)
    last = Prompts.from_tokens(toks, answers=_argmax(model, toks))
    mh = torch.randint(0, 50, (20, 6), generator=g)
    a = _argmax(model, mh)
    two = Prompts.from_tokens(mh, answers=a, partner=Prompts.from_tokens(mh.roll(1, 0), answers=a.roll(1)))
    plan_toks = torch.randint(0, 50, (24, 8), generator=g)
    mask = torch.zeros(24, 8, dtype=torch.bool)
    mask[:, 3] = True
    decay_toks = [torch.randint(0, 50, (8, 9), generator=g) for _ in range(3)]
    answers = torch.cat([_argmax(model, t) for t in decay_toks])
    fact = torch.cat([torch.full((8,), 8 - d) for d in (1, 3, 5)])
    decay = Prompts.from_tokens([row for t in decay_toks for row in t], answers=answers, spans={"fact": fact})
    rp = _routes_prompts(model, g)
    cc = torch.randint(0, 50, (6, 5), generator=g)

    def v(r):
        return r, str(r.verdict)

    return {
        "last_token": lambda b: v(last_token_sufficiency(model, last, baseline=b)),
        "multihop": lambda b: v(multihop(model, two, a.roll(1), baseline=b)),
        "plan_ahead": lambda b: v(plan_ahead(model, plan_toks, mask, baseline=b)),
        "positional_decay": lambda b: v(positional_decay({"m": model}, decay, positions_per_prompt=2, baseline=b)),
        "routes": lambda b: v(routes(model, rp, via=[], baseline=b)),
        "course_correction": lambda b: v(course_correction(model, cc, steps=2, candidates=torch.arange(2, 50),
                                                           n_boot=50, baseline=b)),
        "trajectory": lambda b: (lambda r: (r, r.verdict))(trajectory(model, toks, n_boot=50, baseline=b)),
    }


def _note(r) -> str:
    return r.models["m"].baseline_note if hasattr(r, "models") else r.baseline_note


def test_random_builds_once_per_investigation_after_the_main_measurement_and_releases_it(gpt2_model, spy,
                                                                                         monkeypatch):
    runs, at_build = [0], []  # forwards of the model itself; how many had run when the baseline was built
    counting = policy.random_like
    monkeypatch.setattr(policy, "random_like", lambda m, seed=0, **kw: (at_build.append(runs[0]),
                                                                      counting(m, seed, **kw))[1])
    handle = gpt2_model.register_forward_pre_hook(lambda module, args: runs.__setitem__(0, runs[0] + 1))
    try:
        for name, run in investigations(gpt2_model).items():
            before, ran = len(spy), runs[0]
            r, _ = run("random")
            assert len(spy) == before + 1, name
            assert at_build[-1] > ran, f"{name} built its baseline before measuring the model"
            gc.collect()
            assert spy[-1]() is None, f"{name} keeps its random baseline alive"
            assert "random-initialised" in _note(r), name
    finally:
        handle.remove()


@pytest.mark.parametrize("choice", ["none", "auto"])
def test_no_baseline_built_for_none_or_auto_above_the_limit(gpt2_model, spy, monkeypatch, choice):
    size = parameter_bytes(gpt2_model)
    monkeypatch.setattr(policy, "AUTO_MAX_BYTES", size - 1)  # the tiny model is now "too big"
    for name, run in investigations(gpt2_model).items():
        r, verdict = run(choice)
        assert spy == [], name
        note = _note(r)
        assert note is not None and "baseline='random'" in note, name
        assert ("withheld" in note) == (choice == "auto"), name
        # the verdict says there is none, why, and how to get one
        assert verdict.startswith("No verdict") and "unbaselined" in verdict, (name, verdict)
        assert "baseline='random'" in verdict, (name, verdict)
        assert ("withheld" in verdict) == (choice == "auto"), name
    # the results hold no baseline measurement
    assert r.baseline is None  # trajectory, the last one run


def test_unbaselined_results_render_as_report_sections(gpt2_model, monkeypatch):
    from interp.report import SUMMARIES

    monkeypatch.setattr(policy, "AUTO_MAX_BYTES", 0)
    runs = investigations(gpt2_model)
    for name in ("last_token", "multihop", "plan_ahead", "positional_decay", "routes", "course_correction"):
        r, _ = runs[name]("auto")
        s = SUMMARIES[type(r).__name__](r)
        assert "no model baseline (withheld" in s.how_measured, (name, s.how_measured)
        r.plot()


def test_auto_is_random_below_the_limit_and_withheld_above(gpt2_model, monkeypatch):
    size = parameter_bytes(gpt2_model)
    assert baseline_for(gpt2_model, "auto").kind == "random"
    assert baseline_for(gpt2_model, None).kind == "random" and baseline_for(gpt2_model, True).kind == "random"
    assert baseline_for(gpt2_model, False).kind == "none"
    assert baseline_for(gpt2_model, gpt2_model).given is gpt2_model
    monkeypatch.setattr(policy, "AUTO_MAX_BYTES", size - 1)
    b = baseline_for(gpt2_model, "auto")
    assert b.kind == "withheld" and not b.available and b.model_bytes == size
    assert f"{size / 2**20:.1f} MiB" in b.note  # the cost of asking for one
    assert baseline_for(gpt2_model, "random").kind == "random"
    with pytest.raises(ValueError, match="expected a model, 'auto', 'random' or 'none', got 'rand'"):
        baseline_for(gpt2_model, "rand")


def test_parameter_bytes_by_hand(gpt2_model):
    want = sum(p.numel() for p in gpt2_model.parameters()) * 4  # float32
    assert parameter_bytes(gpt2_model) == want
    assert policy.AUTO_MAX_BYTES == 2**30
    assert parameter_bytes(torch.nn.Linear(8, 4).to(torch.bfloat16)) == (8 * 4 + 4) * 2


def test_auto_on_an_organism_is_todays_result(spy):
    """Today every investigation built `random_like(model, seed)` when given no baseline: "auto"
    (the default) on an organism gives exactly that result."""
    from interp.hypotheses import inputs
    from interp.hypotheses.base import random_like
    from interp.models import load_model

    model = load_model("organism:multihop")
    x = inputs.last_token("organism:multihop", model, 16, 0, None)
    auto = last_token_sufficiency(model, x)
    assert len(spy) == 1
    given = last_token_sufficiency(model, x, baseline=random_like(model, 0))
    assert str(auto.verdict) == str(given.verdict) and auto.sufficient_from == given.sufficient_from
    assert auto.to_frame().equals(given.to_frame())
    torch.testing.assert_close(auto.baseline_clean.logprob, given.baseline_clean.logprob, atol=0, rtol=0)
    assert auto.baseline_note.startswith("a random-initialised model of the same shape")


def test_cli_run_refuses_an_unknown_baseline(tmp_path):
    from typer.testing import CliRunner

    from interp.cli_run import app

    res = CliRunner().invoke(app, ["last-token", "--baseline", "shuffled", "--out", str(tmp_path / "r.html")])
    assert res.exit_code != 0 and "expected auto, random or none, got 'shuffled'" in res.output


def test_cli_run_baseline_none_writes_an_unbaselined_report(tmp_path, spy):
    from typer.testing import CliRunner

    from interp.cli_run import app

    out = tmp_path / "r.html"
    res = CliRunner().invoke(app, ["last-token", "--model", "organism:multihop", "--n", "16", "--baseline", "none",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert spy == [] and "unbaselined" in res.output and out.is_file()
    assert "baseline: no model baseline (none (baseline=&#x27;none&#x27;)" in out.read_text()  # how measured
