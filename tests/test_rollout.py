"""interp.rollout: token / soft / hidden rollouts against independent references, on both families
and padded prompts: one-hot soft = token = `interp.decoding.generate`; KV-cached = recomputed;
a padded row = its prompt alone; one-pass re-runs = the incremental pass; a hand-built
``start_at_layer=0`` forward for patched inputs; TransformerLens's own logit lens; hooks.run
references for the patching engine on rollouts."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from conftest import CITY_PROMPTS, _randomise, gpt2_config, llama_config

from interp.decoding.generate import generate
from interp.graph import Node, Site
from interp.hooks import Capture, SetAt
from interp.lens.logit import logit_lens
from interp.lens.tuned import TunedLens
from interp.metrics import answer_logprob
from interp.models import new_model
from interp.patching.engine import At
from interp.probing import fit
from interp.prompts import Prompts
from interp.rollout import Rollout, rollout, sweep, thought, thought_lens
from interp.rollout import patch as patch_rollout
from interp.tl import HAS_HOOKED_TRANSFORMER, TL_VERSION

TOL = dict(atol=1e-5, rtol=1e-5)
TOL64 = dict(atol=1e-10, rtol=1e-10)
TOL32 = dict(atol=5e-5, rtol=1e-5)  # float32 rounding, amplified over steps (see model64)
STEPS = 4


@pytest.fixture(params=["gpt2", "llama"])
def model(request, gpt2_model, llama_model):
    return gpt2_model if request.param == "gpt2" else llama_model


@pytest.fixture(params=["left", "right"])
def city(request, bpe_tokenizer) -> Prompts:
    return Prompts.from_text([p for p, _, _ in CITY_PROMPTS], bpe_tokenizer, side=request.param)


@pytest.fixture
def left(bpe_tokenizer) -> Prompts:
    """Left-padded prompts of different lengths (the padding side with a shift to get wrong)."""
    return Prompts.from_text([p for p, _, _ in CITY_PROMPTS], bpe_tokenizer, side="left")


def _alone(p: Prompts) -> list[Prompts]:
    r = p.right()
    return [Prompts.from_tokens([r.tokens[i, : int(r.lengths[i])]]) for i in range(len(r))]


def _same(a: Rollout, b: Rollout, tol: dict = TOL) -> None:
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logits, b.logits, **tol)
    torch.testing.assert_close(a.inputs, b.inputs, **tol)
    torch.testing.assert_close(a.final_logits, b.final_logits, **tol)
    for n in a.acts:
        torch.testing.assert_close(a.acts[n], b.acts[n], **tol)


def _read(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, idx.to(logits.device)[..., None].expand(-1, -1, logits.shape[-1])).cpu()


def test_one_hot_soft_equals_token_rollout_and_generate(model, city):
    tok = rollout(model, city, STEPS, mode="token")
    for soft in (rollout(model, city, STEPS, mode="soft", top_k=1),
                 rollout(model, city, STEPS, mode="soft", temperature=1e-6)):
        assert torch.equal(soft.tokens, tok.tokens)
        torch.testing.assert_close(soft.logits, tok.logits, **TOL)
        torch.testing.assert_close(soft.final_logits, tok.final_logits, **TOL)
    gen = generate(model, city, STEPS)  # the toolkit's token decoder, an independent implementation
    assert torch.equal(tok.tokens, gen.tokens)
    torch.testing.assert_close(tok.logits, gen.logits, **TOL)
    # a non-degenerate soft rollout feeds other inputs than the token one
    assert (rollout(model, city, STEPS, mode="soft").inputs - tok.inputs).abs().max() > 1e-2


def test_sampled_token_rollout_equals_generate(model, left):
    kw = dict(temperature=1.5, top_k=20, top_p=0.9, seed=3)
    tok = rollout(model, left, STEPS, mode="token", sample=True, **kw)
    gen = generate(model, left, STEPS, mode="sample", **kw)
    assert torch.equal(tok.tokens, gen.tokens)
    torch.testing.assert_close(tok.logits, gen.logits, **TOL)
    assert not torch.equal(tok.tokens, rollout(model, left, STEPS, mode="token").tokens)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model64(request):
    """The fixtures' architectures in float64: cache vs recompute differ by float32 rounding that
    a random model amplifies over soft steps (up to ~2e-5 on logits of size ~4); in float64 the
    two paths agree to 1e-10, which pins the algorithm, not the rounding."""
    cfg = gpt2_config(dtype=torch.float64) if request.param == "gpt2" else llama_config(dtype=torch.float64)
    return _randomise(new_model(cfg), 1 if request.param == "gpt2" else 2)


@pytest.mark.parametrize("mode", ["token", "soft", "hidden"])
def test_cached_equals_recomputed_and_rows_equal_prompts_alone(model64, city, mode):
    caps = [Node(1, Site.RESID_POST), Node(0, Site.K)]
    kw = dict(mode=mode, captures=caps, **({"temperature": 0.7, "top_k": 5} if mode == "soft" else {}))
    cached = rollout(model64, city, STEPS, **kw)
    _same(cached, rollout(model64, city, STEPS, cache=False, **kw), TOL64)
    if city.side == "right":
        return  # the same right-padded computation as "left": its rows alone are checked there
    for i, alone in enumerate(_alone(city)):
        one = rollout(model64, alone, STEPS, **kw)
        _same(one, cached.select([i]), TOL64)


@pytest.mark.parametrize("mode", ["token", "soft", "hidden"])
def test_cached_equals_recomputed_float32(model, left, mode):
    cached = rollout(model, left, STEPS, mode=mode)
    _same(cached, rollout(model, left, STEPS, mode=mode, cache=False), TOL32)


@pytest.mark.parametrize("mode", ["soft", "hidden"])
def test_run_reproduces_the_incremental_pass(model, left, mode):
    name = Node(2, Site.RESID_PRE).hook_name
    ro = rollout(model, left, STEPS, mode=mode, captures=[name])
    read = torch.cat([ro.start[:, None] - 1, ro.positions], 1)  # L - 1 + j, j = 0..steps
    out = ro.run(model, captures=[Capture(name, read)])
    torch.testing.assert_close(out.acts[name].cpu(), ro.acts[name], **TOL)
    seen = {}
    raw = ro.run(model, hooks=[(name, lambda act, hook: seen.setdefault("x", act.clone()))])  # a raw TL hook
    torch.testing.assert_close(_read(seen["x"], read), ro.acts[name], **TOL)
    torch.testing.assert_close(raw.logits, out.logits, **TOL)
    lg = _read(out.logits, read)
    torch.testing.assert_close(lg[:, :-1], ro.logits, **TOL)
    torch.testing.assert_close(lg[:, -1], ro.final_logits, **TOL)
    # the sequence's spans: thought_i is step i's input position, last the last step's
    assert torch.equal(ro.sequence.index(thought(2)), ro.start + 2)
    assert torch.equal(ro.sequence.index("last"), ro.start + STEPS - 1)


def test_hidden_inputs_are_the_last_hidden_state(model, left):
    """post_norm: the vector the unembedding reads (its unembedding is the step's logits);
    pre_norm: the last block's resid_post at the read position."""
    post = rollout(model, left, STEPS, mode="hidden")
    with torch.no_grad():
        torch.testing.assert_close(model.unembed(post.inputs.to(model.cfg.device)).cpu().double(),
                                   post.logits.double(), **TOL)
    pre = rollout(model, left, STEPS, mode="hidden", hidden="pre_norm")
    name = Node(model.cfg.n_layers - 1, Site.RESID_POST).hook_name
    out = pre.run(model, captures=[Capture(name, pre.positions - 1)])
    torch.testing.assert_close(out.acts[name].cpu(), pre.inputs, **TOL)
    # a projection is applied to the fed-back state
    scale = rollout(model, left, 1, mode="hidden", proj=lambda h: 0.5 * h)
    torch.testing.assert_close(scale.inputs, 0.5 * post.inputs[:, :1], **TOL)


def _hand_built(model, ro: Rollout, inputs: torch.Tensor) -> torch.Tensor:
    """Logits of the sequence from a hand-built embedding: W_E rows, thoughts replaced, plus the
    learned position table, fed to the first block (start_at_layer=0)."""
    seq = ro.sequence
    emb = model.W_E[seq.tokens].clone()
    for i in range(len(seq)):
        for s in range(ro.steps):
            emb[i, int(ro.start[i]) + s] = inputs[i, s]
    if model.cfg.positional_embedding_type == "standard":
        emb = emb + model.W_pos[: emb.shape[1]][None]
    with torch.no_grad():
        return model(emb, start_at_layer=0)


@pytest.mark.parametrize("mode", ["soft", "hidden"])
def test_patching_a_thought(model, left, mode):
    ro = rollout(model, left, STEPS, mode=mode)
    base = ro.run(model).logits
    same = ro.run(model, inputs=ro.with_input(1, ro.inputs[:, 1])).logits
    assert torch.equal(same, base)  # patching thought 1 with itself is the identity
    other = ro.inputs[torch.tensor([1, 2, 3, 4, 0])][:, 1]
    patched = ro.with_input(1, other)
    got = ro.run(model, inputs=patched).logits
    torch.testing.assert_close(got, _hand_built(model, ro, patched), **TOL)
    torch.testing.assert_close(base, _hand_built(model, ro, ro.inputs), **TOL)
    mask = ro.sequence.mask
    assert (got - base)[mask].abs().max() > 1e-3
    # inputs_embeds is the hook_embed value of the whole sequence
    emb = ro.inputs_embeds(model, patched)
    idx = ro.start + 1
    torch.testing.assert_close(emb[torch.arange(len(ro.sequence)), idx], other, **TOL)


def test_forced_input_continues_the_rollout(model, left):
    ro = rollout(model, left, STEPS, mode="hidden")
    same = rollout(model, left, STEPS, mode="hidden", force={1: ro.inputs[:, 1]})
    _same(same, ro)
    other = ro.inputs[torch.tensor([4, 0, 1, 2, 3])][:, 1]
    forced = rollout(model, left, STEPS, mode="hidden", force={1: other})
    _same(forced, rollout(model, left, STEPS, mode="hidden", force={1: other}, cache=False))
    torch.testing.assert_close(forced.inputs[:, 1], other, **TOL)
    torch.testing.assert_close(forced.logits[:, :2], ro.logits[:, :2], **TOL)  # steps 0, 1 read before it
    # the fixed-sequence re-run with the forced inputs gives the forced rollout's logits
    out = forced.run(model)
    torch.testing.assert_close(_read(out.logits, forced.positions - 1), forced.logits, **TOL)


def test_collect_and_rows_on_a_rollout(model, left):
    name = Node(1, Site.RESID_POST).hook_name
    ro = rollout(model, left, STEPS, mode="soft", captures=[name])
    cache = ro.collect(model, hooks=[name], batch_size=2, progress=False)
    torch.testing.assert_close(cache[name], ro.acts[name][:, 1:], **TOL)  # thought positions
    torch.testing.assert_close(ro.rows(cache, thought(2), hook=name), ro.acts[name][:, 3], **TOL)
    full = ro.collect(model, hooks=[name], positions="all", progress=False)
    torch.testing.assert_close(ro.rows(full, "prompt_last", hook=name), ro.acts[name][:, 0], **TOL)


def test_thought_lens(model, left):
    ro = rollout(model, left, STEPS, mode="soft")
    lens = thought_lens(model, ro)
    assert lens.shape[0] == model.cfg.n_layers + 1
    out = ro.run(model)
    torch.testing.assert_close(lens[-1], _read(out.logits, ro.positions), **TOL)  # last layer = the logits
    tok = rollout(model, left, STEPS, mode="token")  # real tokens: the toolkit's logit lens reads the same
    ref = logit_lens(model, tok.sequence, pos=tok.positions, keep_logits=True, progress=False)
    torch.testing.assert_close(thought_lens(model, tok), ref.logits, **TOL)
    tuned = TunedLens.for_model(model)  # random translators: the tuned lens's own run is the reference
    with torch.no_grad():
        tuned.delta.copy_(0.1 * torch.randn(tuned.delta.shape, generator=torch.Generator().manual_seed(0)))
        tuned.bias.copy_(0.1 * torch.randn(tuned.bias.shape, generator=torch.Generator().manual_seed(1)))
    ref = tuned.run(model, tok.sequence, pos=tok.positions, keep_logits=True, progress=False)
    got = thought_lens(model, tok, translate=tuned, decode_dtype=tuned.delta.dtype)
    torch.testing.assert_close(got, ref.logits, **TOL)
    assert (got[0] - thought_lens(model, tok)[0]).abs().max() > 1e-3


def _answered(bpe_tokenizer, side: str) -> Prompts:
    p = Prompts.from_text([p for p, _, _ in CITY_PROMPTS], bpe_tokenizer, side=side)
    return Prompts.from_tokens(list(p.right().tokens[i, : int(p.lengths[i])] for i in range(len(p))),
                               answers=[3, 5, 7, 9, 11], side=side)


@pytest.mark.parametrize("side", ["left", "right"])
def test_residual_patching_at_thought_positions(model, bpe_tokenizer, side):
    p = _answered(bpe_tokenizer, side)
    clean = rollout(model, p, STEPS, mode="hidden")
    perm = torch.tensor([1, 2, 3, 4, 0])
    corrupt = rollout(model, p, STEPS, mode="hidden", force={0: clean.inputs[perm][:, 0]})
    metric = answer_logprob()
    name = Node(1, Site.RESID_PRE).hook_name
    caught = clean.run(model, captures=[Capture(name, clean.positions)]).acts[name]
    res = patch_rollout(model, clean, corrupt, metric, At(1, Site.RESID_PRE, thought(2)))
    # reference: the corrupted rollout re-run with the clean residual written at thought 2
    ref = corrupt.run(model, edits=[SetAt(name, index=corrupt.start + 2, values=caught[:, 2])])
    torch.testing.assert_close(res.per_example[0], metric(ref.logits, clean.sequence).double().cpu(), **TOL)
    torch.testing.assert_close(res.clean_values, metric(clean.run(model).logits, clean.sequence).double().cpu(), **TOL)
    ident = patch_rollout(model, clean, clean, metric, Node(2, Site.RESID_PRE, pos=int(clean.start.min()) + 1))
    torch.testing.assert_close(ident.per_example[0], ident.clean_values, **TOL)  # clean into clean
    sw = sweep(model, clean, corrupt, metric, layers=[0, 1])
    assert sw.per_example.shape == (2, STEPS, len(p))
    torch.testing.assert_close(sw.per_example[1, 2], res.per_example[0], **TOL)
    # patching every thought at layer 0 restores the clean run (thoughts are all that differ)
    torch.testing.assert_close(
        patch_rollout(model, clean, corrupt, metric, At(0, Site.RESID_PRE, "thought")).per_example[0],
        res.clean_values, **TOL)


def test_frame_and_entropy(model, left):
    ro = rollout(model, left, STEPS, mode="soft", top_k=3)
    frame = ro.to_frame()
    assert len(frame) == len(left) * STEPS
    row = frame[(frame.example == 2) & (frame.step == 1)].iloc[0]
    assert int(row.position) == int(left.lengths[2]) + 1
    # entropy of the top-3 mixture against torch.distributions on the restricted logits
    z = ro.logits[2, 1].double()
    keep = z.topk(3).indices
    ref = torch.distributions.Categorical(logits=z[keep]).entropy()
    assert abs(float(row.entropy) - float(ref)) < 1e-9
    assert float(row.entropy) <= float(torch.log(torch.tensor(3.0))) + 1e-12
    assert abs(float(row.input_norm) - float(ro.inputs[2, 1].double().norm())) < 1e-9


def test_bad_arguments(model, left):
    with pytest.raises((ValueError, TypeError)):  # beartype checks the Literal under pytest
        rollout(model, left, 2, mode="latent")
    with pytest.raises(ValueError, match="sample=True expected with mode='token'"):
        rollout(model, left, 2, mode="soft", sample=True)
    with pytest.raises(ValueError, match="n_ctx"):
        rollout(model, left, 30)
    with pytest.raises(ValueError, match=r"force\[1\] expected a float tensor"):
        rollout(model, left, 2, force={1: torch.zeros(3, 7)})
    ro = rollout(model, left, 2, mode="soft")
    with pytest.raises(ValueError, match="rollout inputs: expected shape"):
        ro.run(model, inputs=torch.zeros(5, 3, model.cfg.d_model))


def test_gradients_through_continuous_thoughts(model, left):
    """grad=True keeps the graph: the gradient of the final logits with respect to a learned
    projection is the same through the K/V cache as through recomputation."""
    d = model.cfg.d_model
    proj = torch.nn.Linear(d, d, dtype=model.cfg.dtype)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(d) + 0.01 * torch.randn(d, d, generator=torch.Generator().manual_seed(0)))
    grads = []
    for cache in (True, False):
        ro = rollout(model, left, 3, mode="hidden", proj=proj, grad=True, cache=cache)
        loss = torch.log_softmax(ro.final_logits, -1)[:, 3].sum()
        grads.append(torch.autograd.grad(loss, list(proj.parameters())))
    for a, b in zip(*grads, strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert all(p.grad is None for p in model.parameters())  # the model is left as it was


def test_training_loss_through_thoughts_and_a_suffix(gpt2_model, left):
    """The Coconut training step: thoughts with grad, an end-of-thought token and an answer after
    them (`with_suffix`), one re-run with grad; its gradient with respect to the projection
    matches a central finite difference."""
    d = gpt2_model.cfg.d_model
    proj = torch.nn.Linear(d, d, dtype=torch.float64)
    model = new_model(gpt2_config(dtype=torch.float64))
    model.load_state_dict({k: v.double() for k, v in gpt2_model.state_dict().items()})
    answers = [5, 6, 7, 8, 9]

    def loss() -> torch.Tensor:
        ro = rollout(model, left, 2, mode="hidden", proj=proj, grad=True, cache=False).with_suffix([3], answers=answers)
        out = ro.run(model, grad=True)
        last = ro.sequence.index("last")
        assert torch.equal(last, ro.start + 2)  # the suffix token, whose logits predict the answer
        rows = torch.arange(len(last))
        # by hand in float64 (interp.metrics reads log-probs in float32)
        return -torch.log_softmax(out.logits[rows, last], -1)[rows, torch.tensor(answers)].sum()

    (g,) = torch.autograd.grad(loss(), [proj.bias])
    eps = 1e-6
    with torch.no_grad():
        for j in (0, 7):
            proj.bias[j] += eps
            up = float(loss())
            proj.bias[j] -= 2 * eps
            down = float(loss())
            proj.bias[j] += eps
            assert abs((up - down) / (2 * eps) - float(g[j])) < 1e-5 * max(1.0, abs(float(g[j])))


def test_probe_on_thought_positions(gpt2_model):
    """Probe rows from a rollout feed interp.probing: the step-0 logit of a token is linear in the
    hidden input fed back (post_norm: the unembedding reads it), so a ridge probe on thought_0's
    residual at layer 0 recovers it (R^2 near 1), far above the shuffled-label baseline."""
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 50, (int(n),), generator=g) for n in torch.randint(6, 8, (120,), generator=g)]
    ro = rollout(gpt2_model, Prompts.from_tokens(seqs, side="left"), 2, mode="hidden")
    names = [Node(i, Site.RESID_PRE).hook_name for i in range(gpt2_model.cfg.n_layers)]
    cache = ro.collect(gpt2_model, hooks=names, progress=False)
    x = torch.stack([ro.rows(cache, thought(0), hook=n) for n in names])
    res = fit(x, ro.logits[:, 0, 7].double(), "ridge", seed=0, n_boot=200)
    assert res.value[0] > 0.9 and res.ci_low[0] > 0.8
    assert res.shuffled[0] < 0.3


# ------------------------------------------------ Hugging Face reference: Coconut's own loop

def _hf_pair(family: str):
    """A tiny random HF model and the same weights as a HookedTransformer (TransformerLens's own
    weight conversion; fold_ln off, so the final norm's output is the HF last hidden state)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from interp.tl import HookedTransformer, HookedTransformerConfig

    if family == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=50))
    else:
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                          rms_norm_eps=1e-6))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            norm = p.ndim == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight")
            p.copy_((1 + 0.1 * torch.randn(p.shape, generator=g)) if norm else 0.2 * torch.randn(p.shape, generator=g))
    if not HAS_HOOKED_TRANSFORMER:  # TL 4: a TransformerBridge instead, and the HF model it wraps
        bridge = _booted(hf, Path(tempfile.mkdtemp()))
        return bridge.original_model, bridge
    common = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=32, d_vocab=50, device="cpu")
    if family == "gpt2":
        from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights as convert
        cfg = HookedTransformerConfig(d_mlp=128, act_fn="gelu_new", normalization_type="LN", eps=1e-5,
                                      positional_embedding_type="standard", **common)
    else:
        from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights as convert
        cfg = HookedTransformerConfig(d_mlp=64, act_fn="silu", normalization_type="RMS", eps=1e-6, final_rms=True,
                                      positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=2,
                                      gated_mlp=True, **common)
    hooked = HookedTransformer(cfg)
    hooked.load_state_dict(convert(hf.eval(), cfg), strict=False)
    return hf, hooked


def _booted(hf, folder: Path):
    """`hf` saved with a word-level tokenizer and booted as a TransformerBridge."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from interp.tl import TransformerBridge

    hf.save_pretrained(str(folder))
    vocab = {f"t{i}": i for i in range(50)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")), unk_token="t1",
                            pad_token="t0", bos_token="t2", eos_token="t3").save_pretrained(str(folder))
    return TransformerBridge.boot_transformers(str(folder), device="cpu")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hidden_and_soft_rollouts_equal_the_hf_inputs_embeds_loop(family):
    """Coconut's loop in Hugging Face: append ``hidden_states[-1]`` of the last position to
    ``inputs_embeds`` (soft: ``softmax(logits) @ W_E``) and run again. The rollout matches it step
    by step (HF adds learned positions to inputs_embeds, as the rollout does at hook_embed)."""
    hf, hooked = _hf_pair(family)
    tol = TOL if HAS_HOOKED_TRANSFORMER else TOL32  # a Bridge recomputes every step: float32 rounding (as below)
    ids = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(1))
    for mode in ("hidden", "soft"):
        ro = rollout(hooked, ids, 3, mode=mode)
        x = hf.get_input_embeddings()(ids).detach()
        for s in range(3):
            with torch.no_grad():
                o = hf(inputs_embeds=x, output_hidden_states=True)
            nxt = (o.hidden_states[-1][:, -1] if mode == "hidden"
                   else torch.softmax(o.logits[:, -1].double(), -1).float() @ hf.get_input_embeddings().weight)
            torch.testing.assert_close(ro.logits[:, s], o.logits[:, -1], **tol)
            torch.testing.assert_close(ro.inputs[:, s], nxt, **tol)
            x = torch.cat([x, nxt[:, None]], 1)
        with torch.no_grad():
            torch.testing.assert_close(ro.final_logits, hf(inputs_embeds=x).logits[:, -1], **tol)


@pytest.mark.skipif(not HAS_HOOKED_TRANSFORMER, reason=f"transformer-lens {TL_VERSION} has no HookedTransformer "
                    f"(removed in 4.0) to compare the Bridge with; the HF inputs_embeds loop test covers the Bridge")
def test_rollouts_on_a_transformer_bridge(tmp_path):
    """On a TransformerBridge (HF weights, no TransformerLens K/V cache: every step recomputed)
    the three rollouts, the one-pass re-run and the thought lens equal the HookedTransformer's
    (K/V-cached) on the same weights."""
    hf, hooked = _hf_pair("llama")
    bridge = _booted(hf, tmp_path)
    g = torch.Generator().manual_seed(2)
    p = Prompts.from_tokens([torch.randint(4, 50, (n,), generator=g) for n in (5, 7, 6)], side="left")
    name = Node(1, Site.RESID_POST).hook_name
    for mode in ("token", "soft", "hidden"):
        a = rollout(bridge, p, 3, mode=mode, captures=[name])
        b = rollout(hooked, p, 3, mode=mode, captures=[name])
        assert torch.equal(a.tokens, b.tokens)
        for x, y in ((a.logits, b.logits), (a.inputs, b.inputs), (a.final_logits, b.final_logits),
                     (a.acts[name], b.acts[name])):
            torch.testing.assert_close(x, y, atol=5e-5, rtol=1e-5)
    out = a.run(bridge)
    torch.testing.assert_close(_read(out.logits, a.positions - 1), a.logits, **TOL)
    torch.testing.assert_close(thought_lens(bridge, a), thought_lens(hooked, b), atol=5e-5, rtol=1e-5)
