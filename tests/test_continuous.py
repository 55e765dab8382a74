"""What a continuous thought holds: the measurement pieces against planted truth and closed forms,
the hook-path rollouts against plain forwards on both model families, and the shipped reach
organisms' superposition and patching results."""

from __future__ import annotations

import math

import pytest
import torch

from interp.arch import is_bridge
from interp.hypotheses.continuous import (
    entropy_bits,
    probe_frontier,
    rollout_thoughts,
    run_continuous,
    top_hits,
)
from interp.models import organisms_dir


def test_top_hits_counts_frontier_nodes_among_the_top_scores():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.9, 0.1, 0.8, 0.0], [0.0, 0.1, 0.8, 0.9]])
    frontier = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert top_hits(scores, frontier).tolist() == [2.0, 1.0, 0.0]


def test_entropy_bits_matches_torch_distributions():
    logits = torch.randn(6, 11, generator=torch.Generator().manual_seed(0))
    ref = torch.distributions.Categorical(logits=logits.double()).entropy() / math.log(2)
    torch.testing.assert_close(entropy_bits(logits), ref)


def _planted(n: int, seed: int, both: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Two frontier nodes of 8 per example; the features embed both (or only the first) with noise."""
    g = torch.Generator().manual_seed(seed)
    pairs = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(n)])
    frontier = torch.zeros(n, 8, dtype=torch.bool)
    frontier[torch.arange(n)[:, None], pairs] = True
    held = frontier.clone() if both else torch.zeros_like(frontier).scatter(1, pairs[:, :1], True)
    proj = torch.randn(8, 24, generator=g)
    return held.float() @ proj + 0.3 * torch.randn(n, 24, generator=g), frontier


def test_frontier_probe_recovers_planted_superposition_and_not_shuffled_labels():
    x, fr = _planted(400, 0, both=True)
    got, shuffled, acc = probe_frontier(x, fr, seed=0)
    assert got.mean() > 1.9 and float(acc.min()) > 0.95
    assert shuffled.mean() < 0.8  # chance is 2 * 2 / 8 = 0.5
    one, _, _ = probe_frontier(*_planted(400, 1, both=False), seed=0)
    assert 0.9 < one.mean() < 1.3  # a state holding one node gives one node, not two


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rollouts_on_both_families_equal_plain_forwards(family, gpt2_model, llama_model):
    model = gpt2_model if family == "gpt2" else llama_model
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.cfg.d_vocab, (5, 11), generator=g)
    think_pos, k = 8, 2
    # token mode: the greedy chain written with plain forwards
    ref = tokens.clone()
    with torch.no_grad():
        for i in range(k):
            ref[:, think_pos + 1 + i] = model(ref)[:, think_pos + i].argmax(-1)
        ref_logits = model(ref)[:, -1]
    tok = rollout_thoughts(model, tokens, think_pos, k, "token")
    assert torch.equal(tok.written, ref[:, think_pos + 1:think_pos + 1 + k])
    torch.testing.assert_close(tok.answer_logits, ref_logits, atol=1e-4, rtol=1e-4)
    # hidden mode: the thoughts fed through the embedding input by hand (forward from resid_pre 0)
    hid = rollout_thoughts(model, tokens, think_pos, k, "hidden")
    with torch.no_grad():
        def final_norm_states(embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if is_bridge(model):  # TL 4's native model: input embeddings in, it adds its own positions
                got = {}
                logits = model.run_with_hooks(embeds, fwd_hooks=[("ln_final.hook_out",
                                                                  lambda a, hook: got.setdefault("normed", a))])
                return got["normed"], logits
            x = embeds + (model.pos_embed(tokens) if model.cfg.positional_embedding_type == "standard" else 0)
            resid = model(x, start_at_layer=0, stop_at_layer=model.cfg.n_layers)
            normed = model.ln_final(resid)
            return normed, model.unembed(normed)
        emb = model.embed(tokens)
        for i in range(k):
            normed, _ = final_norm_states(emb)
            emb = emb.clone()
            emb[:, think_pos + 1 + i] = normed[:, think_pos + i]
        normed, logits = final_norm_states(emb)
    torch.testing.assert_close(hid.answer_logits, logits[:, -1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hid.states[:, 1], emb[:, think_pos + 2], atol=1e-4, rtol=1e-4)
    # patching a thought with itself changes nothing
    same = rollout_thoughts(model, tokens, think_pos, k, "hidden", replace={0: hid.states[:, 0]})
    torch.testing.assert_close(same.answer_logits, hid.answer_logits)


@pytest.fixture(scope="module")
def result():
    missing = [n for n in ("reach-continuous", "reach-cot", "reach-direct")
               if not (organisms_dir() / n / "model.safetensors").is_file()]
    if missing:
        pytest.fail(f"reach organisms not shipped: {missing}; train them with `interp organisms train NAME`")
    return run_continuous("organism:reach-continuous", n=400, seed=11)


def test_continuous_thoughts_hold_several_frontier_nodes_above_shuffled(result):
    """Superposition (Zhu et al. 2025): each thought holds more than one node of its frontier (probe
    above shuffled labels), more than the token model's state after it committed to one node."""
    cont = {s.step: s for s in result.steps if s.model == "continuous"}
    cot = {s.step: s for s in result.steps if s.model == "cot"}
    for step in (1, 2):
        s = cont[step]
        assert s.frontier_size == 2
        assert s.probe.low > s.shuffled.high and s.probe.low > 1.5, s
        assert s.lens.low > 1.5  # the logit lens of the thought ranks the frontier on top too
    assert cont[2].probe.low > cot[2].probe.high  # after a written step the token state keeps less
    assert result.verdict.supported and "superposition" in result.verdict.sentence


def test_patching_a_thought_from_the_other_root_moves_the_answer(result):
    """Ground truth: thought i of the partner (same graph, other root) holds the other tree's
    frontier, so the answer becomes the other candidate; the same example with its edges
    reordered (same frontier) keeps its answer."""
    for i in range(2):
        assert result.patch_follow[i].low > result.patch_control_follow[i].high
        assert result.patch_follow[i].value > 0.9 and result.control_keep[i].value > 0.9


def test_token_state_holds_the_frontier_its_written_token_drops(result):
    """What a sampled token discards: before writing step 1 the token model's state holds both
    depth-1 frontier nodes (probe, above shuffled labels) and its distribution spreads over them;
    the token it writes keeps one."""
    s = {x.step: x for x in result.steps if x.model == "cot"}
    assert s[1].frontier_size == 2
    assert s[1].probe.low > s[1].shuffled.high and s[1].probe.low > 1.5, s[1]
    assert s[1].written.high <= 1.0 and s[1].written.low > 0.95  # a written node, from the frontier
    assert s[1].entropy.low > 0.3 and s[1].frontier_mass.low > 0.95  # the choice is spread over the frontier
    assert s[2].probe.low > s[2].shuffled.high
    assert result.verdict.supported
    assert result.accuracy["cot"].low > result.accuracy["direct"].high


def test_report_section_and_cli_run(result, tmp_path):
    from typer.testing import CliRunner

    from interp.cli_run import app
    from interp.report import QUESTIONS, continuous_section

    s = continuous_section(result)
    assert s.supported and "superposition" in s.verdict
    probe_cells = s.summary[s.summary.model == "continuous"]["probe (nodes)"].tolist()
    cont = [x for x in result.steps if x.model == "continuous"]
    assert f"{cont[0].probe.value:.3f}" in probe_cells[0]  # the table shows the measured numbers
    out = tmp_path / "continuous.html"
    question = QUESTIONS["continuous"].split("(")[0]
    res = CliRunner().invoke(app, ["continuous", "--n", "120", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert question in out.read_text()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hidden_rollout_equals_interp_rollout(family, gpt2_model, llama_model):
    """The investigation's rollouts against the toolkit's generic `interp.rollout.rollout` (KV-cached):
    the same thoughts fed at the same positions give the same answer logits, tokens the same chain."""
    from interp.rollout import rollout

    model = gpt2_model if family == "gpt2" else llama_model
    tokens = torch.randint(0, model.cfg.d_vocab, (4, 11), generator=torch.Generator().manual_seed(3))
    think_pos, k = 8, 2
    ours = rollout_thoughts(model, tokens, think_pos, k, "hidden")
    ref = rollout(model, tokens[:, :think_pos + 1], k, mode="hidden")
    torch.testing.assert_close(ours.states, ref.inputs.float().cpu(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.answer_logits, ref.final_logits.float().cpu(), atol=1e-4, rtol=1e-4)
    tok = rollout_thoughts(model, tokens, think_pos, k, "token")
    ref_tok = rollout(model, tokens[:, :think_pos + 1], k, mode="token")
    assert torch.equal(tok.written, ref_tok.tokens.cpu())
