"""interp.sae: SAE training, loading, evaluation and feature tracing, checked against sae-lens,
TransformerLens, scikit-learn, exact ablations and planted / organism ground truth."""

from __future__ import annotations

import json
import time
import warnings

import pytest
import torch
from sae_lens import SAE, HookedSAETransformer, StandardSAE, StandardSAEConfig
from sae_lens.evals import ExplainedVarianceCalculator, get_recons_loss
from sae_lens.training.activation_scaler import ActivationScaler
from sklearn.metrics import mutual_info_score, r2_score
from torch.testing import assert_close

from interp import sae as isae
from interp.metrics import answer_logprob
from interp.models import load_model, weights_fingerprint
from interp.prompts import Prompts
from interp.sae.circuit import heads_between
from interp.sae.data import ActivationBatches, collect_activations, position_mask
from interp.sae.planted import PlantedConfig, max_cosine
from interp.stats import bootstrap
from interp.tokens import Batch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # BLAS threads oversubscribe a shared 2-core machine badly (100x slower); restore afterwards.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _tokens(n: int, pos: int, seed: int, d_vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, d_vocab, (n, pos), generator=torch.Generator().manual_seed(seed))


SMALL = isae.TrainConfig(d_sae=96, sae_kwargs={"k": 6}, batch_size=256, training_samples=256 * 250, seed=0)


@pytest.fixture(scope="module")
def trained(gpt2_model):
    """SAEs on the GPT-2-style fixture at layers 0 and 1 (resid_post), trained with our train()."""
    toks = _tokens(160, 16, 0)
    out = {}
    for layer in (0, 1):
        out[layer] = isae.train(gpt2_model, toks, f"blocks.{layer}.hook_resid_post", SMALL)
    return out


def _exact_sae(d: int, hook: str) -> StandardSAE:
    """relu(x) - relu(-x) = x: a StandardSAE whose reconstruction is exact."""
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=2 * d, apply_b_dec_to_input=False))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.cfg.metadata.hook_name = hook
    return sae


def _hooked_sae_model(model) -> HookedSAETransformer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = HookedSAETransformer(model.cfg)
    ref.load_state_dict(model.state_dict())
    return ref.eval()


# ------------------------------------------------------------------------------ planted ground truth

def test_planted_features_recovered_from_superposition():
    # 128 features in 64 dims (scaled down for speed; the full 512-in-256 run is
    # `python -m interp.sae.planted`, reported in the README)
    cfg = PlantedConfig(n_features=128, d_model=64, firing_probability=0.02,
                        train=isae.TrainConfig(d_sae=128, sae_kwargs={"k": 4}, lr=3e-3, batch_size=1024,
                                               training_samples=300_000, normalize=False, dead_feature_window=50))
    res = isae.planted.run(cfg)
    print(f"\n{res}")
    # max_cosine against a hand computation with torch's cosine_similarity
    fd = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    learned = torch.randn(7, 8, generator=torch.Generator().manual_seed(1))
    ref = torch.nn.functional.cosine_similarity(fd[:, None], learned[None], dim=-1).max(1).values
    assert_close(max_cosine(fd, learned), ref)
    assert res.mean_max_cosine >= 0.9
    assert res.variance_explained > 0.7
    assert res.l0 == pytest.approx(4.0)


# ------------------------------------------------------------------------- agreement with sae-lens

def test_splice_and_feature_acts_match_sae_lens(gpt2_model, trained):
    sae = trained[1].sae
    toks = _tokens(8, 12, 5)
    ref_model = _hooked_sae_model(gpt2_model)
    with torch.inference_mode():
        with isae.splice(gpt2_model, sae):
            ours = gpt2_model(toks)
        theirs = ref_model.run_with_saes(toks, saes=[sae])
        _, cache = ref_model.run_with_cache_with_saes(toks, saes=[sae])
    assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    acts = isae.feature_activations(gpt2_model, sae, toks, positions="all")
    assert_close(acts, cache[f"{sae.cfg.metadata.hook_name}.hook_sae_acts_post"].reshape(-1, sae.cfg.d_sae))
    # reconstruct == sae-lens's own forward
    x = torch.randn(10, sae.cfg.d_in)
    assert_close(isae.reconstruct(sae, x), sae(x))
    assert_close(isae.reconstruct(sae, x, error_term=True), x, atol=1e-5, rtol=1e-5)


def test_exact_sae_splice_leaves_logits_unchanged(any_model):
    toks = _tokens(4, 10, 1)
    sae = _exact_sae(any_model.cfg.d_model, "blocks.1.hook_resid_mid")
    with torch.inference_mode():
        clean = any_model(toks)
        with isae.splice(any_model, sae):
            spliced = any_model(toks)
    assert_close(spliced, clean, atol=1e-5, rtol=1e-5)
    assert not any_model.hook_dict["blocks.1.hook_resid_mid"]._forward_hooks  # hooks removed
    ev = isae.evaluate(any_model, sae, toks)
    assert ev.variance_explained == pytest.approx(1.0, abs=1e-6)
    assert ev.ce_score == pytest.approx(1.0, abs=1e-4)


def test_evaluate_matches_sae_lens_and_sklearn(gpt2_model, trained):
    sae = trained[1].sae
    toks = _tokens(24, 16, 7)
    ev = isae.evaluate(gpt2_model, sae, toks, batch_size=8)
    print(f"\n{ev}")
    with torch.inference_mode():
        ref = get_recons_loss(sae, gpt2_model, ActivationScaler(), toks, compute_kl=False, compute_ce_loss=True)
        x = collect_activations(gpt2_model, toks, "blocks.1.hook_resid_post")
        feats = sae.encode(x)
        x_hat = sae.decode(feats)
    assert ev.ce_targets == "next-token" and [c.targets for c in ev.ce] == ["next-token"]
    ce = ev.ce[0]
    for ours, key in ((ce.clean, "ce_loss_without_sae"), (ce.sae, "ce_loss_with_sae"),
                      (ce.ablate, "ce_loss_with_ablation")):
        assert ours == pytest.approx(float(ref[key].mean()), rel=1e-4)
    calc = ExplainedVarianceCalculator()
    calc.add_batch(x_hat, x)
    assert ev.variance_explained == pytest.approx(calc.compute(), abs=1e-5)
    assert ev.variance_explained == pytest.approx(
        r2_score(x.numpy(), x_hat.numpy(), multioutput="variance_weighted"), abs=1e-4)
    assert ev.l0 == pytest.approx(float((feats != 0).sum(-1).float().mean()))
    freq = (feats != 0).float().mean(0)
    assert ev.dead_fraction == pytest.approx(float((freq == 0).float().mean()))
    assert ev.dense_fraction == pytest.approx(float((freq > 0.1).float().mean()))
    ce_score = (ce.ablate - ce.sae) / (ce.ablate - ce.clean)
    assert ev.ce_score == pytest.approx(ce_score, rel=1e-5)
    assert list(ev.to_frame()["metric"])[:3] == ["variance_explained", "mse", "l0"]
    # a second target set (only the last position, answer = first token) from the same forward
    # passes; its CE against a hand computation with sae-lens's own splice
    last = torch.full_like(toks, -1)
    last[:, -1] = toks[:, 0]
    both = isae.evaluate(gpt2_model, sae, toks, batch_size=8, targets={"next-token": _next(toks), "last": last})
    assert both.ce_for("next-token") == ev.ce[0]
    ref_model = _hooked_sae_model(gpt2_model)
    hook = sae.cfg.metadata.hook_name
    with torch.inference_mode():
        runs = {"clean": gpt2_model(toks), "sae": ref_model.run_with_saes(toks, saes=[sae]),
                "ablate": gpt2_model.run_with_hooks(toks, fwd_hooks=[(hook, lambda a, hook: torch.zeros_like(a))])}
    rows = torch.arange(toks.shape[0])
    hand = {k: float(-v[rows, -1].log_softmax(-1)[rows, toks[:, 0]].double().mean()) for k, v in runs.items()}
    got = both.ce_for("last")
    assert got.n_targets == toks.shape[0]
    assert (got.clean, got.sae, got.ablate) == pytest.approx((hand["clean"], hand["sae"], hand["ablate"]), rel=1e-4)
    frame = both.to_frame()
    assert set(frame.loc[frame.metric == "ce_score", "targets"]) == {"next-token", "last"}
    assert "on last targets (24 positions" in str(both)


def _next(toks):
    """Next-token targets by hand: position p predicts token p + 1; the last position predicts nothing."""
    t = torch.full_like(toks, -1)
    t[:, :-1] = toks[:, 1:]
    return t


def test_training_smoke(gpt2_model, trained):
    res = trained[0]
    assert isinstance(res.sae, SAE) and res.sae.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    toks = _tokens(24, 16, 9)
    x = collect_activations(gpt2_model, toks, "blocks.0.hook_resid_post")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = SAE.from_dict({**res.sae.cfg.to_dict()})  # same architecture, fresh weights
    with torch.inference_mode():
        r2_trained = r2_score(x.numpy(), res.sae(x).numpy(), multioutput="variance_weighted")
        r2_fresh = r2_score(x.numpy(), untrained(x).numpy(), multioutput="variance_weighted")
        l0 = float((res.sae.encode(x) != 0).sum(-1).float().mean())
    print(f"\nsmoke: R2 trained {r2_trained:.3f} vs untrained {r2_fresh:.3f}, L0 {l0}, {res.seconds:.1f} s")
    assert r2_trained > 0.6 > r2_fresh
    assert l0 == pytest.approx(6.0)


def test_activation_batches_cover_source_and_store_path(gpt2_model, tmp_path):
    from interp.cache import collect

    toks = _tokens(20, 8, 3)
    data = torch.arange(50.0)[:, None].expand(50, 3).contiguous()
    it = ActivationBatches(lambda: data.split(7), 10, buffer_batches=5, seed=0)
    seen = torch.cat([next(it) for _ in range(5)])
    assert sorted(seen[:, 0].tolist()) == list(range(50))  # one epoch, every row once
    # training from a toolkit cache (no model) reads the same activations
    cache = collect(gpt2_model, toks, hooks=["blocks.0.hook_resid_post"], progress=False)
    direct = collect_activations(gpt2_model, toks, "blocks.0.hook_resid_post")
    assert_close(cache["blocks.0.hook_resid_post"].reshape(-1, 32), direct)
    res = isae.train(None, cache, "blocks.0.hook_resid_post",
                     isae.TrainConfig(d_sae=32, sae_kwargs={"k": 4}, batch_size=64, training_samples=64 * 20))
    assert res.sae.cfg.d_in == 32
    # ... and from a sharded disk store, streamed (interp.store)
    store = collect(gpt2_model, toks, hooks=["blocks.0.hook_resid_post"], out=tmp_path / "store", progress=False)
    streamed = torch.cat(list(store.iter_batches("blocks.0.hook_resid_post", 7))).reshape(-1, 32)
    assert_close(streamed, direct)
    res = isae.train(None, store, "blocks.0.hook_resid_post",
                     isae.TrainConfig(d_sae=32, sae_kwargs={"k": 4}, batch_size=64, training_samples=64 * 20))
    assert res.sae.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    # padded batches: only real positions are read
    b = Batch.pad([[1, 2, 3], [4, 5]])
    assert position_mask(b, "last").nonzero().tolist() == [[0, 2], [1, 1]]
    assert position_mask(b, [-1, 0]).sum() == 4


def test_train_config_validation():
    with pytest.raises(ValueError, match="unknown keys"):
        isae.TrainConfig(sae_kwargs={"kk": 3})
    with pytest.raises(ValueError, match="architecture"):
        isae.TrainConfig(architecture="nope")
    with pytest.raises(ValueError, match="unknown keys"):
        isae.TrainConfig.from_dict({"d_sae": 4, "bogus": 1})


# -------------------------------------------------------------------------------------- load / save

def test_save_load_roundtrip_and_integrity(tmp_path, trained):
    sae = trained[0].sae
    path = isae.save(sae, tmp_path / "s", manifest={"note": "test"})
    assert json.loads((path / "manifest.json").read_text())["note"] == "test"
    x = torch.randn(6, sae.cfg.d_in)
    for loaded in (isae.load(path), SAE.load_from_disk(path)):  # ours and sae-lens's own loader
        assert_close(loaded.encode(x), sae.encode(x))
        assert_close(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)))
    w = path / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(isae.SAELoadError, match="sha256"):
        isae.load(path)
    with pytest.raises(isae.SAELoadError, match="no such directory"):
        isae.load(tmp_path / "missing")


def test_save_keeps_user_files_and_overwrites_only_with_consent(tmp_path):
    from interp.atomic import DestinationError

    a, b = _exact_sae(4, "blocks.0.hook_resid_post"), _exact_sae(4, "blocks.1.hook_resid_post")
    with torch.no_grad():
        b.W_dec.mul_(2.0)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DestinationError, match="not one"):
        isae.save(a, tmp_path)
    path = isae.save(a, tmp_path / "s")
    (path / "notes.txt").write_text("mine")
    with pytest.raises(DestinationError, match="overwrite=True"):
        isae.save(b, path)
    isae.save(b, path, overwrite=True)
    assert (path / "notes.txt").read_text() == "mine" and (tmp_path / "notes.txt").read_text() == "mine"
    x = torch.randn(5, 4)
    assert_close(isae.load(path).decode(torch.eye(8)), 2.0 * a.decode(torch.eye(8)))
    assert_close(isae.load(path).decode(isae.load(path).encode(x)), 2.0 * x)
    assert isae.read_manifest(path)["hook_name"] == "blocks.1.hook_resid_post"


def test_release_offline_error_is_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path))
    t = time.perf_counter()
    with pytest.raises(isae.SAELoadError, match="offline"):
        isae.load("gpt2-small-res-jb", sae_id="blocks.7.hook_resid_pre")
    # no network retries: a hub timeout takes minutes; 60 s leaves room for a loaded CI machine
    # (the import of sae-lens's release table alone took 10.4 s with seven suites sharing 2 cores)
    assert time.perf_counter() - t < 60
    with pytest.raises(isae.SAELoadError, match="did you mean"):
        isae.load("gpt2-small-res-jbb", sae_id="blocks.7.hook_resid_pre")
    with pytest.raises(isae.SAELoadError, match="unknown id"):
        isae.load("gpt2-small-res-jb", sae_id="blocks.99.hook_resid_pre")


# --------------------------------------------------------------------------------------- tracing

def test_direct_logit_effect_matches_frozen_scale_logit_lens(any_model):
    """Adding a decoder direction to the final residual with the final norm's scale frozen (as
    the logit lens does) changes the logits by exactly the direct logit effect."""
    hook = "blocks.2.hook_resid_post"
    sae = StandardSAE(StandardSAEConfig(d_in=any_model.cfg.d_model, d_sae=5))
    torch.nn.init.normal_(sae.W_dec, generator=torch.Generator().manual_seed(0))
    sae.cfg.metadata.hook_name = hook
    toks = _tokens(2, 6, 4)
    with torch.inference_mode():
        _, cache = any_model.run_with_cache(toks)
        resid = cache[hook][:, -1]
        scale = cache["ln_final.hook_scale"][:, -1]  # [2, 1]
        for b in range(2):
            eff = isae.direct_logit_effect(any_model, sae, scale=float(scale[b]))

            def freeze(s, hook, _b=b):
                return torch.full_like(s, float(scale[_b]))

            with any_model.hooks(fwd_hooks=[("ln_final.hook_scale", freeze)]):
                base = any_model.unembed(any_model.ln_final(resid[b:b + 1, None]))[0, 0]
                for i in range(5):
                    moved = any_model.unembed(any_model.ln_final(resid[b:b + 1, None] + sae.W_dec[i]))[0, 0]
                    assert_close(moved - base, eff[i], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="residual"):
        bad = StandardSAE(StandardSAEConfig(d_in=8, d_sae=4))
        bad.cfg.metadata.hook_name = "blocks.0.attn.hook_z"
        isae.direct_logit_effect(any_model, bad)


def test_trace_top_contexts_and_dashboard(tmp_path, gpt2_model, trained):
    sae = trained[1].sae
    toks = _tokens(30, 12, 11)
    tr = isae.trace(gpt2_model, sae, toks, k=5, batch_size=7)
    acts = isae.feature_activations(gpt2_model, sae, toks, positions="all").reshape(30, 12, -1)
    # brute force: the top activation, its example and position, and the firing frequency
    for f in tr.frequency.argsort(descending=True)[:5].tolist():
        i = tr.index(f)
        flat = acts[..., f].flatten()
        vals = flat.topk(5).values
        assert_close(tr.top_values[i], vals)
        ex, pos = int(tr.top_examples[i, 0]), int(tr.top_positions[i, 0])
        assert float(acts[ex, pos, f]) == pytest.approx(float(vals[0]))
        assert float(tr.frequency[i]) == pytest.approx(float((acts[..., f] != 0).float().mean()))
        ctx = tr.contexts[i][0]
        assert ctx.tokens[ctx.highlight] == str(int(toks[ex, pos]))
    frame = tr.to_frame()
    assert set(frame.columns) >= {"feature", "rank", "activation", "context"}
    feats = tr.frequency.argsort(descending=True)[:3].tolist()
    page = isae.write_dashboards(tr, feats, tmp_path / "f.html").read_text()
    assert page.count("plotly.js v") <= 2 and all(f"feature {f}" in page for f in feats)
    top = tr.contexts[tr.index(feats[0])][0]
    marked = f"<b><span style='color:#c0392b'>{top.tokens[top.highlight]}</span></b>"
    assert marked in top.html()
    assert f"color:#c0392b'\\u003e{top.tokens[top.highlight]}\\u003c" in page  # highlighted in the page


def test_attribution_agrees_with_exact_ablation(gpt2_model, trained):
    sae = trained[1].sae
    toks = _tokens(12, 10, 13)
    toks = Prompts.from_tokens(toks, answers=toks[:, 0])
    metric = answer_logprob()
    attr = isae.feature_attribution(gpt2_model, sae, toks, metric, positions="last")
    with torch.inference_mode():
        clean = metric(gpt2_model(toks.tokens), toks)
    assert_close(attr.metric, clean, atol=1e-5, rtol=1e-5)  # the error term keeps the forward exact
    check = isae.check_attribution(gpt2_model, sae, toks, metric, attr, n=15, positions="last")
    print(f"\nattribution vs exact ablation: r = {check.correlation:.3f} over (example, feature); "
          f"r = {check.correlation_mean:.3f} over feature means")
    assert check.correlation > 0.8
    # ablating every active feature at the last position == replacing the hook by the SAE bias
    # plus error term: a hand-built reference
    every = torch.arange(sae.cfg.d_sae)
    ablated = isae.ablate(gpt2_model, sae, toks, every, metric, positions="last")

    def ref_hook(act, hook):
        act = act.clone()
        x = act[:, -1]
        act[:, -1] = x - sae.decode(sae.encode(x)) + sae.b_dec
        return act

    with torch.inference_mode(), gpt2_model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", ref_hook)]):
        assert_close(ablated, metric(gpt2_model(toks.tokens), toks), atol=1e-5, rtol=1e-5)


def test_steering_matches_sae_lens_feature_edit(gpt2_model, trained):
    sae = trained[1].sae
    hook = sae.cfg.metadata.hook_name
    toks = _tokens(4, 9, 17)
    feature, coef = 3, 2.5
    ref_model = _hooked_sae_model(gpt2_model)

    def add(acts, hook):
        acts = acts.clone()
        acts[..., feature] += coef
        return acts

    with torch.inference_mode():
        with isae.steer(gpt2_model, sae, feature, coef):
            ours = gpt2_model(toks)
        ref_model.add_sae(sae, use_error_term=True)
        theirs = ref_model.run_with_hooks(toks, fwd_hooks=[(f"{hook}.hook_sae_acts_post", add)])
        ref_model.reset_saes()
        with isae.steer(gpt2_model, sae, feature, 0.0):
            zero = gpt2_model(toks)
        clean = gpt2_model(toks)
    assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert_close(zero, clean)
    p = Prompts.from_tokens(toks, answers=toks[:, 0])
    curve = isae.steering_curve(gpt2_model, sae, p, feature, [0.0, 1.0], answer_logprob())
    assert curve.to_frame().shape[0] == 8
    with torch.inference_mode(), isae.steer(gpt2_model, sae, feature, 1.0):
        one = torch.log_softmax(gpt2_model(toks)[:, -1], -1)[torch.arange(4), toks[:, 0]]
    assert_close(curve.metric[1], one, atol=1e-5, rtol=1e-5)
    assert_close(curve.metric[0], torch.log_softmax(clean[:, -1], -1)[torch.arange(4), toks[:, 0]], atol=1e-5, rtol=1e-5)


def test_feature_graph_attribution_matches_exact(gpt2_model, trained):
    assert heads_between(gpt2_model, "blocks.0.hook_resid_post", "blocks.1.hook_resid_post") == [1]
    assert heads_between(gpt2_model, "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre") == [0]
    up, down = trained[0].sae, trained[1].sae
    toks = _tokens(16, 10, 19)
    acts = isae.feature_activations(gpt2_model, down, toks, positions="last")
    target = int((acts != 0).sum(0).argmax())  # a feature that fires at the last position often
    active = toks[acts[:, target] != 0]
    graph = isae.feature_graph(gpt2_model, [up, down], target, active, top_k=6)
    print(f"\nfeature graph for S1F{target}: {len(graph.edges)} edges, attribution vs exact r = "
          f"{graph.correlation:.3f}")
    assert set(graph.edges["source_kind"]) == {"feature", "head"}
    assert graph.correlation > 0.8
    assert len(graph.plot().data) == len(graph.edges) + 1


def test_mutual_information_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (400,), generator=g)
    acts = torch.rand(400, 6, generator=g) * (torch.rand(400, 6, generator=g) < 0.3)
    acts[:, 2] = (labels == 3).float() * 2.0  # a perfect detector of label 3
    mi = isae.firing_mutual_information(acts, labels)
    for f in range(6):
        assert float(mi[f]) == pytest.approx(mutual_info_score(labels.numpy(), (acts[:, f] != 0).numpy()), abs=1e-6)
    sel = isae.select_features(acts, labels, k=1)
    assert sel.features.tolist() == [2] and int(sel.preferred_label[2]) == 3


# ------------------------------------------------------------------------------------------- CLI

def test_cli_train_then_eval(tmp_path, gpt2_model):
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from interp.models import save_model
    from interp.sae.commands import app

    save_model(gpt2_model, tmp_path / "m")
    toks = _tokens(120, 12, 23)
    save_file({"tokens": toks}, str(tmp_path / "t.safetensors"))
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(tmp_path / "m"), "--hook", "blocks.0.hook_resid_post", "--out",
                              str(tmp_path / "s"), "--tokens", str(tmp_path / "t.safetensors"), "--n-prompts", "100",
                              "--n-eval", "20", "--d-sae", "32", "--k", "4", "--samples", "6400",
                              "--batch-size", "128"])
    assert res.exit_code == 0, res.output
    manifest = isae.read_manifest(tmp_path / "s")
    assert manifest["hook_name"] == "blocks.0.hook_resid_post" and "--tokens" in manifest["command"]
    res = runner.invoke(app, ["eval", str(tmp_path / "s"), "--model", str(tmp_path / "m"), "--tokens",
                              str(tmp_path / "t.safetensors"), "--n-prompts", "120", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    ref = isae.evaluate(gpt2_model, isae.load(tmp_path / "s"), toks)
    assert got["l0"] == pytest.approx(ref.l0)
    assert got["ce_score[next-token]"] == pytest.approx(ref.ce_for("next-token").score, rel=1e-5)
    assert manifest["model_weights"] == weights_fingerprint(gpt2_model)
    res = runner.invoke(app, ["eval", str(tmp_path / "s"), "--model", str(tmp_path / "m"), "--tokens",
                              str(tmp_path / "t.safetensors"), "--n-prompts", "20"])
    assert res.exit_code == 0 and "CE targets" in res.output and "next-token" in res.output, res.output
    # another model of the same shape: refused, unless --allow-mismatch
    save_model(_twin(gpt2_model, perturb=True), tmp_path / "m2")
    args = ["eval", str(tmp_path / "s"), "--model", str(tmp_path / "m2"), "--tokens", str(tmp_path / "t.safetensors"),
            "--n-prompts", "20", "--json"]
    res = runner.invoke(app, args)
    assert isinstance(res.exception, isae.SAEMismatchError) and "SAE model: expected" in str(res.exception)
    assert runner.invoke(app, [*args, "--allow-mismatch"]).exit_code == 0


# ------------------------------------------------------------------------ multihop ground truth

MULTIHOP_SAE = "multihop-L0"  # blocks.0.hook_resid_post: the bridge is decodable at the query there


@pytest.fixture(scope="module")
def multihop_parts():
    from interp.models import load_model, organisms_dir

    # Both are shipped: a missing or corrupted checkpoint fails these tests, never skips them.
    if not (organisms_dir() / "multihop" / "model.safetensors").is_file():
        pytest.fail(f"organism:multihop is not shipped in {organisms_dir()} (interp organisms train multihop)")
    if MULTIHOP_SAE not in isae.list_saes():
        pytest.fail(f"sae:{MULTIHOP_SAE} is not shipped (retrain: see data/sae/{MULTIHOP_SAE}/manifest.json)")

    want = isae.read_manifest(f"sae:{MULTIHOP_SAE}")
    model = load_model("organism:multihop")
    assert want["model_weights"] == weights_fingerprint(model), (
        f"sae:{MULTIHOP_SAE} was trained on other multihop weights; retrain it: {want['command']}")
    return model, isae.load(f"sae:{MULTIHOP_SAE}")


def test_multihop_bridge_features_found_blind_and_causal(multihop_parts):
    """Features that identify the bridge entity at the query position are found by mutual
    information with the bridge label on a train split (nobody says which they are); ablating
    them on held-out prompts destroys two-hop accuracy, ablating as many random live features
    does not."""
    from interp.organisms import multihop

    model, sae = multihop_parts
    data = multihop.dataset(1200, seed=4242, two_hop_share=1.0)
    # 3 features per bridge value, chosen by MI on the train half; the labels are never used to
    # say which feature is which
    res = isae.label_feature_test(model, sae, data.tokens, data.bridge, data.answer, pos=multihop.QUERY_POS,
                                  k=3 * multihop.N_ENTITIES, n_random=5, seed=0)
    print(f"\n{res}")
    chance = 1 / multihop.N_ENTITIES
    assert res.accuracy_clean.value > 0.9
    assert res.identification.low > 10 * chance  # the features name the bridge
    assert res.drop_selected.above(res.drop_random)  # CIs do not overlap
    assert res.drop_selected.value > 0.5 and res.drop_selected.value > 5 * max(res.drop_random.value, 0.01)


def test_multihop_steering_bridge_features_moves_the_answer(multihop_parts):
    """Interchange in feature space: replace the bridge features found blind (train split) with
    those of the other chain's bridge e, at the query position; the two-hop answer follows the
    steered bridge (becomes f, e's successor), as the ground truth says it must."""
    from interp.organisms import multihop

    model, sae = multihop_parts
    train = multihop.dataset(800, seed=4243, two_hop_share=1.0)
    test = multihop.dataset(400, seed=4244, two_hop_share=1.0)
    acts = isae.feature_activations(model, sae, train.tokens, positions=[multihop.QUERY_POS])
    sel = isae.select_features(acts, train.bridge, k=3 * multihop.N_ENTITIES, per_label=True)
    mask = position_mask(Batch.of(test.tokens), [multihop.QUERY_POS])
    new_bridge, new_answer = test.other[:, 1], test.other[:, 2]
    with torch.inference_mode():
        with isae.steer_label(model, sae, sel, new_bridge, mask=mask):
            pred = model(test.tokens)[:, multihop.QUERY_POS].argmax(-1)
        with isae.steer_label(model, sae, sel, test.bridge, mask=mask):  # control: steer to the same bridge
            same = model(test.tokens)[:, multihop.QUERY_POS].argmax(-1)
    follows = bootstrap((pred == new_answer).float())
    kept = bootstrap((same == test.answer).float())
    print(f"\nsteering the bridge features to the other chain's bridge: answer follows it {follows}; "
          f"original answer kept {bootstrap((pred == test.answer).float())}; control (same bridge) "
          f"accuracy {kept}")
    assert follows.low > 0.8 and kept.low > 0.8


# ------------------------------------------------------------------- SAE <-> model <-> hook checks

def _twin(model, *, perturb: bool):
    """A model with `model`'s config and weights (one weight moved by 1e-3 if `perturb`)."""
    from interp.models import new_model

    twin = new_model(model.cfg)
    twin.load_state_dict(model.state_dict())
    if perturb:
        with torch.no_grad():
            twin.W_E[0, 0] += 1e-3
    return twin.eval()


def test_weights_fingerprint_survives_save_and_load(tmp_path, gpt2_model, llama_model, trained):
    from interp.models import save_model

    for model in (gpt2_model, llama_model):
        loaded = load_model(save_model(model, tmp_path / model.cfg.positional_embedding_type))
        assert weights_fingerprint(loaded) == weights_fingerprint(model) == weights_fingerprint(model, cache=False)
    # train() records it; a twin with the same weights has it, an in-place edit changes it (memo invalidated)
    assert trained[0].sae.cfg.metadata.model_weights == weights_fingerprint(gpt2_model)
    twin = _twin(gpt2_model, perturb=False)
    assert weights_fingerprint(twin) == weights_fingerprint(gpt2_model)
    with torch.no_grad():
        twin.W_E[0, 0] += 1e-3
    assert weights_fingerprint(twin) == weights_fingerprint(twin, cache=False) != weights_fingerprint(gpt2_model)
    # the fingerprint survives save / load of the SAE (cfg.json and the manifest)
    path = isae.save(trained[0].sae, tmp_path / "s")
    assert isae.read_manifest(path)["model_weights"] == weights_fingerprint(gpt2_model)
    assert isae.load(path).cfg.metadata.model_weights == weights_fingerprint(gpt2_model)


def _uses(model, up, down, toks):
    """Every public call that uses an SAE with a model (name -> thunk), for SAE `down` (and `up`)."""
    metric = answer_logprob()
    answered = Prompts.from_tokens(toks, answers=toks[:, 0])
    sel = isae.select_features(torch.rand(8, down.cfg.d_sae), torch.arange(8) % 2, k=2)

    def ctx(cm):
        def run():
            with cm():
                pass
        return run

    return {
        "evaluate": lambda: isae.evaluate(model, down, toks),
        "splice": ctx(lambda: isae.splice(model, down)),
        "steer": ctx(lambda: isae.steer(model, down, 0, 1.0)),
        "steer_label": ctx(lambda: isae.steer_label(model, down, sel, torch.zeros(toks.shape[0], dtype=torch.long))),
        "trace": lambda: isae.trace(model, down, toks, k=2),
        "feature_activations": lambda: isae.feature_activations(model, down, toks),
        "direct_logit_effect": lambda: isae.direct_logit_effect(model, down),
        "ablate": lambda: isae.ablate(model, down, answered, [0], metric),
        "feature_attribution": lambda: isae.feature_attribution(model, down, answered, metric),
        "steering_curve": lambda: isae.steering_curve(model, down, answered, 0, [1.0], metric),
        "attribute_sources": lambda: isae.attribute_sources(model, up, down, 0, toks),
        "exact_source_effects": lambda: isae.exact_source_effects(model, up, down, 0, toks, features=[0]),
        "feature_graph": lambda: isae.feature_graph(model, [up, down], 0, toks, top_k=1),
        "label_feature_test": lambda: isae.label_feature_test(model, down, toks, toks[:, 1] % 2, toks[:, 0], k=2,
                                                              n_random=1, n_boot=10),
    }


def test_every_sae_use_checks_the_model(gpt2_model, trained):
    """An SAE used with another model of the same shape (one weight differs by 1e-3) raises in
    every call that uses an SAE with a model, before any work; the twin with equal weights passes."""
    other = _twin(gpt2_model, perturb=True)
    toks = _tokens(6, 8, 29)
    for name, use in _uses(other, trained[0].sae, trained[1].sae, toks).items():
        with pytest.raises(isae.SAEMismatchError, match=r"SAE model: expected weights with fingerprint .*, got .*"
                                                        r"allow_mismatch=True"):
            use()
        print(f"{name}: raises")
    same = _twin(gpt2_model, perturb=False)
    for use in _uses(same, trained[0].sae, trained[1].sae, toks).values():
        use()


def test_sae_at_another_hook_of_the_same_width_raises(gpt2_model, trained):
    sae = trained[0].sae  # blocks.0.hook_resid_post; blocks.1.hook_resid_post has the same width
    toks = _tokens(12, 10, 31)
    msg = r"SAE hook: expected blocks.0.hook_resid_post .*, got blocks.1.hook_resid_post; .*allow_mismatch=True"
    with pytest.raises(isae.SAEMismatchError, match=msg):
        isae.evaluate(gpt2_model, sae, toks, "blocks.1.hook_resid_post")
    with pytest.raises(isae.SAEMismatchError, match=msg):
        with isae.splice(gpt2_model, sae, "blocks.1.hook_resid_post"):
            pass
    with pytest.raises(isae.SAEMismatchError, match=msg):
        with isae.steer(gpt2_model, sae, 0, 1.0, hook="blocks.1.hook_resid_post"):
            pass
    assert not gpt2_model.hook_dict["blocks.1.hook_resid_post"]._forward_hooks


def _relabelled(sae, model, hook=None):
    """A copy of `sae` that records `model` (and `hook`) as the ones it was trained on."""
    import copy

    out = copy.deepcopy(sae)
    out.cfg.metadata.model_weights = weights_fingerprint(model)
    if hook is not None:
        out.cfg.metadata.hook_name = hook
    return out


def test_allow_mismatch_returns_the_unchecked_numbers(gpt2_model, trained):
    """The override runs exactly what an unchecked call runs: the same numbers as the same SAE
    relabelled to the hook / model it is used with (so the check has nothing to object to)."""
    sae = trained[0].sae
    toks = _tokens(12, 10, 37)
    other = _twin(gpt2_model, perturb=True)
    hook = "blocks.1.hook_resid_post"
    got = isae.evaluate(other, sae, toks, hook, allow_mismatch=True)
    ref = isae.evaluate(other, _relabelled(sae, other, hook), toks, hook)
    assert got.values == ref.values
    answered, metric = Prompts.from_tokens(toks, answers=toks[:, 0]), answer_logprob()
    assert_close(isae.ablate(other, sae, answered, [1, 2], metric, allow_mismatch=True),
                 isae.ablate(other, _relabelled(sae, other), answered, [1, 2], metric), rtol=0, atol=0)
    tr = isae.trace(other, sae, toks, k=3, allow_mismatch=True)
    assert_close(tr.top_values, isae.trace(other, _relabelled(sae, other), toks, k=3).top_values, rtol=0, atol=0)


def test_sae_width_mismatch_is_our_error(gpt2_model, trained):
    """An SAE of another width (d_in 16 at a 32-wide hook) fails with the toolkit's message, not a
    raw matmul error from inside sae-lens; the override cannot make it run."""
    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=8))
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    toks = _tokens(4, 6, 41)
    msg = r"SAE input width at blocks.0.hook_resid_post: expected 16 \(the SAE's d_in\), got activations of width 32"
    for override in ({}, {"allow_mismatch": True}):
        with pytest.raises(isae.SAEMismatchError, match=msg):
            isae.evaluate(gpt2_model, sae, toks, **override)
        with pytest.raises(isae.SAEMismatchError, match=msg):
            isae.trace(gpt2_model, sae, toks, **override)
    # the MLP hidden layer is 64 wide: the width is read at the hook itself
    mlp = StandardSAE(StandardSAEConfig(d_in=gpt2_model.cfg.d_mlp, d_sae=8))
    mlp.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    with pytest.raises(isae.SAEMismatchError, match="expected 64"):
        isae.feature_activations(gpt2_model, mlp, toks)
    mlp.cfg.metadata.hook_name = "blocks.0.mlp.hook_post"
    assert isae.feature_activations(gpt2_model, mlp, toks).shape == (4, 8)
    # a hook outside the architecture table is measured by a one-token forward pass
    sae.cfg.metadata.hook_name = "blocks.1.ln2.hook_normalized"
    with pytest.raises(isae.SAEMismatchError, match="ln2.hook_normalized: expected 16 .*got activations of width 32"):
        isae.feature_activations(gpt2_model, sae, toks)


def test_multihop_sae_is_checked_and_its_ce_score_names_its_targets(multihop_parts):
    """The shipped SAE passes the check with the organism it was trained on and refuses another
    hook of the same width; its CE score is reported per target set, and the manifest's numbers
    (quoted in data/sae/README.md and the README) are those of a fresh evaluation on the same
    held-out prompts."""
    from interp.sae.commands import _target_sets, organism_data

    model, sae = multihop_parts
    assert sae.cfg.metadata.model_weights == weights_fingerprint(model) == weights_fingerprint(model, cache=False)
    manifest = isae.read_manifest(f"sae:{MULTIHOP_SAE}")
    toks, answers, _ = organism_data("multihop", manifest["data"]["n_eval"], manifest["data"]["eval_seed"])
    with pytest.raises(isae.SAEMismatchError, match="SAE hook: expected blocks.0.hook_resid_post"):
        isae.evaluate(model, sae, toks, "blocks.1.hook_resid_post")
    ev = isae.evaluate(model, sae, toks, targets=_target_sets(toks, answers))
    print(f"\n{ev}")
    assert [c.targets for c in ev.ce] == ["next-token", "answer"]
    assert ev.ce_for("answer").n_targets == toks.shape[0]
    assert ev.ce_for("next-token").n_targets == toks.shape[0] * (toks.shape[1] - 1)
    # abs 1e-6 nats: float32 log-softmax resolution; the answer CEs are ~2e-4 nats, where rel=1e-5
    # alone asks for 2e-9 and fails between machines (BLAS / thread count), also on 6c0799c
    assert ev.values == pytest.approx(manifest["eval"], rel=1e-5, abs=1e-6)
    frame = ev.to_frame()
    assert frame.loc[(frame.metric == "ce_score") & (frame.targets == "answer"), "value"].item() == pytest.approx(
        ev.ce_for("answer").score)
    assert "on answer targets (1000 positions" in str(ev)


# ------------------------------------------------ Prompts: named positions, padded == alone (issue 11)

def _random_sae(d: int, hook: str, seed: int) -> StandardSAE:
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=3 * d))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            prm.copy_(0.3 * torch.randn(prm.shape, generator=g))
    sae.cfg.metadata.hook_name = hook
    return sae


def _city(tokenizer, side):
    from tests.conftest import CITY_PROMPTS

    return Prompts.from_text([p for p, _, _ in CITY_PROMPTS], tokenizer,
                             spans={"subject": [s for _, s, _ in CITY_PROMPTS]},
                             answers=[a for _, _, a in CITY_PROMPTS], side=side)


@pytest.mark.parametrize("side", ["left", "right"])
def test_feature_activations_and_attribution_on_padded_prompts_equal_each_prompt_alone(any_model, bpe_tokenizer,
                                                                                        side):
    hook = "blocks.1.hook_resid_post"
    sae = _random_sae(any_model.cfg.d_model, hook, 5)
    p = _city(bpe_tokenizer, side)
    subject = isae.feature_activations(any_model, sae, p, positions="subject", batch_size=2)
    last = isae.feature_activations(any_model, sae, p, positions="last")
    metric = answer_logprob()
    attr = isae.feature_attribution(any_model, sae, p, metric, positions="subject", batch_size=2)
    spans = p.span("subject")
    row = 0
    for i in range(len(p)):
        one = p.select([i])
        with torch.no_grad():
            logits, cache = any_model.run_with_cache(one.tokens)
            x = cache[hook][0]
            s, e = (int(v) for v in spans[i])
            want = sae.encode(x[s:e])  # sae-lens's own encoder on the unpadded run
        assert_close(subject[row: row + e - s], want, atol=1e-5, rtol=1e-5)
        row += e - s
        assert_close(last[i], sae.encode(x[int(one.index("last")[0])]), atol=1e-5, rtol=1e-5)
        alone = isae.feature_attribution(any_model, sae, one, metric, positions="subject")
        assert_close(attr.scores[i], alone.scores[0], atol=1e-5, rtol=1e-5)
        assert_close(attr.metric[i], metric(logits, one)[0], atol=1e-5, rtol=1e-5)  # the error term keeps it exact
    assert row == subject.shape[0]


def test_evaluate_adds_the_prompts_answers_as_a_target_set(gpt2_model, bpe_tokenizer):
    p = _city(bpe_tokenizer, "left")
    sae = _exact_sae(gpt2_model.cfg.d_model, "blocks.1.hook_resid_post")
    ev = isae.evaluate(gpt2_model, sae, p)
    assert [c.targets for c in ev.ce] == ["next-token", "answer"]
    ce = ev.ce_for("answer")
    assert ce.n_targets == int(p.answer_lengths.sum())
    want = -answer_logprob()(gpt2_model(p.right().tokens), p.right()).sum() / ce.n_targets  # hand reference
    assert ce.clean == pytest.approx(float(want), rel=1e-5)
    assert ce.sae == pytest.approx(ce.clean, rel=1e-4)  # an exact SAE changes nothing
