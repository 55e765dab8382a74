"""Hypothesis investigations: multi-hop planning, positional-information decay, last-token
sufficiency and residual-vs-K/V routes. Each takes either model kind (HookedTransformer or TransformerBridge, `interp.arch.Model`) plus `interp.prompts.Prompts`
(prompts of any lengths, padded left or right, with per-example named positions, answers of one
or several tokens and partners; a plain token tensor still works) and returns a typed result with CIs, a baseline, a verdict, `clean_shows_behaviour`
(no layer, threshold or effect is reported when it is False), `.to_frame()` and `.plot()`."""

from interp.hypotheses.base import Outcome, Verdict
from interp.hypotheses.continuous import ContinuousResult, ThoughtTask, continuous_thought
from interp.hypotheses.last_token import LastTokenResult, last_token_sufficiency
from interp.hypotheses.multihop import MultihopResult, PlanAheadResult, multihop, plan_ahead
from interp.hypotheses.positional_decay import DecayFit, DecayResult, distance_groups, positional_decay
from interp.hypotheses.routes import RoutesResult, routes

__all__ = ["ContinuousResult", "ThoughtTask", "continuous_thought", "DecayFit", "DecayResult", "LastTokenResult", "MultihopResult", "Outcome", "PlanAheadResult",
           "RoutesResult", "Verdict", "distance_groups", "last_token_sufficiency", "multihop", "plan_ahead", "positional_decay",
           "routes"]
