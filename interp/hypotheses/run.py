"""Run an investigation on a model spec (report sections: `interp.report.section`).

Shared by `interp run ...`, `interp demo` and the notebooks, so none of them holds logic of its
own: each `run_*` loads the model(s), builds inputs with ground truth (`interp.hypotheses.inputs`),
calls the investigation and returns its typed result. `baseline`: "auto" (default), "random" or
"none" (`interp.baseline`), passed to the investigation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from interp.arch import Model, config_of
from interp.baseline import BaselineSpec
from interp.hypotheses import inputs
from interp.hypotheses.course_correction import (
    CourseCorrectionResult,
    course_correction,
    planning_inputs,
    read_course_inputs,
    retry_inputs,
)
from interp.hypotheses.last_token import LastTokenResult, last_token_sufficiency
from interp.hypotheses.multihop import MultihopResult, PlanAheadResult, multihop, plan_ahead
from interp.hypotheses.positional_decay import DecayResult, positional_decay
from interp.hypotheses.routes import RoutesResult, routes
from interp.models import load_model

INVESTIGATIONS = ("multihop", "plan-ahead", "decay", "last-token", "routes", "course-correction")


@dataclass(frozen=True)
class Sizes:
    """How many examples each investigation uses (the demo's fast mode shrinks them)."""

    multihop: int = 400
    plan: int = 400
    decay_per_distance: int = 32
    last_token: int = 400
    routes: int = 16

    @staticmethod
    def fast() -> Sizes:
        return Sizes(multihop=160, plan=200, decay_per_distance=12, last_token=160, routes=8)

    @staticmethod
    def smoke() -> Sizes:
        """The notebooks' fast mode (INTERP_FAST=1, under the tests): only that every cell runs
        and draws; the findings themselves are checked once per suite on the demo's run."""
        return Sizes(multihop=64, plan=64, decay_per_distance=4, last_token=48, routes=4)


def load(spec: str) -> Model:
    """`interp.load_model(spec)`, named after the spec when the checkpoint has no name."""
    model = load_model(spec)
    if config_of(model).model_name in ("custom", "", None):
        config_of(model).model_name = spec
    return model


def run_multihop(spec: str = "organism:multihop", n: int = 400, seed: int = 0, prompts: str | Path | None = None,
                 model: Model | None = None, baseline: BaselineSpec = "auto") -> MultihopResult:
    model = model if model is not None else load(spec)
    x = inputs.twohop(spec, model, n, seed, prompts)
    return multihop(model, x.prompts, x.bridge, control_types=x.control_types, seed=seed, baseline=baseline)


def run_plan_ahead(spec: str = "organism:planning", n: int = 400, seed: int = 0,
                   baseline: BaselineSpec = "auto") -> PlanAheadResult:
    model = load(spec)
    return plan_ahead(model, inputs.plan(spec, n, seed), seed=seed, baseline=baseline)


def run_decay(specs: Sequence[str] = ("organism:retrieval-learned", "organism:retrieval-rotary",
                                      "organism:retrieval-nope"), n_per: int = 48, seed: int = 0,
              prompts: str | Path | None = None, models: dict[str, Model] | None = None,
              bins: Sequence[int] | None = None, baseline: BaselineSpec = "auto") -> DecayResult:
    models = models if models is not None else {s.removeprefix("organism:"): load(s) for s in specs}
    first = next(iter(models.values()))
    p = inputs.decay(specs[0] if specs else "", first, n_per, seed, prompts=prompts)
    return positional_decay(models, p, bins=bins, seed=seed, baseline=baseline)


def run_last_token(spec: str = "organism:multihop", n: int = 400, seed: int = 0, prompts: str | Path | None = None,
                   model: Model | None = None, baseline: BaselineSpec = "auto") -> LastTokenResult:
    model = model if model is not None else load(spec)
    return last_token_sufficiency(model, inputs.last_token(spec, model, n, seed, prompts), seed=seed,
                                  baseline=baseline)


def run_routes(spec: str = "organism:induction", n: int = 32, seed: int = 0, prompts: str | Path | None = None,
               model: Model | None = None, baseline: BaselineSpec = "auto") -> RoutesResult:
    if prompts is None and inputs.organism_name(spec) != "induction":
        raise ValueError(f"routes: expected organism:induction (the known K-composition circuit) or --prompts "
                         f"FILE.jsonl, got {spec!r}")
    model = model if model is not None else load(spec)
    return routes(model, inputs.route_prompts(spec, model, n, seed, prompts), source="source", seed=seed,
                  baseline=baseline)


def run_course_correction(spec: str = "organism:planning", n: int = 400, seed: int = 0, surprise: str = "lowest",
                          model: Model | None = None, prompts: str | Path | None = None,
                          steps: int = 4, baseline: BaselineSpec = "auto") -> CourseCorrectionResult:
    """On `organism:planning` or `organism:retry[-clean]` (their own inputs), or on any model with
    a JSONL prompt set (`prompt` the context, `answer` the plan, `meta.surprise` the token to force;
    data/prompts/README.md). `surprise`: lowest | random | a token's text forced after every prompt."""
    name = inputs.organism_name(spec)
    if prompts is None and name not in ("planning", "retry", "retry-clean"):
        raise ValueError(f"course-correction: expected organism:planning, organism:retry, organism:retry-clean or "
                         f"--prompts FILE.jsonl, got {spec!r}")
    model = model if model is not None else load(spec)
    chosen = surprise if surprise in ("lowest", "random") else None
    if prompts is not None:
        x = read_course_inputs(str(prompts), inputs.tokenizer_of(model), surprise=None if chosen else surprise,
                               limit=n)
    elif name == "planning":
        x = planning_inputs(n, seed)
    else:
        x = retry_inputs(n, seed)
    if chosen is None and prompts is None:
        raise ValueError(f"course-correction: a surprise given as text ({surprise!r}) expected --prompts (the organisms "
                         f"choose their surprise: lowest | random)")
    return course_correction(model, x, steps=steps, surprise=chosen or "lowest", seed=seed, baseline=baseline)
