"""What a continuous thought holds: superposition of a graph search's frontier (Zhu et al. 2025).

A continuous ("Coconut", Hao et al. 2024) model feeds its last hidden state back as the next
input instead of a sampled token. Zhu et al. ("Reasoning by Superposition", 2025) show that such a
thought can hold several frontier nodes of a breadth-first search at once, where a token chain
commits to one. On a task with a known frontier per step (`ThoughtTask`; the ``reach-*``
organisms build one with `reach_inputs`) this investigation measures, per thought step i:

- superposition: one binary linear probe per node (`interp.probing.fit`) on the i-th thought
  decodes "node reachable in exactly i steps"; per held-out example, the number of frontier nodes
  among the probe's top-|F_i| scores, against probes fitted on shuffled labels (CIs over
  examples) — and against the token model, whose hidden state at the same position is probed the
  same way and whose written token holds one node;
- the logit lens at the thought (its unembedding: the thought *is* the final-norm output): how
  many of its top-|F_i| node tokens are frontier nodes;
- patching: thought i of the partner (same graph, started at the other root, so its answer is
  the other candidate) written into the clean rollout, the later thoughts recomputed: the share
  of answers that follow the partner, against a control that writes the thought of the same
  example with its edges listed in another order (same frontier: the answer should stay);
- what a sampled token discards: the entropy (bits) of the token model's distribution at each
  step and the frontier mass it spreads, next to how many frontier nodes the probe reads from
  the continuous state beyond the one a token keeps.

Rollouts go through the one run path (`interp.hooks.run`): thought i is the final-norm output
(`ln_final` of the last block's resid_post) at position ``think_pos + i - 1`` and replaces the
token embedding (``hook_embed``; position embeddings are still added) at ``think_pos + i``.
Caveats: decodable is not used (the patching result is the causal test); the probes read one
vector per example, so "decodable" means linearly separable from 64-128 dimensions with ~750
training examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interp.arch import Arch
from interp.graph import HOOK_EMBED, Node
from interp.hooks import Capture, RunOutput, SetAt, run
from interp.hypotheses.base import Verdict
from interp.probing import fit, shuffled_labels, split_by_group
from interp.stats import Estimate, bootstrap
from interp.tl import HookedTransformer


@dataclass(frozen=True)
class ThoughtTask:
    """Fixed-layout inputs with a known search frontier (all tensors on CPU).

    `tokens`: the prompt through ``think_pos``, then `n_thoughts` placeholder slots; the answer is
    read at the last slot; the token model writes its steps into the same slots.
    `frontier[:, i, j]`: node `node_ids[j]` is reachable in exactly i steps (i = 0..n_thoughts + 1).
    `partner_tokens` / `partner_answer`: the counterfactual whose thoughts are patched in;
    `control_tokens`: the same example written differently (same frontier and answer).
    """

    tokens: Int[Tensor, "n pos"]
    think_pos: int
    n_thoughts: int
    node_ids: Int[Tensor, "node"]
    frontier: Bool[Tensor, "n step node"]
    answer: Int[Tensor, "n"]
    partner_tokens: Int[Tensor, "n pos"]
    partner_answer: Int[Tensor, "n"]
    control_tokens: Int[Tensor, "n pos"]

    def __post_init__(self) -> None:
        n, length = self.tokens.shape
        if self.think_pos + self.n_thoughts != length - 1:
            raise ValueError(f"ThoughtTask layout: expected think_pos + n_thoughts = last position "
                             f"{length - 1}, got {self.think_pos} + {self.n_thoughts}")
        for name in ("partner_tokens", "control_tokens"):
            if getattr(self, name).shape != self.tokens.shape:
                raise ValueError(f"ThoughtTask.{name}: expected shape {tuple(self.tokens.shape)}, got "
                                 f"{tuple(getattr(self, name).shape)}")
        if self.frontier.shape[:2] != (n, self.n_thoughts + 2) or self.frontier.shape[2] != len(self.node_ids):
            raise ValueError(f"ThoughtTask.frontier: expected ({n}, {self.n_thoughts + 2}, {len(self.node_ids)}), "
                             f"got {tuple(self.frontier.shape)}")

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])


def reach_inputs(n: int = 1000, seed: int = 1) -> ThoughtTask:
    """The ``reach-*`` organisms' task (`interp.organisms.reach`) as a `ThoughtTask`."""
    from interp.organisms import reach

    d = reach.dataset(n, seed)
    part, ctrl = d.partner(), d.reordered(seed + 1)
    return ThoughtTask(tokens=d.tokens_for("continuous"), think_pos=reach.THINK_POS, n_thoughts=reach.STEPS,
                       node_ids=reach.NODE0 + torch.arange(reach.N_NODES), frontier=d.frontier,
                       answer=d.answer, partner_tokens=part.tokens_for("continuous"), partner_answer=part.answer,
                       control_tokens=ctrl.tokens_for("continuous"))


# ----------------------------------------------------------------------------- rollouts


@dataclass(frozen=True)
class Thoughts:
    """One rollout: `states[:, i]` the final-norm hidden state at ``think_pos + i`` (thought i + 1
    in a continuous rollout), `written[:, i]` the token written in slot i (-1 for a thought),
    `step_logits[:, i]` the logits at ``think_pos + i``, `answer_logits` at the read-out."""

    states: Float[Tensor, "n step d_model"]
    written: Int[Tensor, "n step"]
    step_logits: Float[Tensor, "n step d_vocab"]
    answer_logits: Float[Tensor, "n d_vocab"]


def _logits(out: RunOutput) -> Tensor:
    if out.logits is None:
        raise ValueError("rollout_thoughts: expected logits from the run, got None")
    return out.logits


def _final_norm(model: HookedTransformer, resid: Tensor) -> Tensor:
    with torch.no_grad():
        return model.ln_final(resid) if hasattr(model, "ln_final") else resid


def rollout_thoughts(model: HookedTransformer, tokens: Int[Tensor, "n pos"], think_pos: int, n_thoughts: int,
                     mode: str = "hidden", *, replace: dict[int, Tensor] | None = None) -> Thoughts:
    """Fill the `n_thoughts` slots after `think_pos`, then read the last position.

    ``mode="hidden"``: each slot gets the previous position's final-norm hidden state as its input
    embedding (a continuous thought); ``"token"``: the previous position's argmax token is written
    (greedy token chain). `replace[i]` ([n, d_model]) overrides thought i (0-based) with a given
    vector before the later ones are computed (patching a continuous thought)."""
    if mode not in ("hidden", "token"):
        raise ValueError(f"rollout_thoughts mode: expected 'hidden' or 'token', got {mode!r}")
    n_layers = Arch.of(model).n_layers
    last = Node(n_layers - 1, "resid_post")
    tokens = tokens.clone()
    n = tokens.shape[0]
    rows = torch.arange(n)
    thoughts: list[Tensor] = []
    states, step_logits = [], []
    for i in range(n_thoughts + 1):
        edits = [SetAt(HOOK_EMBED, index=torch.full((n,), think_pos + 1 + j), values=t)
                 for j, t in enumerate(thoughts)]
        out = run(model, tokens, edits=edits, captures=[Capture(last, index=torch.full((n, 1), think_pos + i))])
        logits = _logits(out)
        if i == n_thoughts:
            answer = logits[:, -1].float().cpu()
            break
        state = _final_norm(model, out.acts[next(iter(out.acts))][:, 0])
        states.append(state.float().cpu())
        step_logits.append(logits[:, think_pos + i].float().cpu())
        if mode == "token":
            tokens[rows, think_pos + 1 + i] = logits[:, think_pos + i].argmax(-1).cpu()
        else:
            thoughts.append(replace[i] if replace and i in replace else state)
    written = tokens[:, think_pos + 1:think_pos + 1 + n_thoughts].clone()
    if mode == "hidden":
        written[:] = -1
    return Thoughts(torch.stack(states, 1), written, torch.stack(step_logits, 1), answer)


# ----------------------------------------------------------------------------- measurements


def top_hits(scores: Float[Tensor, "n node"], frontier: Bool[Tensor, "n node"]) -> Float[Tensor, "n"]:
    """Per example: how many frontier nodes are among the |frontier| highest-scoring nodes."""
    k = int(frontier.sum(1).max())
    top = scores.topk(k, dim=1).indices
    return frontier.gather(1, top).sum(1).double()


def probe_frontier(states: Float[Tensor, "n d_model"], frontier: Bool[Tensor, "n node"], *, seed: int = 0
                   ) -> tuple[Float[Tensor, "n_test"], Float[Tensor, "n_test"], Float[Tensor, "node"]]:
    """One binary logistic probe per node (`interp.probing.fit`), trained on 75% of the examples.

    Returns per held-out example the frontier nodes recovered in the top-|F| probe scores, the
    same for probes trained on shuffled labels, and each node probe's held-out accuracy."""
    n, n_nodes = frontier.shape
    _, test = split_by_group(torch.arange(n), 0.25, seed)
    feats = states[None].double()
    scores = torch.zeros(2, test.numel(), n_nodes, dtype=torch.float64)
    acc = torch.full((n_nodes,), float("nan"), dtype=torch.float64)
    for j in range(n_nodes):
        label = frontier[:, j].long()
        for k, lab in enumerate((label, shuffled_labels(label, seed=seed + 7 + j))):
            if int(lab.sum()) in (0, n):
                continue  # a node never (or always) in this frontier: nothing to rank it by
            res = fit(feats, lab, "logistic", seed=seed, shuffled=False, n_boot=2)
            logit = feats[0, test] @ res.coef[0].T.double() + res.intercept[0].double()
            scores[k, :, j] = logit[:, -1] - logit[:, 0]
            if k == 0:
                acc[j] = res.value[0]
    truth = frontier[test]
    return top_hits(scores[0], truth), top_hits(scores[1], truth), acc


def entropy_bits(logits: Float[Tensor, "n d_vocab"]) -> Float[Tensor, "n"]:
    lp = logits.double().log_softmax(-1)
    return -(lp.exp() * lp).sum(-1) / math.log(2)


@dataclass(frozen=True)
class StepFinding:
    """Per thought step i (1-based) and model kind: frontier nodes recovered per example."""

    step: int
    model: str
    frontier_size: float
    probe: Estimate
    shuffled: Estimate
    lens: Estimate
    written: Estimate
    entropy: Estimate
    frontier_mass: Estimate


@dataclass(frozen=True)
class ContinuousResult:
    """Superposition, lens, patching and entropy results (see the module docstring).

    `accuracy[kind]`: answer accuracy of each model given; `steps`: one `StepFinding` per
    (step, model); `patch_follow[i]`: share of answers that become the partner's answer when
    thought i + 1 is patched from the partner, `control_keep[i]`: share that keep their answer
    when it is patched from the reordered control; `per_example` keeps the raw values."""

    accuracy: dict[str, Estimate]
    steps: tuple[StepFinding, ...]
    patch_follow: tuple[Estimate, ...]
    patch_control_follow: tuple[Estimate, ...]
    control_keep: tuple[Estimate, ...]
    verdict: Verdict
    n: int
    per_example: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for s in self.steps:
            for what in ("probe", "shuffled", "lens", "written", "entropy", "frontier_mass"):
                e: Estimate = getattr(s, what)
                rows.append({"step": s.step, "model": s.model, "measure": what, "value": e.value,
                             "ci_low": e.low, "ci_high": e.high, "n": self.n})
        for i, (f, c, k) in enumerate(zip(self.patch_follow, self.patch_control_follow, self.control_keep,
                                          strict=True)):
            for what, e in (("patch_follows_partner", f), ("control_follows_partner", c),
                            ("control_keeps_answer", k)):
                rows.append({"step": i + 1, "model": "continuous", "measure": what, "value": e.value,
                             "ci_low": e.low, "ci_high": e.high, "n": self.n})
        for kind, e in self.accuracy.items():
            rows.append({"step": 0, "model": kind, "measure": "accuracy", "value": e.value, "ci_low": e.low,
                         "ci_high": e.high, "n": self.n})
        return pd.DataFrame(rows)

    def plot(self) -> go.Figure:
        """Frontier nodes recovered per step: probe vs shuffled vs lens vs the written token."""
        f = self.to_frame()
        fig = go.Figure()
        for model in ("continuous", "cot"):
            for what in ("probe", "shuffled", "lens", "written"):
                sub = f[(f.model == model) & (f.measure == what)]
                if sub.empty:
                    continue
                fig.add_trace(go.Bar(name=f"{model}: {what}", x=[f"step {s}" for s in sub.step], y=sub.value,
                                     error_y={"type": "data", "symmetric": False,
                                              "array": sub.ci_high - sub.value, "arrayminus": sub.value - sub.ci_low}))
        fig.update_layout(barmode="group", yaxis_title="frontier nodes recovered per example",
                          title="What a continuous thought holds (95% CIs)")
        return fig


def _est(v: Tensor, seed: int) -> Estimate:
    return bootstrap(v.double(), seed=seed)


def continuous_thought(models: dict[str, HookedTransformer], task: ThoughtTask, *, seed: int = 0
                       ) -> ContinuousResult:
    """Run the measurements on ``models["continuous"]`` (hidden rollouts; patching) and/or
    ``models["cot"]`` (greedy token rollouts, probed at the same positions), and on
    ``models["direct"]`` (no steps: the prompt through ``think_pos``, read there)."""
    if not {"continuous", "cot"} & set(models):
        raise ValueError(f"continuous_thought models: expected a 'continuous' and/or a 'cot' entry, got {sorted(models)}")
    k = task.n_thoughts
    node_ids = task.node_ids
    rolls = {}
    if "continuous" in models:
        rolls["continuous"] = rollout_thoughts(models["continuous"], task.tokens, task.think_pos, k, "hidden")
    if "cot" in models:
        rolls["cot"] = rollout_thoughts(models["cot"], task.tokens, task.think_pos, k, "token")
    per: dict[str, Tensor] = {}
    accuracy = {}
    for kind, r in rolls.items():
        per[f"{kind}_correct"] = (r.answer_logits.argmax(-1) == task.answer).double()
        accuracy[kind] = _est(per[f"{kind}_correct"], seed)
    if "direct" in models:
        logits = _logits(run(models["direct"], task.tokens[:, :task.think_pos + 1]))
        per["direct_correct"] = (logits[:, -1].argmax(-1).cpu() == task.answer).double()
        accuracy["direct"] = _est(per["direct_correct"], seed)

    steps = []
    for kind, r in rolls.items():
        for i in range(k):
            fr = task.frontier[:, i + 1]
            probe, shuf, _ = probe_frontier(r.states[:, i], fr, seed=seed)
            lens_scores = (_unembed(models[kind], r.states[:, i]))[:, node_ids]
            lens = top_hits(lens_scores, fr)
            step_probs = r.step_logits[:, i].double().softmax(-1)
            mass = (step_probs[:, node_ids] * fr.double()).sum(1)
            if kind == "cot":
                wrote = fr.gather(1, (r.written[:, i] - int(node_ids[0])).clamp(0, len(node_ids) - 1)[:, None])[:, 0]
                wrote = wrote & (r.written[:, i] >= node_ids[0]) & (r.written[:, i] <= node_ids[-1])
                written = _est(wrote.double(), seed)
            else:
                written = Estimate(float("nan"), float("nan"), float("nan"))
            ent = entropy_bits(r.step_logits[:, i])
            per |= {f"{kind}_probe_{i + 1}": probe, f"{kind}_shuffled_{i + 1}": shuf, f"{kind}_lens_{i + 1}": lens,
                    f"{kind}_entropy_{i + 1}": ent}
            steps.append(StepFinding(step=i + 1, model=kind, frontier_size=float(fr.sum(1).double().mean()),
                                     probe=_est(probe, seed), shuffled=_est(shuf, seed), lens=_est(lens, seed),
                                     written=written, entropy=_est(ent, seed), frontier_mass=_est(mass, seed)))

    follow, control_follow, keep = [], [], []
    cont = models.get("continuous")
    if cont is not None:
        partner = rollout_thoughts(cont, task.partner_tokens, task.think_pos, k, "hidden")
        control = rollout_thoughts(cont, task.control_tokens, task.think_pos, k, "hidden")
    for i in range(k if cont is not None else 0):
        p = rollout_thoughts(cont, task.tokens, task.think_pos, k, "hidden", replace={i: partner.states[:, i]})
        c = rollout_thoughts(cont, task.tokens, task.think_pos, k, "hidden", replace={i: control.states[:, i]})
        f = (p.answer_logits.argmax(-1) == task.partner_answer).double()
        cf = (c.answer_logits.argmax(-1) == task.partner_answer).double()
        kp = (c.answer_logits.argmax(-1) == task.answer).double()
        per |= {f"patch_follows_{i + 1}": f, f"control_follows_{i + 1}": cf, f"control_keeps_{i + 1}": kp}
        follow.append(_est(f, seed))
        control_follow.append(_est(cf, seed))
        keep.append(_est(kp, seed))
    verdict = _verdict(steps, follow, control_follow, accuracy)
    return ContinuousResult(accuracy=accuracy, steps=tuple(steps), patch_follow=tuple(follow),
                            patch_control_follow=tuple(control_follow), control_keep=tuple(keep),
                            verdict=verdict, n=task.n, per_example=per)


def _unembed(model: HookedTransformer, state: Tensor) -> Tensor:
    """The logit lens of a final-norm state: the unembedding alone."""
    with torch.no_grad():
        w = model.unembed.W_U
        return (state.to(w.device, w.dtype) @ w + model.unembed.b_U).double().cpu()


def _verdict(steps: list[StepFinding], follow: list[Estimate], control_follow: list[Estimate],
             accuracy: dict[str, Estimate]) -> Verdict:
    acc = ", ".join(f"{kk} {e.value:.2f}" for kk, e in accuracy.items())
    kind = "continuous" if any(s.model == "continuous" for s in steps) else "cot"
    mine = [s for s in steps if s.model == kind]
    held = [s for s in mine if s.probe.low > s.shuffled.high and s.probe.low > 1.0]
    causal = [i for i, (f, c) in enumerate(zip(follow, control_follow, strict=True)) if f.low > c.high]
    what = "continuous thought" if kind == "continuous" else "token model's state before it writes a step"
    if not held:
        best = max(mine, key=lambda s: s.probe.value)
        return Verdict(False, f"no {what} holds more than one frontier node above the shuffled baseline "
                              f"(best: step {best.step}, {best.probe} vs shuffled {best.shuffled}); accuracy {acc}")
    parts = [f"step {s.step}: {s.probe.value:.2f} of {s.frontier_size:.0f} frontier nodes decodable "
             f"(CI {s.probe.low:.2f}-{s.probe.high:.2f}; shuffled {s.shuffled.value:.2f}"
             + (f"; the written token keeps {s.written.value:.2f})" if kind == "cot" else ")") for s in held]
    tail = ""
    if causal:
        tail = "; patching thought " + ", ".join(str(i + 1) for i in causal) + " from the other root moves the " \
               "answer to the other candidate in " + ", ".join(f"{follow[i].value:.0%}" for i in causal) + \
               " of examples (control " + ", ".join(f"{control_follow[i].value:.0%}" for i in causal) + ")"
    claim = ("continuous thoughts hold the search frontier in superposition" if kind == "continuous" else
             "the token model's state holds the whole frontier where its written token keeps one node")
    return Verdict(True, f"{claim} ({'; '.join(parts)}){tail}; accuracy {acc}")


SHIPPED = ("organism:reach-continuous", "organism:reach-cot")


def run_continuous(spec: str = "organism:reach-continuous", n: int = 1000, seed: int = 1, *,
                   models: dict[str, HookedTransformer] | None = None) -> ContinuousResult:
    """`continuous_thought` on the reach organisms. `spec` is read as a continuous model unless it
    is ``organism:reach-cot`` (a token model); with a shipped reach spec the other shipped reach
    organisms (token CoT, no CoT) are loaded next to it."""
    from interp.models import list_organisms, load_model

    if models is None:
        models = {"cot" if spec == "organism:reach-cot" else "continuous": load_model(spec)}
        if spec in SHIPPED:
            have = set(list_organisms())
            models |= {k: load_model(f"organism:reach-{k}") for k in ("cot", "direct")
                       if k not in models and f"reach-{k}" in have}
    task = reach_inputs(n, seed)
    for kind, m in models.items():
        if m.cfg.d_vocab <= int(task.tokens.max()) or m.cfg.n_ctx < task.tokens.shape[1]:
            raise ValueError(f"continuous ({kind} model {spec!r}): expected a reach-* organism's vocabulary and context "
                             f"(d_vocab > {int(task.tokens.max())}, n_ctx >= {task.tokens.shape[1]}), got d_vocab "
                             f"{m.cfg.d_vocab}, n_ctx {m.cfg.n_ctx}; the investigation needs a task with a known "
                             f"frontier (build a ThoughtTask and call continuous_thought)")
    return continuous_thought(models, task, seed=seed)


__all__ = ["ContinuousResult", "StepFinding", "ThoughtTask", "Thoughts", "continuous_thought", "entropy_bits",
           "probe_frontier", "reach_inputs", "rollout_thoughts", "run_continuous", "top_hits"]
