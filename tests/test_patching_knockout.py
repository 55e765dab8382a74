"""Attention knockout and attribution patching against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from interp.models import new_model
from interp.patching import attribute, knockout, logit_diff, sweep
from interp.tl import HookedTransformerConfig, is_native


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    clean = torch.randint(0, 50, (2, 5), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1] = (clean[:, 1] + 7) % 50
    return clean, corrupt


def _metric():
    return logit_diff(torch.tensor([5, 9]), torch.tensor([12, 0]), pos=-1)


def _reference_knockout(model, tokens, metric, start, target, sources, heads):
    """Zero the blocked entries of the attention *pattern* and renormalise the target's row —
    the same distribution as -inf scores, computed after the softmax instead of before."""
    heads = list(range(model.cfg.n_heads)) if heads is None else heads

    def cut(pattern, hook):
        pattern = pattern.clone()
        row = pattern[:, heads, target]  # [batch head k]
        row[..., sources] = 0
        pattern[:, heads, target] = row / row.sum(-1, keepdim=True)
        return pattern

    hooks = [(f"blocks.{layer}.attn.hook_pattern", cut) for layer in range(start, model.cfg.n_layers)]
    with torch.inference_mode():
        base = model(tokens)
        out = model.run_with_hooks(tokens, fwd_hooks=hooks)
    kl = kl_divergence(Categorical(logits=base[:, target].double()), Categorical(logits=out[:, target].double())).mean()
    return float(metric(out)), float(kl)


@pytest.mark.parametrize("heads", [None, [1, 3]])
def test_knockout_matches_pattern_renormalisation(any_model, pair, heads):
    clean, _ = pair
    metric = _metric()
    r = knockout(any_model, clean, metric, at=-1, sources=[0, 1, 2], heads=heads)
    assert r.start_layers == (0, 1, 2, 3)
    for i, start in enumerate(r.start_layers[:-1]):
        m, kl = _reference_knockout(any_model, clean, metric, start, 4, [0, 1, 2], heads)
        torch.testing.assert_close(r.values[i].item(), m, atol=1e-4, rtol=0)
        torch.testing.assert_close(r.kl[i].item(), kl, atol=1e-6, rtol=1e-4)
    assert r.kl[0] > 1e-4  # cutting the context from layer 0 changes the output


def test_knockout_above_the_final_layer_changes_nothing(any_model, pair):
    clean, _ = pair
    metric = _metric()
    r = knockout(any_model, clean, metric, at=3, start_layers=[1, 3])
    assert r.kl[-1].item() == 0.0  # exactly
    assert r.values[-1].item() == r.base_metric
    with torch.inference_mode():
        torch.testing.assert_close(r.base_metric, float(metric(any_model(clean))), atol=1e-6, rtol=0)
    frame = r.to_frame()
    assert frame["start_layer"].tolist() == [1, 3]
    torch.testing.assert_close(torch.tensor(frame["kl"].to_numpy()), r.kl)


def test_knockout_bad_input(gpt2_model, pair):
    clean, _ = pair
    metric = _metric()
    with pytest.raises(ValueError, match=r"sources: expected positions in \[0, target=2\]"):
        knockout(gpt2_model, clean, metric, at=2, sources=[3])
    with pytest.raises(ValueError, match=r"at: expected a position in \[0, 5\), got 5"):
        knockout(gpt2_model, clean, metric, at=5)
    with pytest.raises(ValueError, match=r"start_layers: expected ints in \[0, end_layer=3\], got 4"):
        knockout(gpt2_model, clean, metric, start_layers=[4])
    with pytest.raises(ValueError, match=r"heads: expected head indices in \[0, 4\), got 4"):
        knockout(gpt2_model, clean, metric, heads=[4])


# ---------------------------------------------------------------------------- attribution patching

def _float64(model):
    fields = HookedTransformerConfig.__dataclass_fields__
    cfg = {k: v for k, v in dict(model.cfg.to_dict()).items() if k in fields and fields[k].init}
    cfg["dtype"] = torch.float64
    m64 = new_model(HookedTransformerConfig(**cfg))
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()}, strict=True)
    return m64


def _directional_derivative(model, clean, corrupt, metric, name, index, eps=1e-4):
    """Central difference of the metric along (clean - corrupted) at one cell of hook `name`."""
    with torch.inference_mode():
        _, src = model.run_with_cache(clean, names_filter=[name])
        _, base = model.run_with_cache(corrupt, names_filter=[name])
        direction = torch.zeros_like(base[name])
        direction[(slice(None), *index)] = (src[name] - base[name])[(slice(None), *index)]
        values = []
        for sign in (1, -1):
            def nudge(act, hook, sign=sign):
                return act + sign * eps * direction
            values.append(float(metric(model.run_with_hooks(corrupt, fwd_hooks=[(name, nudge)]))))
    return (values[0] - values[1]) / (2 * eps)


@pytest.mark.parametrize("site,name,cell", [
    ("resid_pre", "blocks.1.hook_resid_pre", (1, (1,))),
    ("resid_pre", "blocks.2.hook_resid_pre", (2, (4,))),
    ("head", "blocks.1.attn.hook_z", (1, (3, 2))),
    ("k", "blocks.2.attn.hook_k", (2, (1, 1))),
])
def test_attribution_is_the_directional_derivative(any_model, pair, site, name, cell):
    clean, corrupt = pair
    metric = _metric()
    m64 = _float64(any_model)
    r = attribute(m64, clean, corrupt, metric, site=site)
    layer, index = cell
    if is_native(m64) and m64.cfg.normalization_type == "RMS":
        # TL 4's native RMSNorm computes in float32 whatever the model's dtype (NativeRMSNorm), so the
        # float64 model is float32-precise: its central difference carries ~1e-7/eps of rounding noise
        # (1e-4 relative at eps=1e-4); a larger step and a tolerance covering its O(eps^2) error instead
        expected = _directional_derivative(m64, clean, corrupt, metric, name, index, eps=1e-2)
        torch.testing.assert_close(r.values[(layer, *index)].item(), expected, atol=1e-5, rtol=5e-3)
    else:
        expected = _directional_derivative(m64, clean, corrupt, metric, name, index)
        torch.testing.assert_close(r.values[(layer, *index)].item(), expected, atol=1e-6, rtol=1e-5)
    assert abs(expected) > 1e-4


def test_attribution_reports_its_correlation_with_exact_patching(llama_model, pair):
    clean, corrupt = pair
    metric = _metric()
    exact = sweep(llama_model, clean, corrupt, metric, site="head", layers=[1, 2], positions=[1, 2, 4])
    r = attribute(llama_model, clean, corrupt, metric, site="head", exact=exact)
    sub = r.values[[1, 2]][:, [1, 2, 4]]
    expected = np.corrcoef(sub.numpy().ravel(), (exact.values - exact.corrupt_metric).numpy().ravel())[0, 1]
    torch.testing.assert_close(r.correlation, float(expected), atol=1e-9, rtol=0)
    torch.testing.assert_close(r.base_metric, exact.corrupt_metric, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"exact: expected a denoising sweep of site 'resid_pre'"):
        attribute(llama_model, clean, corrupt, metric, site="resid_pre", exact=exact)
    with pytest.raises(ValueError, match="differentiable"):
        attribute(llama_model, clean, corrupt, lambda logits: logits[:, -1].argmax(-1).float().mean())
