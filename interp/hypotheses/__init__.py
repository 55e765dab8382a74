"""Hypothesis investigations: multi-hop planning, positional-information decay, last-token
sufficiency and residual-vs-K/V routes. Each takes any HookedTransformer plus token tensors with
ground truth (`last_token_sufficiency` also a padded `interp.tokens.Batch`; the others refuse a
padded batch) and returns a typed result with CIs, a baseline, a verdict, `clean_shows_behaviour`
(no layer, threshold or effect is reported when it is False), `.to_frame()` and `.plot()`."""

from interp.hypotheses.base import Outcome, Verdict
from interp.hypotheses.last_token import LastTokenResult, last_token_sufficiency
from interp.hypotheses.multihop import MultihopResult, PlanAheadResult, multihop, plan_ahead
from interp.hypotheses.positional_decay import DecayFit, DecayResult, DistanceSet, positional_decay
from interp.hypotheses.routes import RoutesResult, routes

__all__ = ["DecayFit", "DecayResult", "DistanceSet", "LastTokenResult", "MultihopResult", "Outcome", "PlanAheadResult",
           "RoutesResult", "Verdict", "last_token_sufficiency", "multihop", "plan_ahead", "positional_decay",
           "routes"]
