"""Declared circuits and the discovery leaderboard: ROC AUC against scikit-learn, precision at k
by hand, per-example effects against one-prompt-at-a-time calls, every declared edge re-measured
on fresh prompts (and a sample of undeclared ones), and the leaderboard on the induction organism
against its known mechanism."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from sklearn.metrics import roc_auc_score

from interp import circuits as C
from interp.models import load_model

# ------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("seed", range(6))
def test_roc_auc_matches_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    m = 40 + 10 * seed
    labels = torch.rand(m, generator=g) < 0.3
    labels[0], labels[1] = True, False
    scores = torch.randint(0, 6, (m,), generator=g).double() if seed % 2 else torch.randn(m, generator=g)
    assert C.roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)


def test_roc_auc_needs_both_classes():
    with pytest.raises(ValueError, match="expected both positives and negatives"):
        C.roc_auc(torch.ones(3), torch.ones(3, dtype=torch.bool))


def test_precision_at_k_by_hand():
    labels = torch.tensor([True, False, True, False, False])
    assert C.precision_at_k(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), labels) == 0.5  # top 2: T, F
    assert C.precision_at_k(torch.tensor([5.0, 1.0, 4.0, 2.0, 0.0]), labels) == 1.0
    # a three-way tie for the 2nd place holding one positive of three: 1 + 1/3 hits in 2
    assert C.precision_at_k(torch.tensor([5.0, 3.0, 3.0, 3.0, 0.0]), labels) == pytest.approx((1 + 1 / 3) / 2)


def test_split_shares_by_hand():
    shares = torch.tensor([0.9, 0.01, 0.85, 0.03, -0.6, 0.0])
    keep, declared, undeclared = C.split_shares(shares)
    assert keep.tolist() == [True, False, True, False, True, False]
    assert declared == pytest.approx(0.3) and undeclared == pytest.approx(0.06)


def test_same_circuit_maps_permuted_heads():
    def circuit(h0, h1):
        return C.Circuit(organism="x", edges=(C.DeclaredEdge(layer=0, head=h0, query="B", key="A", share=0.9),
                                              C.DeclaredEdge(layer=1, head=h1, query="last", key="B", share=0.9)))

    assert C.same_circuit(circuit(2, 1), circuit(0, 3)) == {(0, 0): 2, (1, 3): 1}
    other = C.Circuit(organism="x", edges=(C.DeclaredEdge(layer=0, head=0, query="B", key="B", share=0.9),
                                           C.DeclaredEdge(layer=1, head=3, query="last", key="B", share=0.9)))
    assert C.same_circuit(circuit(2, 1), other) is None


# -------------------------------------------------------------------- per-example effects


@pytest.mark.parametrize("how", ["noising", "denoising", "knockout"])
def test_per_example_effects_equal_one_prompt_calls(how):
    """The recording metric's per-example values from one batched call equal the method run on
    each prompt alone (an independent computation through the public API)."""
    from interp.organisms import induction

    model = load_model("organism:induction")
    prompts = induction.circuit_prompts(3, seed=5)
    edges = [C.AttentionEdge(0, 0, prompts.roles["B"], prompts.roles["A"]),
             C.AttentionEdge(1, 2, prompts.roles["last"], prompts.roles["B"])]
    batched = C.edge_effects(model, prompts, edges, how=how)
    for i in range(3):
        alone = C.edge_effects(model, prompts.rows(torch.tensor([i])), edges, how=how)
        torch.testing.assert_close(batched[i], alone[0], atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------- declared circuits

def _edges_not_declared(model, prompts, circuit, k, seed):
    truth = circuit.attention_edges(prompts)
    rest = [e for e in C.candidate_edges(model, prompts) if e not in truth]
    g = torch.Generator().manual_seed(seed)
    return [rest[i] for i in torch.randperm(len(rest), generator=g)[:k].tolist()]


@pytest.mark.parametrize("name", C.CIRCUIT_ORGANISMS)
def test_declared_edges_matter_and_undeclared_do_not(name):
    """Each declared edge, ablated alone (noising path patching) on fresh prompts, moves the
    metric by at least the manifest's stated share of the clean-corrupt gap; a random sample of
    undeclared candidate edges moves it by less than the stated undeclared share."""
    model = load_model(f"organism:{name}")
    circuit = C.circuit_of(name)
    prompts = C.prompts_of(name, 48, seed=4242)
    declared = sorted(circuit.attention_edges(prompts), key=lambda e: (e.layer, e.head, e.query, e.key))
    others = _edges_not_declared(model, prompts, circuit, 12, seed=0)
    shares = C.edge_shares(model, prompts, declared + others)
    inside, outside = shares[:len(declared)].abs(), shares[len(declared):].abs()
    assert bool((inside >= circuit.declared_share).all()), (declared, inside, circuit.declared_share)
    assert bool((outside < circuit.undeclared_share).all()), (others, outside, circuit.undeclared_share)


def test_induction_circuit_is_the_textbook_one():
    """The declared circuit of `induction` is the known mechanism: the best previous-token head
    reads A from B, and the best induction head reads B from the last position (its key at the
    source position carries the previous-token information)."""
    from interp.models import read_manifest
    from interp.organisms import induction

    metrics = read_manifest("organism:induction")["metrics"]
    prev, ind = tuple(metrics["prev_token_head"]), tuple(metrics["induction_head"])
    edges = {(e.layer, e.head, e.query, e.key) for e in C.circuit_of("induction").edges}
    assert (prev[0], prev[1], "B", "A") in edges and (ind[0], ind[1], "last", "B") in edges
    assert induction.circuit_prompts(2, 0).roles["B"] == induction.circuit_prompts(2, 0).roles["A"] + 1


# ---------------------------------------------------------------------------- leaderboard

def test_score_on_induction():
    """Exact path patching recovers the induction circuit (AUC 1 on this clean two-edge circuit,
    far above random rankings); the result is tidy and plots."""
    s = C.score("path-patching", "induction", n=16, n_boot=3, n_random=200)
    assert s.level == "edge" and int(s.positive.sum()) == len(C.circuit_of("induction").edges)
    assert float(s.auc[0]) >= 0.9 and abs(float(s.baseline_auc.mean()) - 0.5) < 0.1
    f = s.to_frame()
    assert set(f.columns) >= {"value", "ci_low", "ci_high", "n", "organism", "method", "statistic", "ranking"}
    row = f[(f["statistic"] == "auc") & (f["ranking"] == "path-patching")].iloc[0]
    assert row["ci_low"] <= row["value"] + 1e-9 and row["n"] == 16
    assert C.roc_auc(s.scores, s.positive) == pytest.approx(float(s.auc[0]))
    assert len(s.plot().data) == 2


def test_node_methods_on_induction():
    for method in ("activation-patching", "attribution-patching"):
        s = C.score(method, "induction", n=16, n_boot=2, n_random=100)
        assert s.level == "node" and float(s.auc[0]) >= 0.8, (method, float(s.auc[0]))


def test_score_rejects_unknown_method():
    with pytest.raises(ValueError, match="method: expected one of"):
        C.score("acdc", "induction")


def test_circuits_help_imports_no_torch():
    probe = ("import runpy, sys\nsys.argv = ['interp', 'circuits', 'score', '--help']\ntry:\n"
             "    runpy.run_module('interp.cli', run_name='__main__')\nexcept SystemExit as e:\n"
             "    assert e.code in (0, None), e.code\n"
             "print(sorted(m for m in ('torch', 'transformer_lens', 'pandas', 'plotly') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]" and "--method" in res.stdout


def test_circuits_score_cli_prints_the_tidy_frame():
    import json

    from typer.testing import CliRunner

    from interp.cli_circuits import app

    res = CliRunner().invoke(app, ["score", "--method", "path-patching", "--organism", "induction", "--n", "8",
                                   "--boot", "2", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    auc = [r for r in rows if r["statistic"] == "auc" and r["ranking"] == "path-patching"]
    assert len(auc) == 1 and auc[0]["organism"] == "induction" and auc[0]["value"] >= 0.9 and auc[0]["n"] == 8
    bad = CliRunner().invoke(app, ["score", "--method", "acdc"])
    assert bad.exit_code != 0 and "expected one of" in str(bad.exception)
