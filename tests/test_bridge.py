"""TransformerBridge (Hugging Face models) through loading, the adapter, hooks, caching and the
patching engine: against the HF model's own logits, the Bridge's own `run_with_cache`,
per-cell `run_with_hooks` references on the Bridge, and the same weights loaded as a
HookedTransformer (TransformerLens's own implementation)."""

from __future__ import annotations

import json

import pytest
import torch
from test_patching_padded import _alone, _check_cells, _city

from interp.arch import (
    Arch,
    block_inputs,
    device_of,
    dtype_of,
    forward_from,
    is_bridge,
    tokenizer_of,
    unembed,
)
from interp.cache import collect
from interp.graph import Node, Site
from interp.hooks import Add, Zero, run
from interp.metrics import answer_logprob
from interp.models import load_model, read_manifest, save_model
from interp.patching import At, attribute, knockout, kv_patch, logit_diff, patch, path_patch, sweep
from interp.tl import HAS_HOOKED_TRANSFORMER, TL_VERSION
from interp.tl import patching as tlp

TOL = 1e-5
VOCAB = 60
# kind="hooked" converts the folder to a HookedTransformer: TL 3 only (the Bridge side runs on both)
needs_hooked = pytest.mark.skipif(not HAS_HOOKED_TRANSFORMER, reason=f"kind='hooked' needs a HookedTransformer, which "
                                  f"transformer-lens {TL_VERSION} removed (4.0)")


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights large enough that patching effects are far above float error (HF's init at std 0.02
    makes every logit about 0): matrices at std 1/sqrt(fan_in) (embeddings at 1), norm scales near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                std = 1.0 if "embed" in name or "wte" in name or "wpe" in name else p.shape[-1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "norm" in name or "ln" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _write_tokenizer(d) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                            unk_token="<unk>").save_pretrained(str(d))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A tiny random Llama (grouped-query attention: 4 heads, 2 KV groups) saved as a Hugging Face
    folder (config.json + model.safetensors + tokenizer files), built offline."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("hf") / "tiny"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    _randomise(LlamaForCausalLM(cfg), 0).save_pretrained(str(d))
    _write_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("hf") / "tiny_gpt2"
    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=64, vocab_size=VOCAB))
    _randomise(model, 1).save_pretrained(str(d))
    _write_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def bridge(llama_dir):
    return load_model(llama_dir)


@pytest.fixture(scope="session")
def hooked(llama_dir):
    return load_model(llama_dir, kind="hooked")


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(3, VOCAB, (2, 6), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = (clean[:, 2] - 3 + 11) % (VOCAB - 3) + 3
    corrupt[:, 4] = (clean[:, 4] - 3 + 5) % (VOCAB - 3) + 3
    return clean, corrupt


def _metric():
    return logit_diff(torch.tensor([5, 9]), torch.tensor([7, 20]), pos=-1)


def _logits(model, tokens):
    with torch.inference_mode():
        return model(tokens)


# ----------------------------------------------------------------------------------- loading

def test_hf_folder_loads_as_a_bridge_with_the_hf_logits(llama_dir, bridge, pair):
    from transformers import AutoModelForCausalLM

    assert is_bridge(bridge) and not bridge.training
    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir), attn_implementation="eager").eval()
    clean, _ = pair
    with torch.inference_mode():
        torch.testing.assert_close(_logits(bridge, clean), hf(clean).logits, atol=TOL, rtol=0)
    assert tokenizer_of(bridge)("w1 w2")["input_ids"][-2:] == [4, 5]
    assert device_of(bridge).type == "cpu" and dtype_of(bridge) == torch.float32


@needs_hooked
def test_hf_folder_as_hookedtransformer_agrees_with_the_bridge(hooked, bridge, pair):
    clean, _ = pair
    assert not is_bridge(hooked)
    torch.testing.assert_close(_logits(hooked, clean), _logits(bridge, clean), atol=TOL, rtol=0)
    a, b = Arch.of(hooked), Arch.of(bridge)
    assert (a.kind, b.kind) == ("hooked", "bridge")
    for f in ("n_layers", "n_heads", "n_kv_heads", "d_model", "d_head", "d_vocab", "positional", "normalization"):
        assert getattr(a, f) == getattr(b, f), f
    assert b.grouped and b.n_kv_heads == 2 and b.positional == "rotary" and b.normalization == "RMS"
    assert tokenizer_of(hooked) is not None


@needs_hooked
def test_gpt2_folder_loads_both_ways(gpt2_dir, pair):
    clean, _ = pair
    b, h = load_model(gpt2_dir), load_model(gpt2_dir, kind="hooked")
    torch.testing.assert_close(_logits(h, clean), _logits(b, clean), atol=TOL, rtol=0)
    assert Arch.of(b).positional == "learned" and Arch.of(b).normalization == "LN"


@needs_hooked
def test_gpt2_n_inner_converts_to_a_hooked_transformer_with_the_hf_logits(tmp_path):
    # regression: TransformerLens's GPT-2 config converter ignores n_inner (it assumes 4 d_model),
    # so kind="hooked" refused a GPT-2 whose MLP width differs; it now converts with d_mlp = n_inner
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=VOCAB, n_inner=48))
    _randomise(model, 2).eval().save_pretrained(str(tmp_path))
    _write_tokenizer(tmp_path)
    hooked = load_model(tmp_path, kind="hooked")
    assert not is_bridge(hooked) and hooked.cfg.d_mlp == 48 and hooked.blocks[0].mlp.W_in.shape == (32, 48)
    tokens = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(tokens).logits
    torch.testing.assert_close(_logits(hooked, tokens), want, atol=TOL, rtol=0)
    torch.testing.assert_close(_logits(load_model(tmp_path), tokens), want, atol=TOL, rtol=0)


@needs_hooked
def test_a_silently_wrong_hooked_conversion_is_refused(tmp_path):
    # TransformerLens's Llama conversion drops q/k/v/o biases (attention_bias=True): the weights
    # load, the logits differ (by about 1 here); the check against the HF logits refuses it
    from transformers import LlamaConfig, LlamaForCausalLM

    from interp.models import ModelLoadError

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_bias=True)
    _randomise(LlamaForCausalLM(cfg), 3).save_pretrained(str(tmp_path))
    _write_tokenizer(tmp_path)
    with pytest.raises(ModelLoadError, match="reproduce the HF logits"):
        load_model(tmp_path, kind="hooked")


@pytest.mark.skipif(HAS_HOOKED_TRANSFORMER, reason="TL 4 only: TL 3 converts (the tests above)")
def test_kind_hooked_without_hooked_transformer_is_a_clear_error(llama_dir):
    from interp.models import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"kind='hooked': expected TransformerLens 3.x .*kind='bridge'"):
        load_model(llama_dir, kind="hooked")


def test_dtype_argument_and_default(llama_dir):
    half = load_model(llama_dir, dtype=torch.bfloat16)
    assert dtype_of(half) == torch.bfloat16


def test_tokenizer_argument_replaces_the_models_own(llama_dir, gpt2_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(llama_dir, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    m = load_model(bare, tokenizer=gpt2_dir)
    assert tokenizer_of(m)("w7")["input_ids"][-1] == 10


def test_bridge_save_load_roundtrip_keeps_weights_tokenizer_and_name(bridge, pair, tmp_path):
    path = save_model(bridge, tmp_path / "saved", manifest={"task": "unit"})
    facts = read_manifest(path)
    assert facts["kind"] == "bridge" and facts["tokenizer"] == "hf" and facts["task"] == "unit"
    assert facts["model_name"] == Arch.of(bridge).name
    again = load_model(path)
    assert is_bridge(again)
    torch.testing.assert_close(_logits(again, pair[0]), _logits(bridge, pair[0]), atol=0, rtol=0)
    text = "w3 w14 w40"
    assert tokenizer_of(again)(text)["input_ids"] == tokenizer_of(bridge)(text)["input_ids"]
    # a corrupted Bridge save is refused like any other
    w = path / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(Exception, match="expected sha256"):
        load_model(path)


@needs_hooked
def test_hooked_save_keeps_its_hf_tokenizer(hooked, pair, tmp_path):
    path = save_model(hooked, tmp_path / "ht")
    assert json.loads((path / "tokenizer.json").read_text()).get("model") is not None  # HF files
    again = load_model(path)
    assert not is_bridge(again) and read_manifest(path)["tokenizer"] == "hf"
    torch.testing.assert_close(_logits(again, pair[0]), _logits(hooked, pair[0]), atol=0, rtol=0)
    assert tokenizer_of(again)("w3 w9")["input_ids"] == tokenizer_of(hooked)("w3 w9")["input_ids"]


def test_hf_folder_without_weights_is_a_clear_error(llama_dir, tmp_path):
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(Exception, match="expected weights"):
        load_model(tmp_path)


# ------------------------------------------------------------------------------ hooks and sites

@needs_hooked
@pytest.mark.parametrize("site", [s for s in Site if s not in (Site.Q_INPUT, Site.K_INPUT, Site.V_INPUT)])
def test_every_site_is_a_bridge_hook_with_hookedtransformers_layout(bridge, hooked, pair, site):
    clean, _ = pair
    name = Node(1, site).hook_name
    with torch.inference_mode():
        _, cb = bridge.run_with_cache(clean, names_filter=[name])
        _, ch = hooked.run_with_cache(clean, names_filter=[name])
    assert cb[name].shape == ch[name].shape
    if site in (Site.K, Site.V):
        assert cb[name].shape[2] == 2  # one entry per KV group
    got, ref = cb[name], ch[name]
    if site == Site.ATTN_SCORES:  # masked (future) keys: -inf in TL, the dtype's minimum in the Bridge
        future = torch.ones(6, 6, dtype=torch.bool).triu(1)
        assert bool((got[..., future] <= torch.finfo(got.dtype).min / 2).all())
        got, ref = got.masked_fill(future, 0), ref.masked_fill(future, 0)
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)


def test_outside_block_hooks_exist(bridge):
    from interp.graph import FINAL_NORM_SCALE, HOOK_EMBED

    assert HOOK_EMBED in bridge.hook_dict and FINAL_NORM_SCALE in bridge.hook_dict


def test_collect_equals_the_bridges_own_run_with_cache_bit_for_bit(bridge, pair):
    clean, _ = pair
    names = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.2.attn.hook_k", "blocks.1.hook_mlp_out",
             "ln_final.hook_scale", "hook_embed"]
    got = collect(bridge, clean, hooks=names, progress=False)
    with torch.inference_mode():
        _, ref = bridge.run_with_cache(clean, names_filter=names)
    for n in names:
        assert torch.equal(got.acts[n], ref[n]), n


def test_run_with_edits_equals_run_with_hooks(bridge, pair):
    clean, _ = pair
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    out = run(bridge, clean, edits=[Zero(Node(1, "head", head=2)), Add(Node(0, "resid_post", pos=3), v)])

    def zero(z, hook):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    def add(x, hook):
        x = x.clone()
        x[:, 3] += v
        return x

    with torch.inference_mode():
        ref = bridge.run_with_hooks(clean, fwd_hooks=[("blocks.1.attn.hook_z", zero), ("blocks.0.hook_resid_post", add)])
    torch.testing.assert_close(out.logits, ref, atol=0, rtol=0)


# -------------------------------------------------------------------------- partial forwards

@pytest.mark.parametrize("start", [0, 1, 2])
def test_partial_forward_is_exact(bridge, pair, start):
    clean, _ = pair
    with torch.inference_mode(), block_inputs(bridge) as rec:
        full, cache = bridge.run_with_cache(clean)
    resid = cache[Node(start, "resid_pre").hook_name]
    got = forward_from(bridge, resid.repeat(3, 1, 1), start, inputs=rec)  # three stacked copies
    torch.testing.assert_close(got, full.repeat(3, 1, 1), atol=0, rtol=0)
    idx = torch.tensor([[5, 2], [0, 4]])
    torch.testing.assert_close(forward_from(bridge, resid, start, index=idx, inputs=rec),
                               full.gather(1, idx[..., None].expand(-1, -1, VOCAB)), atol=0, rtol=0)
    final = cache[Node(2, "resid_post").hook_name]
    torch.testing.assert_close(unembed(bridge, final), full, atol=0, rtol=0)


# --------------------------------------------------------------------------- patching engine

@pytest.mark.parametrize("site,tl_fn", [
    ("resid_pre", tlp.get_act_patch_resid_pre),
    ("resid_mid", tlp.get_act_patch_resid_mid),
    ("attn_out", tlp.get_act_patch_attn_out),
    ("mlp_out", tlp.get_act_patch_mlp_out),
    ("head", tlp.get_act_patch_attn_head_out_by_pos),
    ("q", tlp.get_act_patch_attn_head_q_by_pos),
])
def test_sweep_on_a_bridge_matches_per_cell_hook_patching(bridge, pair, site, tl_fn):
    clean, corrupt = pair
    metric = _metric()
    ours = sweep(bridge, clean, corrupt, metric, site=site)
    with torch.inference_mode():
        cache = bridge.run_with_cache(clean)[1]
    ref = tl_fn(bridge, corrupt, cache, metric)  # one run_with_hooks per cell
    torch.testing.assert_close(ours.values, ref.double(), atol=1e-4, rtol=0)


def _kv_reference(model, clean, corrupt, metric, layer, pos, group):
    with torch.inference_mode():
        cache = model.run_with_cache(clean)[1]

        def put(name):
            def fn(act, hook):
                act = act.clone()
                act[:, pos, group] = cache[name][:, pos, group]
                return act
            return fn

        names = [Node(layer, s).hook_name for s in ("k", "v")]
        return float(metric(model.run_with_hooks(corrupt, fwd_hooks=[(n, put(n)) for n in names])))


def test_kv_patch_on_a_bridge_matches_per_cell_hook_patching(bridge, pair):
    clean, corrupt = pair
    metric = _metric()
    ours = kv_patch(bridge, clean, corrupt, metric)
    assert ours.axes == ("layer", "pos", "kv_head") and ours.values.shape == (3, 6, 2)
    for layer, pos, g in [(0, 2, 0), (1, 2, 1), (2, 4, 0), (0, 5, 1)]:
        ref = _kv_reference(bridge, clean, corrupt, metric, layer, pos, g)
        torch.testing.assert_close(ours.values[layer, pos, g].item(), ref, atol=1e-4, rtol=0)


def test_cumulative_kv_patch_matches_hooks_at_every_later_layer(bridge, pair):
    clean, corrupt = pair
    metric = _metric()
    ours = kv_patch(bridge, clean, corrupt, metric, cumulative=True, per_group=False, positions=[2])
    with torch.inference_mode():
        cache = bridge.run_with_cache(clean)[1]
    for start in range(3):
        def put(name):
            def fn(act, hook):
                act = act.clone()
                act[:, 2] = cache[name][:, 2]
                return act
            return fn

        names = [Node(layer, s).hook_name for layer in range(start, 3) for s in ("k", "v")]
        with torch.inference_mode():
            ref = float(metric(bridge.run_with_hooks(corrupt, fwd_hooks=[(n, put(n)) for n in names])))
        torch.testing.assert_close(ours.values[start, 0].item(), ref, atol=1e-4, rtol=0)


def test_path_patch_on_a_bridge_matches_a_three_run_reference(bridge, pair):
    """Wang et al.: run 2 freezes every head and MLP output at the corrupted run except the
    sender's (clean); the receiver's key is what the HF layer's own k_proj makes of run 2's
    residual, written into the corrupted run."""
    clean, corrupt = pair
    metric = _metric()
    sender, receiver = Node(0, "head", pos=2, head=1), Node(2, "k", pos=2, head=1)
    ours = path_patch(bridge, clean, corrupt, metric, [sender], [receiver])
    with torch.inference_mode():
        _, base = bridge.run_with_cache(corrupt)
        _, src = bridge.run_with_cache(clean)

        # (a Bridge's hook.name is the canonical name, e.g. attn.o.hook_in for attn.hook_z: bind names)
        def freeze(name):
            def fn(act, hook):
                out = base[name].clone()
                if name == sender.hook_name:
                    out[:, 2, 1] = src[name][:, 2, 1]
                return out
            return fn

        names = [f"blocks.{i}.{s}" for i in range(3) for s in ("attn.hook_z", "hook_mlp_out")]
        hooks = [(n, freeze(n)) for n in names]
        grabbed = {}

        def grab(x, hook):
            grabbed["resid"] = x.clone()

        bridge.run_with_hooks(corrupt, fwd_hooks=hooks + [("blocks.2.hook_resid_pre", grab)])
        blk = bridge.blocks[2]
        k = blk.attn.k(blk.ln1(grabbed["resid"]))
        k = k.reshape(*k.shape[:2], 2, -1)

        def write(act, hook):
            act = act.clone()
            act[:, 2, 1] = k[:, 2, 1]
            return act

        ref = float(metric(bridge.run_with_hooks(corrupt, fwd_hooks=[("blocks.2.attn.hook_k", write)])))
    torch.testing.assert_close(ours.values[0].item(), ref, atol=1e-4, rtol=0)
    assert abs(ref - ours.corrupt_metric) > 1e-4  # the path carries some effect


def test_knockout_on_a_bridge_matches_masked_scores(bridge, pair):
    clean, _ = pair
    metric = _metric()
    ours = knockout(bridge, clean, metric, at=5, sources=[1, 2, 3], start_layers=[0, 1, 2])
    for start in range(3):
        def block(scores, hook):
            scores = scores.clone()
            scores[:, :, 5, 1:4] = float("-inf")
            return scores

        hooks = [(Node(layer, "attn_scores").hook_name, block) for layer in range(start, 3)]
        with torch.inference_mode():
            ref = float(metric(bridge.run_with_hooks(clean, fwd_hooks=hooks)))
        torch.testing.assert_close(ours.values[start].item(), ref, atol=1e-5, rtol=0)


# ------------------------------------------------ the engine agrees between the two model kinds

@pytest.fixture(scope="session")
def gpt2_pair(gpt2_dir):
    return load_model(gpt2_dir), load_model(gpt2_dir, kind="hooked")


@needs_hooked
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_engine_agrees_between_bridge_and_hookedtransformer(request, family, pair):
    bridge, hooked = ((request.getfixturevalue("bridge"), request.getfixturevalue("hooked")) if family == "llama"
                      else request.getfixturevalue("gpt2_pair"))
    clean, corrupt = pair
    metric = _metric()
    for fn in (lambda m: sweep(m, clean, corrupt, metric, site="resid_pre"),
               lambda m: sweep(m, clean, corrupt, metric, site="v"),
               lambda m: kv_patch(m, clean, corrupt, metric),
               lambda m: patch(m, clean, corrupt, metric, nodes=[At(1, "head", 2, 3), At(2, "mlp_out", 4)]),
               lambda m: path_patch(m, clean, corrupt, metric, [Node(0, "head", pos=2, head=h) for h in range(4)],
                                    [Node(2, "v", pos=2, head=0)], stream="kv"),
               lambda m: knockout(m, clean, metric, at=5, sources=[2]),
               lambda m: attribute(m, clean, corrupt, metric, site="head")):
        a, b = fn(bridge), fn(hooked)
        torch.testing.assert_close(a.per_example, b.per_example, atol=1e-4, rtol=0, equal_nan=True)


# ------------------------------------------------------------------------------------ padding

@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_prompts_on_a_bridge_equal_each_prompt_alone(bridge, bpe_tokenizer, side):
    city = _city(bpe_tokenizer, side)
    metric = answer_logprob()
    for fn, pos_axis in ((lambda p: sweep(bridge, p, metric, site="resid_pre"), 1),
                         (lambda p: kv_patch(bridge, p, metric), 1)):
        padded = fn(city)
        for i in (0, 3):
            _check_cells(padded, fn(_alone(city, i)), i, int(city.lengths[i]), pos_axis)


# ------------------------------------------------------------------------- HF ids and the cache

def _fake_hf_cache(root, repo: str, folder) -> None:
    """The local Hugging Face cache layout (refs/main -> snapshots/<commit>/) holding `folder`'s files."""
    import shutil

    base = root / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(folder, base / "snapshots" / commit)


def test_an_hf_id_in_the_local_cache_loads_as_a_bridge(llama_dir, bridge, pair, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    _fake_hf_cache(tmp_path, "someorg/tiny-llama", llama_dir)
    m = load_model("someorg/tiny-llama")
    assert is_bridge(m)
    torch.testing.assert_close(_logits(m, pair[0]), _logits(bridge, pair[0]), atol=0, rtol=0)


def test_an_hf_id_offline_and_not_cached_is_a_clear_error(tmp_path, monkeypatch):
    from interp.models import ModelLoadError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="Pre-download"):
        load_model("someorg/not-here")
    with pytest.raises(ModelLoadError, match="Pre-download"):
        load_model("pythia-70m", kind="bridge")  # a TransformerLens name booted as a Bridge


# ------------------------------------------------------------------- the exact hook-based fallback

def test_a_bridge_whose_blocks_are_not_chained_falls_back_to_whole_forwards(bridge, pair, monkeypatch):
    """Where the HF model acts between its blocks, replaying blocks l.. would be wrong: the engine
    then runs each chunk's whole forward under the same hooks, says so (`path="hooks"`), and gets
    the per-cell reference values."""
    clean, corrupt = pair
    metric = _metric()
    partial = [sweep(bridge, clean, corrupt, metric, site="resid_pre"), kv_patch(bridge, clean, corrupt, metric),
               knockout(bridge, clean, metric, at=5, sources=[1, 2])]
    assert [r.path for r in partial] == ["partial"] * 3
    monkeypatch.setattr("interp.arch._chained", lambda ins, outs: False)
    hooked_path = [sweep(bridge, clean, corrupt, metric, site="resid_pre"), kv_patch(bridge, clean, corrupt, metric),
                   knockout(bridge, clean, metric, at=5, sources=[1, 2])]
    assert [r.path for r in hooked_path] == ["hooks"] * 3
    for a, b in zip(partial, hooked_path, strict=True):
        torch.testing.assert_close(a.per_example, b.per_example, atol=1e-5, rtol=0)
    with torch.inference_mode():
        ref = tlp.get_act_patch_resid_pre(bridge, corrupt, bridge.run_with_cache(clean)[1], metric)
    torch.testing.assert_close(hooked_path[0].values, ref.double(), atol=1e-4, rtol=0)


def test_chained_is_detected_on_a_real_bridge(bridge, pair):
    with torch.inference_mode(), block_inputs(bridge) as rec:
        bridge(pair[0])
    assert rec.chained and rec.path == "partial"
