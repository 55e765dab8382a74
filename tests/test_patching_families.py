"""The patching engine on every Hugging Face family of tests/hf_zoo.py (TransformerBridge): each
method against a per-cell `run_with_hooks` reference on the same Bridge, and the partial
forwards the engine runs from a middle layer against the full forward (soft-capping, sliding
windows, parallel attention + MLP, partial rotary, GQA, q/k/v biases)."""

from __future__ import annotations

import pytest
import torch
from hf_zoo import VOCAB

from interp.arch import Arch, Packing, block_inputs, can_pack, can_skip_prefix, forward_from, forward_packed
from interp.graph import Node
from interp.patching import attribute, knockout, kv_patch, logit_diff, path_patch, sweep
from interp.tl import patching as tlp

ATOL = 1e-4


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    clean = torch.randint(3, VOCAB, (2, 7), generator=g)  # 7 > the zoo's sliding window of 4
    corrupt = clean.clone()
    corrupt[:, 1] = (clean[:, 1] - 3 + 17) % (VOCAB - 3) + 3
    corrupt[:, 3] = (clean[:, 3] - 3 + 29) % (VOCAB - 3) + 3
    return clean, corrupt


def _metric():
    return logit_diff(torch.tensor([5, 9]), torch.tensor([7, 20]), pos=-1)


def _cache(model, tokens, **kw):
    with torch.inference_mode():
        return model.run_with_cache(tokens, **kw)[1]


def test_partial_forward_from_every_layer_is_exact(bridge_model, family, pair):
    model = bridge_model(family)
    clean, _ = pair
    with torch.inference_mode(), block_inputs(model) as rec:
        full, cache = model.run_with_cache(clean)
    for start in range(Arch.of(model).n_layers):
        got = forward_from(model, cache[Node(start, "resid_pre").hook_name].repeat(2, 1, 1), start, inputs=rec)
        torch.testing.assert_close(got, full.repeat(2, 1, 1), atol=1e-6, rtol=0)


def test_partial_forward_on_later_positions_reads_the_recorded_keys(bridge_model, family, pair):
    """Positions p0.. from layer l, the keys/values of positions < p0 from the recorded run (what
    lets a sweep skip the unchanged prefix), equal the full forward's logits there."""
    model = bridge_model(family)
    clean, _ = pair
    with torch.inference_mode(), block_inputs(model, kv=True) as rec:
        full, cache = model.run_with_cache(clean)
    assert can_skip_prefix(model, rec)
    for start in range(Arch.of(model).n_layers):
        for p0 in (1, 4, 6):
            resid = cache[Node(start, "resid_pre").hook_name][:, p0:].repeat(3, 1, 1)
            got = forward_from(model, resid, start, inputs=rec, p0=p0)
            torch.testing.assert_close(got, full[:, p0:].repeat(3, 1, 1), atol=1e-5, rtol=0)


def test_packed_replay_equals_each_copy_replayed_from_its_first_position(bridge_model, family, pair):
    """Copies that start at different positions, laid end to end in one pass (`forward_packed`:
    a packed attention mask over the recorded keys and each copy's own), give what each copy's
    replay from its own first position gives; each copy's input is changed at its first position."""
    model = bridge_model(family)
    clean, _ = pair
    with torch.inference_mode(), block_inputs(model, kv=True) as rec:
        _, cache = model.run_with_cache(clean)
    n_layers = Arch.of(model).n_layers
    assert can_pack(model, rec)  # (GPT-2 records no mask: its attention builds a causal one, passed explicitly here)
    firsts, width = [4, 0, 5, 1], clean.shape[1]
    index = torch.tensor([[6, 5], [5, 6]])  # per example, the positions read (>= every first)
    g = torch.Generator().manual_seed(0)
    for start in range(n_layers):
        base = cache[Node(start, "resid_pre").hook_name]
        copies = []
        for f in firsts:
            x = base.clone()
            x[:, f] += torch.randn(x.shape[0], x.shape[-1], generator=g)
            copies.append(x)
        packing = Packing.of(firsts, width)
        got = forward_packed(model, packing.pack(torch.stack(copies), copy_axis=True), start, packing, index,
                             inputs=rec)
        for c, f in enumerate(firsts):
            want = forward_from(model, copies[c][:, f:], start, index=index - f, inputs=rec, p0=f)
            torch.testing.assert_close(got[c * 2:(c + 1) * 2], want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"index of positions in \[5, 7\)"):  # copy 2 does not compute position 3
        forward_packed(model, packing.pack(torch.stack(copies), copy_axis=True), 0, packing, torch.tensor([[3, 6], [6, 6]]),
                       inputs=rec)


@pytest.mark.parametrize("site,tl_fn", [("resid_pre", tlp.get_act_patch_resid_pre),
                                        ("head", tlp.get_act_patch_attn_head_out_by_pos),
                                        ("mlp_out", tlp.get_act_patch_mlp_out)])
def test_sweep_matches_per_cell_hook_patching(bridge_model, family, pair, site, tl_fn):
    model = bridge_model(family)
    clean, corrupt = pair
    metric = _metric()
    ours = sweep(model, clean, corrupt, metric, site=site)
    ref = tl_fn(model, corrupt, _cache(model, clean), metric)
    torch.testing.assert_close(ours.values, ref.double(), atol=ATOL, rtol=0)
    assert float((ref - ours.corrupt_metric).abs().max()) > 1e-3  # some cell has an effect


def test_kv_patch_matches_per_cell_hook_patching(bridge_model, family, pair):
    model = bridge_model(family)
    arch = Arch.of(model)
    clean, corrupt = pair
    metric = _metric()
    ours = kv_patch(model, clean, corrupt, metric)
    assert ours.values.shape == (arch.n_layers, clean.shape[1], arch.n_kv_heads)
    cache = _cache(model, clean)
    for layer, pos, g in [(0, 1, 0), (1, 3, arch.n_kv_heads - 1), (1, 1, 0)]:
        def put(name, pos=pos, g=g):
            def fn(act, hook):
                act = act.clone()
                act[:, pos, g] = cache[name][:, pos, g]
                return act
            return fn

        names = [Node(layer, s).hook_name for s in ("k", "v")]
        with torch.inference_mode():
            ref = float(metric(model.run_with_hooks(corrupt, fwd_hooks=[(n, put(n)) for n in names])))
        torch.testing.assert_close(ours.values[layer, pos, g].item(), ref, atol=ATOL, rtol=0)


def test_path_patch_matches_the_three_run_reference(bridge_model, family, pair):
    """Wang et al.: run 2 freezes every head output (and MLP output) at the corrupted run except
    the sender's clean value; the receiver's keys are run 2's; run 3 writes them into the
    corrupted run."""
    model = bridge_model(family)
    clean, corrupt = pair
    metric = _metric()
    # position 3: inside the zoo's sliding window (4) of the last query, so the key is read
    sender, receiver = Node(0, "head", pos=3, head=1), Node(1, "k", pos=3, head=0)
    ours = path_patch(model, clean, corrupt, metric, [sender], [receiver])
    base, src = _cache(model, corrupt), _cache(model, clean)
    n_layers = Arch.of(model).n_layers
    # (hook.name on a Bridge is the canonical name, not the legacy alias: bind names)
    def freeze(name):
        def fn(act, hook):
            out = base[name].clone()
            if name == sender.hook_name:
                out[:, sender.pos, sender.head] = src[name][:, sender.pos, sender.head]
            return out
        return fn

    names = [Node(i, "head").hook_name for i in range(n_layers)] + [Node(i, "mlp_out").hook_name
                                                                      for i in range(n_layers)]
    grabbed = {}

    def grab(act, hook):
        grabbed["k"] = act.clone()

    with torch.inference_mode():
        model.run_with_hooks(corrupt, fwd_hooks=[(n, freeze(n)) for n in names] + [(receiver.hook_name, grab)])

        def write(act, hook):
            act = act.clone()
            act[:, receiver.pos, receiver.head] = grabbed["k"][:, receiver.pos, receiver.head]
            return act

        ref = float(metric(model.run_with_hooks(corrupt, fwd_hooks=[(receiver.hook_name, write)])))
    torch.testing.assert_close(ours.values[0].item(), ref, atol=ATOL, rtol=0)
    assert abs(ref - ours.corrupt_metric) > 1e-4  # the path carries some effect


def test_knockout_matches_masked_scores(bridge_model, family, pair):
    model = bridge_model(family)
    clean, _ = pair
    metric = _metric()
    n_layers = Arch.of(model).n_layers
    ours = knockout(model, clean, metric, at=6, sources=[4, 5], start_layers=list(range(n_layers)))
    for start in range(n_layers):
        def block(scores, hook):
            scores = scores.clone()
            scores[:, :, 6, 4:6] = float("-inf")
            return scores

        hooks = [(Node(layer, "attn_scores").hook_name, block) for layer in range(start, n_layers)]
        with torch.inference_mode():
            ref = float(metric(model.run_with_hooks(clean, fwd_hooks=hooks)))
        torch.testing.assert_close(ours.values[start].item(), ref, atol=ATOL, rtol=0)


def test_attribution_is_the_directional_derivative(bridge_model, family, pair):
    """Attribution patching (Nanda 2023) at resid_pre: (clean - corrupt) . d metric / d resid at the
    corrupted run, per cell, against torch.autograd through `run_with_hooks` on the Bridge."""
    model = bridge_model(family)
    clean, corrupt = pair
    metric = _metric()
    ours = attribute(model, clean, corrupt, metric, site="resid_pre")
    layer = 1
    name = Node(layer, "resid_pre").hook_name
    src = _cache(model, clean)[name]
    held = {}

    def keep(act, hook):
        act.retain_grad()
        held["x"] = act
        return act

    with torch.enable_grad():
        value = metric(model.run_with_hooks(corrupt, fwd_hooks=[(name, keep)]))
        (grad,) = torch.autograd.grad(value, [held["x"]])
    ref = ((src - held["x"].detach()) * grad).sum(-1) * clean.shape[0]  # per example: metric is the mean
    torch.testing.assert_close(ours.per_example[layer].float(), ref.T.float(), atol=ATOL, rtol=1e-4)
