"""Property-based fuzzing of the main entry points with malformed shapes, dtypes and indices.

Every call must end in one of two ways: a correct result (checked against an independent
computation: TransformerLens's own forward or cache), or a clean error — a ValueError or
TypeError raised by our own code (the raising frame is inside `interp/`), never a raw error
from deep inside torch or TransformerLens. `collect(..., out=dir)` must never leave a partial
store: on an error nothing is written, on success the store matches the in-memory result.

Entry points are called unwrapped (`inspect.unwrap`), as a user calls them: under pytest
jaxtyping checks the public signatures first, and what we pin here is what users see without it.
"""

from __future__ import annotations

import inspect
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interp import probing
from interp.cache import collect
from interp.graph import Node
from interp.hooks import Zero, run_with_interventions
from interp.lens import logit_lens
from interp.patching import kv_patch, logprob, sweep
from interp.store import open_store

U = inspect.unwrap
INTERP = Path(__file__).resolve().parents[1] / "interp"
FUZZ = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

DTYPES = [torch.long, torch.int32, torch.int16, torch.uint8, torch.float32, torch.bool]


@st.composite
def token_tensors(draw, max_len: int = 36):
    """Mostly well-formed token tensors, with bad dtypes, ranks, sizes and ids mixed in."""
    dtype = draw(st.sampled_from(DTYPES[:3] * 3 + DTYPES))
    ndim = draw(st.sampled_from([2] * 6 + [0, 1, 3]))
    if ndim == 2:
        shape = (draw(st.sampled_from([0, 1, 2, 3, 2])), draw(st.sampled_from([0, 1, 4, 7, 7, 32, 33])))
    else:
        shape = tuple(draw(st.integers(0, 3 if i == 0 else max_len)) for i in range(ndim))
    lo, hi = draw(st.sampled_from([(0, 50)] * 5 + [(-1, 50), (0, 51), (45, 60)]))
    t = torch.randint(lo, hi, shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 9))))
    bad = draw(st.sampled_from([None, None, None, -1, 50, 99]))
    if bad is not None and t.numel():
        t.view(-1)[-1] = bad
    if dtype == torch.uint8:
        t = t.clamp(0, 255)
    return t.to(dtype)


def _clean_error(exc: BaseException) -> bool:
    if not isinstance(exc, (ValueError, TypeError)):
        return False
    last = Path(traceback.extract_tb(exc.__traceback__)[-1].filename).resolve()
    return last.is_relative_to(INTERP)


def _valid(t: torch.Tensor, n_ctx: int = 32) -> bool:
    return (t.ndim == 2 and not t.dtype.is_floating_point and t.dtype != torch.bool and t.shape[0] > 0
            and 0 < t.shape[1] <= n_ctx and int(t.min()) >= 0 and int(t.max()) < 50)


def _outcome(fn):
    """(result, None) or (None, error); a raw error fails the test at once."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - the property is about which exceptions escape
        if not _clean_error(e):
            raise AssertionError(f"raw error escaped: {type(e).__name__}: {e}") from e
        return None, e


@FUZZ
@given(tokens=token_tensors(),
       positions=st.sampled_from(["all", "last", [0], [-1], [2, 5], [1.5], [40], []]),
       stream=st.booleans())
def test_fuzz_collect(gpt2_model, tokens, positions, stream):
    hook = "blocks.1.hook_resid_post"
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "store"
        res, err = _outcome(lambda: U(collect)(gpt2_model, tokens, hooks=hook, positions=positions,
                                               out=out if stream else None, batch_size=2, progress=False))
        if err is not None:
            assert not out.exists(), "an error left files behind"
            return
        assert _valid(tokens)
        _, ref = gpt2_model.run_with_cache(tokens.long(), names_filter=hook)
        want = ref[hook]
        if positions == "last":
            want = want[:, -1:]
        elif positions != "all":
            want = want[:, [p % tokens.shape[1] for p in positions]]
        got = open_store(out)[hook] if stream else res[hook]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@FUZZ
@given(tokens=token_tensors(), layer=st.integers(-1, 4), pos=st.sampled_from([None, 0, 3, -1, 6, 40, [0, 2]]),
       head=st.sampled_from([None, 0, 1, 3, 4]), model_kind=st.sampled_from(["gpt2", "llama"]),
       site=st.sampled_from(["resid_pre", "head", "k"]))
def test_fuzz_run_with_interventions(gpt2_model, llama_model, tokens, layer, pos, head, model_kind, site):
    model = gpt2_model if model_kind == "gpt2" else llama_model

    def call():
        node = Node(layer, site, head=head if site != "resid_pre" else None)
        return U(run_with_interventions)(model, tokens, [Zero(node, pos=pos)])

    res, err = _outcome(call)
    if err is not None:
        return
    assert _valid(tokens)
    name = Node(layer, site).hook_name
    n = tokens.shape[1]
    assert pos is None or all(-n <= p < n for p in (pos if isinstance(pos, list) else [pos]))

    def manual(act, hook):
        act = act.clone()
        sel = [slice(None), slice(None) if pos is None else pos]
        if site != "resid_pre" and head is not None:
            sel.append(head)
        act[tuple(sel)] = 0
        return act

    want = model.run_with_hooks(tokens.long(), fwd_hooks=[(name, manual)])
    torch.testing.assert_close(res[0], want, rtol=0, atol=0)


@FUZZ
@given(tokens=token_tensors(max_len=8), corrupt_shift=st.sampled_from([0, 0, 0, 1]),
       layers=st.sampled_from([None, [0], [2], [3], [-1], []]), positions=st.sampled_from([None, [0], [-1], [6], [32]]),
       heads=st.sampled_from([None, None, [0], [1], [2], [4]]), site=st.sampled_from(["resid_pre", "head", "v"]),
       kv=st.booleans())
def test_fuzz_sweep_and_kv_patch(llama_model, tokens, corrupt_shift, layers, positions, heads, site, kv):
    corrupt = tokens.clone()
    if corrupt.ndim == 2 and corrupt.shape[1] > corrupt_shift:
        corrupt = corrupt[:, corrupt_shift:] if corrupt_shift else (corrupt + 1) % 50
    metric = logprob(3)

    def call():
        if kv:
            return U(kv_patch)(llama_model, tokens, corrupt, metric, layers=layers, positions=positions, groups=heads)
        return U(sweep)(llama_model, tokens, corrupt, metric, site, layers=layers, positions=positions,
                        heads=heads if site != "resid_pre" else None)

    res, err = _outcome(call)
    if err is not None:
        return
    assert _valid(tokens) and tokens.shape == corrupt.shape
    clean_lp = torch.log_softmax(llama_model(tokens.long())[:, -1], -1)[:, 3].mean()
    torch.testing.assert_close(torch.tensor(res.clean_metric, dtype=clean_lp.dtype), clean_lp, rtol=1e-4, atol=1e-4)
    assert bool(torch.isfinite(res.values).all())


@FUZZ
@given(tokens=token_tensors(), pos=st.sampled_from([-1, 0, 5, 40, None, True]), k=st.sampled_from([1, 5, 0, 51]))
def test_fuzz_logit_lens(any_model, tokens, pos, k):
    res, err = _outcome(lambda: U(logit_lens)(any_model, tokens, pos=pos, k=k, keep_logits=True, progress=False))
    if err is not None:
        return
    assert _valid(tokens)
    want = any_model(tokens.long())
    want = want if pos is None else want[:, [pos % tokens.shape[1]]]
    torch.testing.assert_close(res.logits[-1], want, rtol=1e-4, atol=1e-4)


@FUZZ
@given(n_layers=st.sampled_from([0, 1, 2]), n=st.sampled_from([0, 1, 3, 40]), d=st.sampled_from([0, 3]),
       n_labels=st.sampled_from([0, 1, 3, 40, 39]), nan_rows=st.sampled_from([[], [], [2]]),
       kind=st.sampled_from(["logistic", "ridge"]), float_feats=st.booleans())
def test_fuzz_probing_fit(n_layers, n, d, n_labels, nan_rows, kind, float_feats):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_layers, n, d, generator=g)
    if nan_rows and n > 2:
        x[:, nan_rows] = float("nan")
    x = x if float_feats else x.long()
    y = torch.arange(n_labels) % 2
    y = y.double() if kind == "ridge" else y
    res, err = _outcome(lambda: U(probing.fit)(x, y, kind, n_boot=20))
    if err is not None:
        return
    assert float_feats and n_labels == n and bool(torch.isfinite(x).all())
    assert res.value.shape == (n_layers,)


def test_fuzz_helper_flags_raw_errors():
    # the property can fail: an error from inside torch is not a clean error
    try:
        torch.zeros(2)[5]
    except IndexError as e:
        assert not _clean_error(e)
    with pytest.raises(AssertionError, match="raw error escaped"):
        _outcome(lambda: torch.zeros(2, 3) @ torch.zeros(2, 3))
