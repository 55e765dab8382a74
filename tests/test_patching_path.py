"""Path patching against the three-run algorithm of Wang et al. (2022), built from TL hooks."""

from __future__ import annotations

import pytest
import torch

from interp.graph import GridPoint, Node, count_routes, routes
from interp.models import new_model
from interp.patching import logit_diff, path_patch
from interp.tl import HAS_HOOKED_TRANSFORMER, HookedTransformer, HookedTransformerConfig


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    clean = torch.randint(0, 50, (2, 5), generator=g)
    corrupt = torch.randint(0, 50, (2, 5), generator=g)
    return clean, corrupt


def _metric():
    return logit_diff(torch.tensor([3, 8]), torch.tensor([11, 2]), pos=-1)


def _split_copy(model: HookedTransformer) -> HookedTransformer:
    """The same weights with use_split_qkv_input=True (per-head q/k/v input hooks)."""
    fields = HookedTransformerConfig.__dataclass_fields__
    cfg = {k: v for k, v in dict(model.cfg.to_dict()).items() if k in fields and fields[k].init}
    cfg["use_split_qkv_input"] = True
    split = new_model(HookedTransformerConfig(**cfg))
    split.load_state_dict(model.state_dict(), strict=True)
    return split


def _receiver_inputs(model):
    """(the model to run, layer, site -> the hook of a receiver's per-head input). TL 3: a copy with
    use_split_qkv_input (hook_k_input: the residual each head's keys are computed from). TL 4's
    native model has no such option: its per-head q/k/v (a head's q/k/v is a function of its own
    input alone, so writing one run's q/k/v equals writing that run's input)."""
    if HAS_HOOKED_TRANSFORMER:
        return _split_copy(model), lambda layer, site: f"blocks.{layer}.hook_{site}_input"
    return model, lambda layer, site: f"blocks.{layer}.attn.hook_{site}"


def _frozen(model, base, src, senders: list[Node]) -> list:
    """Hooks freezing every head output and MLP output at the base run, except the senders'
    head outputs (source value). Names are bound here: a Bridge's hook.name is the canonical
    name, not the legacy alias the hook was attached by."""
    def freeze_z(z, hook, name):
        out = base[name].clone()
        for s in senders:
            if s.hook_name == name:
                out[:, s.pos, s.head] = src[name][:, s.pos, s.head]
        return out

    def freeze(act, hook, name):
        return base[name]

    n_layers = model.cfg.n_layers
    z_names = [f"blocks.{i}.attn.hook_z" for i in range(n_layers)]
    mlp_names = [f"blocks.{i}.hook_mlp_out" for i in range(n_layers) if not model.cfg.attn_only]
    return ([(n, lambda z, hook, n=n: freeze_z(z, hook, n)) for n in z_names]
            + [(n, lambda a, hook, n=n: freeze(a, hook, n)) for n in mlp_names])


def _reference(model, clean, corrupt, metric, sender: Node, receiver: Node | None):
    """Wang et al.: run 2 freezes every head output and MLP output at the corrupted run except the
    sender (clean value); run 3 writes run 2's receiver input into the corrupted run."""
    split, input_hook = _receiver_inputs(model)
    with torch.inference_mode():
        _, base = split.run_with_cache(corrupt)
        _, src = split.run_with_cache(clean)
        hooks = _frozen(model, base, src, [sender])
        if receiver is None:  # the logits read the frozen residual directly
            return float(metric(split.run_with_hooks(corrupt, fwd_hooks=hooks)))
        name = input_hook(receiver.layer, receiver.site.value)
        captured = {}

        def grab(act, hook):
            captured["x"] = act.clone()

        split.run_with_hooks(corrupt, fwd_hooks=hooks + [(name, grab)])

        def write(act, hook):
            act = act.clone()
            act[:, receiver.pos, receiver.head] = captured["x"][:, receiver.pos, receiver.head]
            return act

        return float(metric(split.run_with_hooks(corrupt, fwd_hooks=[(name, write)])))


@pytest.mark.parametrize("sender,receiver", [
    (Node(0, "head", pos=2, head=1), Node(1, "k", pos=2, head=1)),
    (Node(0, "head", pos=2, head=3), Node(2, "v", pos=2, head=0)),
    (Node(1, "head", pos=4, head=2), Node(2, "q", pos=4, head=3)),
    (Node(1, "head", pos=4, head=0), None),
], ids=["k", "v", "q", "logits"])
def test_path_patch_matches_three_run_reference(any_model, pair, sender, receiver):
    clean, corrupt = pair
    metric = _metric()
    ours = path_patch(any_model, clean, corrupt, metric, [sender],
                      "logits" if receiver is None else [receiver])
    ref = _reference(any_model, clean, corrupt, metric, sender, receiver)
    torch.testing.assert_close(ours.values[0].item(), ref, atol=1e-4, rtol=0)
    assert abs(ref - ours.corrupt_metric) > 1e-3  # the path carries some effect


def test_several_senders_are_patched_separately(gpt2_model, pair):
    clean, corrupt = pair
    metric = _metric()
    senders = [Node(0, "head", pos=2, head=h) for h in range(4)]
    receiver = Node(1, "k", pos=2, head=1)
    batched = path_patch(gpt2_model, clean, corrupt, metric, senders, [receiver])
    for h, s in enumerate(senders):
        torch.testing.assert_close(batched.values[h].item(),
                                   _reference(gpt2_model, clean, corrupt, metric, s, receiver), atol=1e-4, rtol=0)
    assert batched.to_frame()["sender"].tolist() == [str(s) for s in senders]


def test_route_classes_restrict_who_reads_the_patched_key(gpt2_model, pair):
    clean, corrupt = pair
    metric = _metric()  # reads the last position, 4
    sender = [Node(0, "head", pos=2, head=1)]
    last_layer_key = [Node(2, "k", pos=2, head=1)]
    any_ = path_patch(gpt2_model, clean, corrupt, metric, sender, last_layer_key, stream="any")
    kv = path_patch(gpt2_model, clean, corrupt, metric, sender, last_layer_key, stream="kv", reader=[4])
    residual = path_patch(gpt2_model, clean, corrupt, metric, sender, last_layer_key, stream="residual")
    # in the last layer only the last query's read reaches the metric
    torch.testing.assert_close(kv.values, any_.values, atol=1e-5, rtol=0)
    # "residual": only query 2 reads the patched key, so the last position sees nothing
    torch.testing.assert_close(residual.values[0].item(), residual.corrupt_metric, atol=1e-5, rtol=0)
    assert abs(any_.values[0].item() - any_.corrupt_metric) > 1e-3


def test_kv_route_read_by_one_query_matches_rescored_attention(gpt2_model, pair):
    """Independent reference for a reader restriction at a middle layer: recompute only the
    (query 4, key 2) attention score of the receiving head from the patched key. Written on the
    pattern (p[4, 2] times exp(new score - old score), the row renormalised: the softmax of the
    rescored row), which both model kinds let a hook edit."""
    clean, corrupt = pair
    metric = _metric()
    sender, receiver = Node(0, "head", pos=2, head=1), Node(1, "k", pos=2, head=3)
    ours = path_patch(gpt2_model, clean, corrupt, metric, [sender], [receiver], stream="kv", reader=[4])
    model = gpt2_model
    with torch.inference_mode():
        _, base = model.run_with_cache(corrupt)
        _, src = model.run_with_cache(clean)
        # receiver key input = corrupted residual + the sender's clean-minus-corrupted output
        delta = torch.einsum("bd,dm->bm", (src["blocks.0.attn.hook_z"] - base["blocks.0.attn.hook_z"])[:, 2, 1],
                             model.blocks[0].attn.W_O[1])
        resid = base["blocks.1.hook_resid_pre"].clone()
        resid[:, 2] += delta
        attn = model.blocks[1].attn
        k_new = model.blocks[1].ln1(resid)[:, 2] @ attn.W_K[3] + attn.b_K[3]  # [batch d_head]
        k_old = base["blocks.1.attn.hook_k"][:, 2, 3]
        q = base["blocks.1.attn.hook_q"][:, 4, 3]
        change = ((q * (k_new - k_old)).sum(-1) / model.cfg.d_head ** 0.5).exp()  # default attention scale

        def rescore(pattern, hook):
            pattern = pattern.clone()
            row = pattern[:, 3, 4].clone()
            row[:, 2] = row[:, 2] * change
            pattern[:, 3, 4] = row / row.sum(-1, keepdim=True)
            return pattern

        ref = float(metric(model.run_with_hooks(corrupt, fwd_hooks=[("blocks.1.attn.hook_pattern", rescore)])))
    torch.testing.assert_close(ours.values[0].item(), ref, atol=1e-4, rtol=0)
    assert abs(ref - ours.corrupt_metric) > 1e-4  # the rescored edge carries some effect


def test_route_enumeration_matches_the_binomial_count():
    a, b = GridPoint(0, 2), GridPoint(2, 4)  # previous-token layer at the source -> last position
    assert count_routes(a, b) == len(list(routes(a, b))) == 6
    assert {r.signature for r in routes(a, b)} == {"UURR", "URUR", "URRU", "RUUR", "RURU", "RRUU"}


def test_path_patch_bad_input(llama_model, pair):
    clean, corrupt = pair
    metric = _metric()
    with pytest.raises(ValueError, match=r"sender .*: expected it below every receiver"):
        path_patch(llama_model, clean, corrupt, metric, [Node(1, "head", pos=2, head=0)], [Node(1, "k", pos=2, head=0)])
    with pytest.raises(ValueError, match=r"receiver .*: expected a site in \['q', 'k', 'v'\]"):
        path_patch(llama_model, clean, corrupt, metric, [Node(0, "head", pos=2, head=0)], [Node(1, "resid_pre", pos=2)])
    with pytest.raises(ValueError, match=r"KV group expected in \[0, 2\), got 3"):
        path_patch(llama_model, clean, corrupt, metric, [Node(0, "head", pos=2, head=0)], [Node(1, "k", pos=2, head=3)])
    with pytest.raises(ValueError, match=r"head expected in \[0, 4\), got 4"):
        path_patch(llama_model, clean, corrupt, metric, [Node(0, "head", pos=2, head=4)], "logits")
    with pytest.raises(ValueError, match=r"stream='kv': expected K or V receivers"):
        path_patch(llama_model, clean, corrupt, metric, [Node(0, "head", pos=2, head=0)], [Node(1, "q", pos=2, head=0)], stream="kv")
    with pytest.raises(ValueError, match=r"expected one layer when restricting"):
        path_patch(llama_model, clean, corrupt, metric, [Node(0, "head", pos=2, head=0)],
                   [Node(1, "k", pos=2, head=0), Node(2, "k", pos=2, head=0)], stream="kv")
    with pytest.raises(ValueError, match=r"reader: expected query positions >= the key position 2"):
        path_patch(llama_model, clean, corrupt, metric, [Node(0, "head", pos=2, head=0)], [Node(1, "k", pos=2, head=0)],
                   stream="kv", reader=[1])
    with pytest.raises(ValueError, match=r"corrupted tokens: expected the clean shape"):
        path_patch(llama_model, clean, corrupt[:1], metric, [Node(0, "head", pos=2, head=0)], "logits")


# ------------------------------------------------------- K/V receivers at several positions

def _readers(stream: str, reader: list[int] | None, key_pos: int, seq_len: int) -> set[int]:
    """The queries that read a K/V receiver at `key_pos` under the declared route class."""
    if stream == "residual":
        return {key_pos}
    if reader is not None:
        return set(reader)
    return set(range(key_pos + 1, seq_len))  # "kv": every later query


def _per_edge_reference(model, clean, corrupt, metric, senders: list[Node], receivers: list[Node],
                        stream: str, reader: list[int] | None) -> float:
    """Independent reference for per-(query, key) restricted K/V receivers, from TL hooks only.

    Run 1 and 2 (clean, corrupted) give the sender values; run 3 freezes every head and MLP
    output at the corrupted run except the senders and captures the receivers' key/value inputs
    (use_split_qkv_input); then, for each query q of the receiver layer, one corrupted run writes
    exactly the key/value inputs that q reads (its declared edges) and keeps q's head outputs;
    a last corrupted run writes those head outputs in and reads the metric. TransformerLens's own
    attention computes every score, pattern and z; nothing mixes tensors by hand.
    """
    split, input_hook = _receiver_inputs(model)
    seq_len = clean.shape[1]
    (layer,) = {r.layer for r in receivers}
    n_kv = model.cfg.n_key_value_heads or model.cfg.n_heads
    with torch.inference_mode():
        _, base = split.run_with_cache(corrupt)
        _, src = split.run_with_cache(clean)
        frozen = _frozen(model, base, src, senders)
        names = {site: input_hook(layer, site) for site in ("k", "v")}
        captured = {}

        def grab(act, hook, name):
            captured[name] = act.clone()

        split.run_with_hooks(corrupt, fwd_hooks=frozen + [(n, lambda a, hook, n=n: grab(a, hook, n))
                                                          for n in names.values()])

        z_name = f"blocks.{layer}.attn.hook_z"
        z = base[z_name].clone()
        for q in range(seq_len):
            def write(act, hook, name, q=q):
                act = act.clone()
                for r in receivers:
                    if names[r.site.value] == name and q in _readers(stream, reader, r.pos, seq_len):
                        groups = range(n_kv) if r.head is None else [r.head]
                        for g in groups:
                            act[:, r.pos, g] = captured[name][:, r.pos, g]
                return act

            def keep(act, hook, q=q):
                z[:, q] = act[:, q]

            split.run_with_hooks(corrupt, fwd_hooks=[(n, lambda a, hook, n=n, q=q: write(a, hook, n, q))
                                                     for n in names.values()] + [(z_name, keep)])

        def write_z(act, hook):
            return z

        return float(metric(split.run_with_hooks(corrupt, fwd_hooks=[(z_name, write_z)])))


EDGE_CASES = {
    # default "kv": each receiver is read by the queries after its own position
    "kv": ([Node(1, "k", pos=1, head=0), Node(1, "k", pos=4, head=0), Node(1, "v", pos=1, head=1),
            Node(1, "v", pos=3)], "kv", None),
    # "residual": each receiver only by the query at its own position
    "residual": ([Node(1, "k", pos=1), Node(1, "k", pos=3), Node(1, "v", pos=3, head=1)], "residual", None),
    # an explicit reader list, shared by receivers at several positions
    "reader": ([Node(1, "k", pos=1, head=1), Node(1, "v", pos=1), Node(1, "k", pos=3)], "kv", [3, 4]),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_kv_receivers_at_several_positions_match_a_per_edge_reference(any_model, pair, case):
    clean, corrupt = pair
    metric = _metric()
    receivers, stream, reader = EDGE_CASES[case]
    senders = [Node(0, "head", pos=1, head=h) for h in (0, 2)] + [Node(0, "head", pos=3, head=h) for h in (1, 3)]
    ours = path_patch(any_model, clean, corrupt, metric, [senders], receivers, stream=stream, reader=reader)
    ref = _per_edge_reference(any_model, clean, corrupt, metric, senders, receivers, stream, reader)
    torch.testing.assert_close(ours.values[0].item(), ref, atol=1e-5, rtol=0)
    assert abs(ref - ours.corrupt_metric) > 1e-3  # the routes carry some effect


def test_adding_an_unchanged_kv_receiver_changes_nothing(any_model, pair):
    """Regression (issue 10, item 3): the receivers' non-reader masks were OR-ed, so a receiver
    at position 4, whose patched key equals its base key (the sender writes position 2 only),
    restored query 4's output and cut its legitimate read of the patched key at position 2."""
    clean, corrupt = pair
    metric = _metric()
    sender = [Node(0, "head", pos=2, head=1)]
    n_kv = any_model.cfg.n_key_value_heads or any_model.cfg.n_heads
    at_2 = [Node(1, "k", pos=2, head=g) for g in range(n_kv)]
    at_4 = [Node(1, "k", pos=4, head=g) for g in range(n_kv)]
    alone = path_patch(any_model, clean, corrupt, metric, sender, at_2, stream="kv")
    with_unchanged = path_patch(any_model, clean, corrupt, metric, sender, at_2 + at_4, stream="kv")
    torch.testing.assert_close(with_unchanged.values, alone.values, atol=1e-6, rtol=0)
    assert abs(alone.values[0].item() - alone.corrupt_metric) > 1e-4  # query 4 reads the key at 2
