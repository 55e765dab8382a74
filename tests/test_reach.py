"""The reach organisms: ground truth against a hand BFS, the continuous forward against the
HookedTransformer, and the shipped three-way accuracy table against held-out ground truth."""

from __future__ import annotations

import math

import pytest
import torch

from interp.hypotheses.continuous import reach_inputs, rollout_thoughts
from interp.models import load_model, organisms_dir, read_manifest
from interp.organisms import NAMES
from interp.organisms import reach as R
from interp.organisms.training import init_model
from interp.stats import bootstrap


def _hand_bfs(edges: list[tuple[int, int]], start: int, depth: int) -> list[set[int]]:
    """Breadth-first search written out level by level (an adjacency dict, a visited set)."""
    children: dict[int, list[int]] = {}
    for u, v in edges:
        children.setdefault(u, []).append(v)
    levels, seen = [{start}], {start}
    for _ in range(depth):
        nxt = set()
        for u in levels[-1]:
            for v in children.get(u, []):
                if v not in seen:
                    nxt.add(v)
        seen |= nxt
        levels.append(nxt)
    return levels


def test_generator_frontier_path_and_answer_match_a_hand_bfs():
    d = R.dataset(200, seed=3)
    for i in range(d.n):
        edges = [tuple(e) for e in d.edges[i].tolist()]
        for start, frontier, path in ((int(d.start[i]), d.frontier[i], d.path[i]),
                                      (int(d.distractor_path[i, 0]), d.distractor_frontier[i], d.distractor_path[i])):
            levels = _hand_bfs(edges, start, R.HOPS + 2)
            for depth in range(R.HOPS + 1):
                got = {int(j) + R.NODE0 for j in frontier[depth].nonzero()[:, 0]}
                assert got == levels[depth], (i, depth)
            assert levels[R.HOPS + 1] == set()  # the leaves end the tree
            for a, b in zip(path[:-1].tolist(), path[1:].tolist(), strict=True):
                assert (a, b) in edges
        reach_s = set().union(*_hand_bfs(edges, int(d.start[i]), 12))
        assert int(d.answer[i]) in reach_s and int(d.distractor[i]) not in reach_s
        assert int(d.candidates[i, int(d.label[i])]) == int(d.answer[i])
        assert len({*edges}) == R.N_EDGES and len({x for e in edges for x in e}) == R.USED
    # the library BFS agrees too (it is what the investigation's users call)
    assert R.bfs_frontier([tuple(e) for e in d.edges[0].tolist()], int(d.start[0]), 3) == \
        _hand_bfs([tuple(e) for e in d.edges[0].tolist()], int(d.start[0]), 3)
    # written layout: edge tokens decode to the edges; the cot steps are the path
    tok = R.tokenizer()
    words = tok.decode(d.tokens[0]).split()
    assert words[1:1 + R.N_EDGES] == [f"n{u - 1}>n{v - 1}" for u, v in d.edges[0].tolist()]
    assert d.tokens[0, R.THINK_POS + 1:R.THINK_POS + 1 + R.STEPS].tolist() == d.path[0, 1:R.HOPS].tolist()


def test_partner_and_reordered_keep_the_graph():
    d = R.dataset(50, seed=4)
    p, c = d.partner(), d.reordered(9)
    assert torch.equal(p.answer, d.distractor) and torch.equal(p.partner().answer, d.answer)
    assert torch.equal(c.frontier, d.frontier) and torch.equal(c.answer, d.answer)
    assert not torch.equal(c.edges, d.edges)
    assert {tuple(e) for e in c.edges[0].tolist()} == {tuple(e) for e in d.edges[0].tolist()}


@pytest.mark.parametrize("mode", ["continuous", "cot", "direct"])
def test_fused_rollout_equals_the_hook_path(mode):
    """The organism's fused forward (training and `rollout`) against the HookedTransformer run through
    `interp.hooks.run` (hook_embed replaced at the thought positions): thoughts, steps, answers."""
    model = init_model(R.config(mode), seed=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    data = R.dataset(32, seed=5)
    ours = R.rollout(model, data, mode)
    task = reach_inputs(32, seed=5)
    if mode == "direct":
        ref = model(data.tokens_for("direct"))[:, -1]
        torch.testing.assert_close(ours.answer_logits, ref.detach(), atol=1e-4, rtol=1e-4)
        return
    ref = rollout_thoughts(model, task.tokens, task.think_pos, R.STEPS, "hidden" if mode == "continuous" else "token")
    torch.testing.assert_close(ours.answer_logits, ref.answer_logits, atol=1e-4, rtol=1e-4)
    if mode == "continuous":
        torch.testing.assert_close(ours.thoughts, ref.states, atol=1e-4, rtol=1e-4)
    else:
        assert torch.equal(ours.steps, ref.written)


SHIPPED = tuple(n for n in R.NAMES if n in NAMES)


def test_continuous_curriculum_runs_every_stage():
    """The continuous recipe walks Coconut's stages (0 = token CoT, then 1, then 2 thoughts) and
    leaves an ordinary HookedTransformer whose thoughts the hook path reproduces."""
    model, log = R.train("continuous", steps=9, progress=False)
    assert [log.extra[f"stage{j}_start"] for j in range(R.STEPS + 1)] == R.stage_bounds(9)[:-1]
    assert len(log.loss) == 9
    assert all(math.isfinite(v) for v in log.loss)
    data = R.dataset(8, seed=2)
    ref = rollout_thoughts(model, reach_inputs(8, seed=2).tokens, R.THINK_POS, R.STEPS, "hidden")
    torch.testing.assert_close(R.rollout(model, data, "continuous").answer_logits, ref.answer_logits,
                               atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def three_way():
    missing = [n for n in SHIPPED if not (organisms_dir() / n / "model.safetensors").is_file()]
    if missing:
        pytest.fail(f"reach organisms not shipped: {missing}; train them with `interp organisms train NAME`")
    task = reach_inputs(1000, seed=1)  # the manifests' held-out set (evaluate's n and seed)
    out = {}
    for name in SHIPPED:
        mode = name.removeprefix("reach-")
        model = load_model(f"organism:{name}")
        if mode == "direct":
            pred = model(task.tokens[:, :task.think_pos + 1])[:, -1].argmax(-1)
        else:
            pred = rollout_thoughts(model, task.tokens, task.think_pos, R.STEPS,
                                    "hidden" if mode == "continuous" else "token").answer_logits.argmax(-1)
        out[mode] = (pred == task.answer).double()
    return out


def test_three_way_table_matches_held_out_ground_truth(three_way):
    """Accuracies recomputed through the hook path on the ground-truth answers equal the manifests'
    (the organisms' own evaluate, fused forward); matched steps; continuous > token CoT > no CoT."""
    est = {m: bootstrap(v, seed=1) for m, v in three_way.items()}
    for name in SHIPPED:
        mode = name.removeprefix("reach-")
        m = read_manifest(f"organism:{name}")
        assert m["metrics"]["n_eval"] == 1000 and m["metrics"]["eval_seed"] == 1
        assert abs(m["metrics"]["accuracy"] - est[mode].value) < 1e-9, (name, m["metrics"]["accuracy"], est[mode])
        assert m["steps"] == R.DEFAULT_STEPS and m["accepted"]
    assert est["cot"].low > est["direct"].high
    assert est["direct"].low < 0.5 < est["direct"].high  # no CoT: chance between the two candidates
    assert est["continuous"].low > est["direct"].high  # the acceptance: continuous beats no CoT
    assert est["continuous"].low > est["cot"].high  # and token CoT, at the same 2 steps
