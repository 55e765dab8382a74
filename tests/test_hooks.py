"""The intervention API: effects checked against hand-written TransformerLens hooks; cleanup."""

from __future__ import annotations

import pytest
import torch

from interp.graph import Node
from interp.hooks import (
    Add,
    Capture,
    HookError,
    Map,
    Patch,
    Scale,
    Set,
    Zero,
    ablation,
    intervene,
    resolve_hooks,
    run,
    run_with_interventions,
)
from interp.tl import is_native


def _n_hooks(model) -> int:
    return sum(len(hp.fwd_hooks) for hp in model.hook_dict.values())


def test_unknown_hook_lists_closest(gpt2_model):
    with pytest.raises(HookError, match="closest.*blocks.1.hook_resid_post"):
        resolve_hooks(gpt2_model, ["blocks.1.hook_resid_pst"])
    with pytest.raises(HookError, match="no match"):
        resolve_hooks(gpt2_model, ["blocks.*.hook_nothing"])
    assert resolve_hooks(gpt2_model, "blocks.*.hook_resid_pre", layers=[0, 2]) == [
        "blocks.0.hook_resid_pre", "blocks.2.hook_resid_pre"]
    with pytest.raises(HookError, match=r"expected values in \[0, 3\)"):
        resolve_hooks(gpt2_model, "blocks.*.hook_resid_pre", layers=[5])


def test_node_head_zero_matches_manual_hook(any_model, tokens):
    def manual(z, hook):
        z = z.clone()
        z[:, 4, 1] = 0
        return z

    want = any_model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", manual)])
    got, _ = run_with_interventions(any_model, tokens, [Zero(Node(1, "head", pos=4, head=1))])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_set_add_scale_compose_in_order(gpt2_model, tokens):
    v = torch.randn(32)

    def manual(x, hook):
        x = x.clone()
        x[:, 2] = 0.5
        x[:, 2] += v
        x[:, 2] *= 3.0
        return x

    want = gpt2_model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", manual)])
    ivs = [Set("blocks.0.hook_resid_post", pos=2, value=0.5), Add("blocks.0.hook_resid_post", pos=2, value=v),
           Scale("blocks.0.hook_resid_post", pos=2, factor=3.0)]
    got, _ = run_with_interventions(gpt2_model, tokens, ivs)
    torch.testing.assert_close(got, want)


def test_patch_from_cache_and_capture_same_pass(any_model, tokens):
    other = torch.flip(tokens, dims=[0])
    clean_logits, clean_cache = any_model.run_with_cache(other)
    with intervene(any_model, [Patch(Node(0, "resid_pre"), source=clean_cache)],
                   capture=["blocks.2.hook_resid_post"]) as run:
        logits = any_model(tokens)
    # patching the whole residual stream at layer 0 reproduces the other run exactly
    torch.testing.assert_close(logits, clean_logits)
    torch.testing.assert_close(run.captured["blocks.2.hook_resid_post"], clean_cache["blocks.2.hook_resid_post"])


def test_kv_group_patch_on_grouped_model(llama_model, tokens):
    other = torch.flip(tokens, dims=[0])
    _, cache = llama_model.run_with_cache(other)
    with pytest.raises(HookError, match=r"KV group expected in \[0, 2\)"):
        run_with_interventions(llama_model, tokens, [Patch(Node(1, "k", head=2), source=cache)])
    got, _ = run_with_interventions(llama_model, tokens, [Patch(Node(1, "v", head=1, pos=3), source=cache)])

    def manual(v, hook):
        v = v.clone()
        v[:, 3, 1] = cache["blocks.1.attn.hook_v"][:, 3, 1]
        return v

    want = llama_model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_v", manual)])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_mean_and_resample_ablation(gpt2_model, tokens):
    _, ref = gpt2_model.run_with_cache(tokens)
    act = ref["blocks.1.hook_attn_out"]
    mean_iv = ablation("mean", "blocks.1.hook_attn_out", reference=act)
    _, cap = run_with_interventions(gpt2_model, tokens, [mean_iv], capture=["blocks.1.hook_attn_out"])
    torch.testing.assert_close(cap["blocks.1.hook_attn_out"], act.mean(0, keepdim=True).expand_as(act))
    rs = ablation("resample", "blocks.1.hook_attn_out", reference=act, seed=3)
    _, cap = run_with_interventions(gpt2_model, tokens, [rs], capture=["blocks.1.hook_attn_out"])
    rows = torch.randint(0, act.shape[0], (act.shape[0],), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(cap["blocks.1.hook_attn_out"], act[rows])


def test_hooks_removed_when_hook_or_body_raises(gpt2_model, tokens):
    before = _n_hooks(gpt2_model)
    bad = Patch("blocks.0.hook_resid_pre", source=torch.zeros(1, 2, 3))
    with pytest.raises(HookError, match="expected a source of shape"):
        run_with_interventions(gpt2_model, tokens, [bad])
    assert _n_hooks(gpt2_model) == before
    with pytest.raises(RuntimeError, match="metric failed"):
        with intervene(gpt2_model, [Zero("blocks.0.hook_attn_out")]):
            gpt2_model(tokens)
            raise RuntimeError("metric failed")
    assert _n_hooks(gpt2_model) == before
    # and the model computes exactly as before
    clean = gpt2_model(tokens)
    torch.testing.assert_close(gpt2_model(tokens), clean, rtol=0, atol=0)


def test_hook_that_never_fired_raises(gpt2_model, tokens):
    with pytest.raises(HookError, match="never firing"):
        with intervene(gpt2_model, [Zero("blocks.2.hook_resid_post")]):
            gpt2_model(tokens, stop_at_layer=1)


def test_block_attention_matches_masked_pattern(any_model, tokens):
    from interp.hooks import block_attention

    # knocking out every earlier key of the last query at layer 1 leaves it attending only to itself
    _, cap = run_with_interventions(any_model, tokens, [block_attention(1, -1, list(range(9)))],
                                    capture=["blocks.1.attn.hook_pattern"])
    pattern = cap["blocks.1.attn.hook_pattern"]
    torch.testing.assert_close(pattern[:, :, -1, -1], torch.ones_like(pattern[:, :, -1, -1]))
    # blocking a subset renormalises the rest: compare with a hand-masked softmax of the clean scores
    _, ref = any_model.run_with_cache(tokens)
    # TL's own cache on a native bridge (the TL 4 organisms) holds the pattern at hook_attn_scores;
    # its log is the scores up to a per-row constant, which the softmax ignores
    scores = (ref["blocks.1.attn.hook_pattern"].log() if is_native(any_model)
              else ref["blocks.1.attn.hook_attn_scores"])[:, :, 6].clone()
    scores[..., [2, 4]] = float("-inf")
    _, cap = run_with_interventions(any_model, tokens, [block_attention(1, 6, [2, 4])],
                                    capture=["blocks.1.attn.hook_pattern"])
    torch.testing.assert_close(cap["blocks.1.attn.hook_pattern"][:, :, 6], scores.softmax(-1))
    with pytest.raises(HookError, match="causal"):
        block_attention(0, 3, [5])


# ------------------------------------------------------------------------- the one run path (run)

@pytest.mark.parametrize("side", ["left", "right"])
def test_run_on_padded_prompts_equals_each_prompt_alone(any_model, side):
    from interp.prompts import Prompts

    seqs = [[5, 9, 2, 11, 3], [7, 3], [1, 2, 3, 4, 5, 6, 8]]
    p = Prompts.from_tokens(seqs, spans={"x": [1, 0, 4]}, side=side, pad_id=0)
    v = torch.linspace(-1, 1, any_model.cfg.d_model)
    edits = [Add(Node(1, "resid_pre", pos=1), value=v), Zero(Node(0, "head", head=2))]
    idx = p.index("x")[:, None]
    out = run(any_model, p, edits=edits, captures=[Capture(Node(2, "resid_post"), idx), "blocks.0.attn.hook_v"])
    assert out.prompts.side == "right" and torch.equal(out.prompts.lengths, p.lengths)  # rows never reorder
    for i, s in enumerate(seqs):
        alone = torch.tensor([s])

        def add(act, hook):
            act = act.clone()
            act[:, 1] += v
            return act

        def zero(z, hook):
            z = z.clone()
            z[:, :, 2] = 0
            return z

        hooks = [("blocks.1.hook_resid_pre", add), ("blocks.0.attn.hook_z", zero)]
        with any_model.hooks(fwd_hooks=hooks):
            logits, cache = any_model.run_with_cache(alone)
        n = len(s)
        torch.testing.assert_close(out.logits[i, :n], logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.acts["blocks.2.hook_resid_post"][i, 0],
                                   cache["blocks.2.hook_resid_post"][0, int(idx[i])], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.acts["blocks.0.attn.hook_v"][i, :n], cache["blocks.0.attn.hook_v"][0],
                                   atol=1e-5, rtol=1e-5)


def test_run_stops_early_keeps_grad_and_checks_values(gpt2_model, tokens):
    before = _n_hooks(gpt2_model)
    out = run(gpt2_model, tokens, captures=["blocks.0.hook_resid_post"], logits=False)
    assert out.logits is None
    _, ref = gpt2_model.run_with_cache(tokens)
    assert torch.equal(out.acts["blocks.0.hook_resid_post"], ref["blocks.0.hook_resid_post"])
    # Map: any differentiable function; grad=True keeps captures in the graph
    g = run(gpt2_model, tokens, edits=[Map(Node(0, "resid_post"), fn=lambda x: 2 * x)],
            captures=[Capture(Node(0, "resid_post"), grad=True)], grad=True)
    (grad,) = torch.autograd.grad(g.logits.sum(), g.acts["blocks.0.hook_resid_post"])
    assert grad.shape == ref["blocks.0.hook_resid_post"].shape and bool(grad.abs().sum() > 0)
    torch.testing.assert_close(g.acts["blocks.0.hook_resid_post"].detach(), 2 * ref["blocks.0.hook_resid_post"])
    with pytest.raises(HookError, match="never firing"):
        run(gpt2_model, tokens, captures=["blocks.2.hook_resid_post"], stop_at_layer=1, logits=False)
    with pytest.raises(HookError, match="expected fn to return shape"):
        run(gpt2_model, tokens, edits=[Map("blocks.0.hook_resid_post", fn=lambda x: x[:, :1])])
    with pytest.raises(ValueError, match=r"run: expected finite activations, got NaN/Inf at blocks.1.hook_resid_post in rows \[2\]"):
        nan = torch.zeros(3, 10, gpt2_model.cfg.d_model)
        nan[2, 4, 0] = float("nan")
        run(gpt2_model, tokens, edits=[Map("blocks.0.hook_resid_post", fn=lambda x: x + nan)],
            captures=["blocks.1.hook_resid_post"])
    assert _n_hooks(gpt2_model) == before  # every hook removed, also after the errors


@pytest.mark.parametrize("side", ["left", "right"])
def test_per_example_knockout_equals_each_prompt_knocked_out_alone(any_model, side):
    from interp.hooks import block_attention
    from interp.prompts import Prompts

    seqs = [[5, 9, 2, 11, 3], [7, 3, 4], [1, 2, 3, 4, 5, 6, 8]]
    p = Prompts.from_tokens(seqs, side=side, pad_id=0)
    last = p.index("last")
    sources = torch.zeros(3, 7, dtype=torch.bool)
    sources[0, [0, 2]] = sources[1, 1] = sources[2, [3, 4, 5]] = True
    out = run(any_model, p, edits=[block_attention(1, last, sources), block_attention(2, last, sources, head=1)])
    for i, s in enumerate(seqs):
        keys = torch.nonzero(sources[i])[:, 0].tolist()
        ref, _ = run_with_interventions(any_model, torch.tensor([s]), [block_attention(1, len(s) - 1, keys),
                                                                      block_attention(2, len(s) - 1, keys, head=1)])
        torch.testing.assert_close(out.logits[i, : len(s)], ref[0], atol=1e-5, rtol=1e-5)
        clean = any_model(torch.tensor([s]))[0, -1]
        assert float((out.logits[i, len(s) - 1] - clean).abs().max()) > 1e-3  # the knockout did something
    with pytest.raises(HookError, match="causal"):
        block_attention(0, torch.tensor([1, 0, 0]), sources[:, :3] | True)


def test_set_at_writes_each_examples_own_position(gpt2_model):
    # SetAt at per-example positions == Set at that position on each prompt alone
    from interp.hooks import Set, SetAt

    toks = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(5))
    index = torch.tensor([1, 4, 6])
    values = torch.randn(3, 32, generator=torch.Generator().manual_seed(6))
    name = "blocks.1.hook_resid_pre"
    with torch.inference_mode(), intervene(gpt2_model, [SetAt(name, index=index, values=values)]):
        got = gpt2_model(toks)
    for i in range(3):
        with torch.inference_mode(), intervene(gpt2_model, [Set(name, pos=int(index[i]), value=values[i])]):
            want = gpt2_model(toks[i:i + 1])
        torch.testing.assert_close(got[i:i + 1], want, atol=1e-5, rtol=1e-5)
