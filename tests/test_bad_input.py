"""Bad input, tried as a new user would: one clear message per case, before any work is done.

`CASES` is the table (entry point, bad input, expected message fragment) that README.md's "Bad
input" section lists. Each row calls the entry point *unwrapped* (`inspect.unwrap`): under
pytest jaxtyping checks the public signatures first, and a user (who runs without it) sees our
message, which is what this table pins. Every message must also come from our code: the frame
that raised is inside `interp/`, not torch or TransformerLens.

Below the table: the numeric regression tests for NaN/Inf (issue 10, item 7) and for padding
(item 9), each checked against an independent computation.
"""

from __future__ import annotations

import copy
import inspect
import traceback
from pathlib import Path

import pytest
import torch

from interp import probing
from interp.cache import collect
from interp.graph import Node
from interp.hooks import Set, Zero, intervene, run_with_interventions
from interp.hypotheses import last_token_sufficiency, multihop
from interp.lens import logit_lens
from interp.patching import kv_patch, logit_diff, logprob, sweep
from interp.prompts import Prompts
from interp.tokens import Batch, check_tokens

U = inspect.unwrap  # the function a user calls, without the test-only jaxtyping wrapper


def _tok(b: int = 2, n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (b, n), generator=torch.Generator().manual_seed(seed))


def _with_token(value: int) -> torch.Tensor:
    t = _tok()
    t[1, 3] = value
    return t


def _run_forward(model, tokens, ivs):
    with intervene(model, ivs):
        model(tokens)


def _unchecked(cls, *args, **kwargs):
    """Construct a dataclass as a user would: without the test-only type check of __init__."""
    obj = object.__new__(cls)
    U(cls.__init__)(obj, *args, **kwargs)
    return obj


def _probe_feats(n: int = 40) -> torch.Tensor:
    return torch.randn(2, n, 4, generator=torch.Generator().manual_seed(0))


M = logprob(3)
# (entry point, bad input, call(gpt2, llama, tmp_path), exception type, message fragment)
CASES = [
    ("run_with_interventions", "token id -1", lambda m, g, d: U(run_with_interventions)(m, _with_token(-1), []),
     ValueError, r"expected ids in \[0, 50\), got values in \[-1"),
    ("run_with_interventions", "token id >= d_vocab", lambda m, g, d: U(run_with_interventions)(m, _with_token(50), []),
     ValueError, r"expected ids in \[0, 50\)"),
    ("run_with_interventions", "float tokens", lambda m, g, d: U(run_with_interventions)(m, _tok().float(), []),
     TypeError, "expected an integer dtype"),
    ("run_with_interventions", "1-D tokens", lambda m, g, d: U(run_with_interventions)(m, _tok()[0], []),
     ValueError, r"add a batch axis with tokens\[None\]"),
    ("run_with_interventions", "empty batch", lambda m, g, d: U(run_with_interventions)(m, _tok()[:0], []),
     ValueError, "at least one prompt"),
    ("run_with_interventions", "longer than n_ctx", lambda m, g, d: U(run_with_interventions)(m, _tok(1, 40), []),
     ValueError, "at most n_ctx=32 positions"),
    ("run_with_interventions", "left-padded Batch",
     lambda m, g, d: U(run_with_interventions)(m, Batch.pad([[1, 2], [3, 4, 5]], side="left"), []),
     ValueError, r"left-padded Batch; pass batch.right\(\)"),
    ("intervene", "position past the sequence", lambda m, g, d: _run_forward(m, _tok(), [Zero(Node(0, "resid_pre", pos=7))]),
     ValueError, r"positions expected in \[-6, 6\) for a sequence of 6"),
    ("intervene", "position past n_ctx", lambda m, g, d: _run_forward(m, _tok(), [Zero("blocks.0.hook_resid_pre", pos=[1, 40])]),
     ValueError, r"positions expected in \[-32, 32\) \(n_ctx\), got \[40\]"),
    ("intervene", "float position", lambda m, g, d: _run_forward(m, _tok(), [_unchecked(Zero, "blocks.0.hook_resid_pre", pos=1.5)]),
     ValueError, "positions expected None, an int or a non-empty list of ints"),
    ("intervene", "layer out of range", lambda m, g, d: _run_forward(m, _tok(), [Zero(Node(3, "resid_pre"))]),
     ValueError, r"layer expected in \[0, 3\), got 3"),
    ("intervene", "K/V head >= n_key_value_heads (GQA)", lambda m, g, d: _run_forward(g, _tok(), [Zero(Node(0, "k", head=2))]),
     ValueError, r"KV group expected in \[0, 2\), got 2; K/V sites index KV groups"),
    ("intervene", "unknown hook name", lambda m, g, d: _run_forward(m, _tok(), [Zero("blocks.0.hook_resid_pr")]),
     ValueError, "closest"),
    ("intervene", "NaN steering value", lambda m, g, d: _run_forward(m, _tok(), [Set("blocks.0.hook_resid_pre", value=float("nan"))]),
     ValueError, "expected a finite value, got NaN/Inf"),
    ("Node", "float head", lambda m, g, d: _unchecked(Node, 0, "head", head=1.0), TypeError, "Node.head: expected None or an int"),
    ("collect", "token id -1", lambda m, g, d: U(collect)(m, _with_token(-1), hooks="blocks.0.hook_resid_post", progress=False),
     ValueError, r"expected ids in \[0, 50\)"),
    ("collect", "longer than n_ctx", lambda m, g, d: U(collect)(m, _tok(1, 40), hooks="blocks.0.hook_resid_post", progress=False),
     ValueError, "at most n_ctx=32"),
    ("collect", "empty batch", lambda m, g, d: U(collect)(m, _tok()[:0], hooks="blocks.0.hook_resid_post", progress=False),
     ValueError, "at least one prompt"),
    ("collect", "float positions", lambda m, g, d: U(collect)(m, _tok(), hooks="blocks.0.hook_resid_post", positions=[1.7],
                                                              progress=False),
     ValueError, "a non-empty list of ints or a bool mask"),
    ("collect", "position past a prompt", lambda m, g, d: U(collect)(m, _tok(), hooks="blocks.0.hook_resid_post", positions=[6],
                                                                     progress=False),
     ValueError, "within each prompt's length"),
    ("collect", "mask with too few rows", lambda m, g, d: U(collect)(m, _tok(3), hooks="blocks.0.hook_resid_post",
                                                                     positions=torch.ones(2, 6, dtype=torch.bool), progress=False),
     ValueError, r"positions mask: expected shape \(pos,\) or \(n_examples, pos\)"),
    ("collect", "layer out of range", lambda m, g, d: U(collect)(m, _tok(), hooks="blocks.*.hook_resid_post", layers=[3],
                                                                 progress=False),
     ValueError, r"expected values in \[0, 3\)"),
    ("sweep", "clean/corrupt of different lengths", lambda m, g, d: U(sweep)(m, _tok(2, 6), _tok(2, 5), M),
     ValueError, r"corrupted tokens: expected the clean shape \(2, 6\), got \(2, 5\)"),
    ("sweep", "token id >= d_vocab", lambda m, g, d: U(sweep)(m, _with_token(99), _tok(), M),
     ValueError, r"clean tokens: expected ids in \[0, 50\)"),
    ("sweep", "float tokens", lambda m, g, d: U(sweep)(m, _tok().float(), _tok(), M),
     TypeError, "clean tokens: expected an integer dtype"),
    ("sweep", "clean and corrupted lengths differ", lambda m, g, d: U(sweep)(m, Batch.pad([[1, 2], [3, 4, 5]]),
                                                                            Batch.pad([[1, 3, 4], [3, 2, 5]]), M),
     ValueError, r"corrupted prompt 0: expected its clean prompt's length 2, got 3 \(1 rows differ\)"),
    ("sweep", "longer than n_ctx", lambda m, g, d: U(sweep)(m, _tok(1, 33), _tok(1, 33), M),
     ValueError, "at most n_ctx=32"),
    ("sweep", "position out of range", lambda m, g, d: U(sweep)(m, _tok(), _tok(seed=1), M, positions=[6]),
     ValueError, r"positions: expected ints in \[0, 6\)"),
    ("sweep", "head out of range", lambda m, g, d: U(sweep)(m, _tok(), _tok(seed=1), M, site="head", heads=[4]),
     ValueError, r"heads: expected head indices in \[0, 4\)"),
    ("sweep", "K/V head >= n_key_value_heads (GQA)", lambda m, g, d: U(sweep)(g, _tok(), _tok(seed=1), M, site="v", heads=[3]),
     ValueError, r"heads: expected KV group indices in \[0, 2\)"),
    ("sweep", "unknown site", lambda m, g, d: U(sweep)(m, _tok(), _tok(seed=1), M, site="resid"),
     ValueError, "site: expected one of"),
    ("sweep", "metric returning one value per example", lambda m, g, d: U(sweep)(m, _tok(), _tok(seed=1), lambda lg, p: lg[:, -1, :3]),
     ValueError, r"expected one value per example, shape \(2,\), got \(2, 3\)"),
    ("sweep", "metric returning None", lambda m, g, d: U(sweep)(m, _tok(), _tok(seed=1), lambda lg: None),
     TypeError, "expected a scalar tensor or number, got NoneType"),
    ("sweep", "metric labels of the wrong length", lambda m, g, d: U(sweep)(m, _tok(), _tok(seed=1), logprob(torch.tensor([1, 2, 3]))),
     ValueError, r"logprob answer: expected one token id per example \(2\)"),
    ("sweep", "metric answer id >= d_vocab", lambda m, g, d: U(sweep)(m, _tok(), _tok(seed=1), logit_diff(3, 70)),
     ValueError, r"logit_diff wrong: expected token ids in \[0, 50\)"),
    ("kv_patch", "group >= n_key_value_heads (GQA)", lambda m, g, d: U(kv_patch)(g, _tok(), _tok(seed=1), M, groups=[2]),
     ValueError, r"groups: expected KV group indices in \[0, 2\), got 2; K/V are per KV group"),
    ("kv_patch", "clean/corrupt of different batch sizes", lambda m, g, d: U(kv_patch)(m, _tok(2), _tok(3), M),
     ValueError, "corrupted tokens: expected the clean shape"),
    ("logit_lens", "token id -1", lambda m, g, d: U(logit_lens)(m, _with_token(-1), progress=False),
     ValueError, r"expected ids in \[0, 50\)"),
    ("logit_lens", "longer than n_ctx", lambda m, g, d: U(logit_lens)(m, _tok(1, 40), progress=False),
     ValueError, "at most n_ctx=32"),
    ("logit_lens", "position on a pad of a Batch",
     lambda m, g, d: U(logit_lens)(m, Batch.pad([[1, 2], [3, 4, 5]]), pos=2, progress=False),
     ValueError, "expected real \\(non-pad\\) positions"),
    ("logit_lens", "every position of a padded Batch", lambda m, g, d: U(logit_lens)(m, Batch.pad([[1, 2], [3, 4, 5]]), pos=None,
                                                                                      progress=False),
     ValueError, "expected explicit positions for a padded Batch"),
    ("logit_lens", "target labels of the wrong length", lambda m, g, d: U(logit_lens)(m, _tok(), target=torch.tensor([1, 2, 3]),
                                                                                      progress=False),
     ValueError, r"lens target: expected shape \(2,\)"),
    ("probing.fit", "NaN feature rows", lambda m, g, d: U(probing.fit)(_probe_feats().index_fill(1, torch.tensor([3, 9]), float("nan")),
                                                                       torch.arange(40) % 2, n_boot=10),
     ValueError, r"NaN/Inf in 2 of 40 rows \[3, 9\] at layers \[0, 1\]"),
    ("probing.fit", "NaN regression labels", lambda m, g, d: U(probing.fit)(_probe_feats(), torch.randn(40).index_fill(0, torch.tensor([5]), float("nan")),
                                                                            "ridge", n_boot=10),
     ValueError, r"probe labels: expected finite values, got NaN/Inf at rows \[5\]"),
    ("last_token_sufficiency", "longer than n_ctx",
     lambda m, g, d: U(last_token_sufficiency)(m, Prompts.from_tokens(_tok(4, 40), answers=[0] * 4)),
     ValueError, "at most n_ctx=32 positions"),
    ("multihop", "longer than n_ctx",
     lambda m, g, d: U(multihop)(m, Prompts.from_tokens(_tok(4, 40), answers=[0] * 4,
                                                    partner=Prompts.from_tokens(_tok(4, 40, seed=1), answers=[1] * 4))),
     ValueError, "at most n_ctx=32 positions"),
    ("probing.fit", "labels of the wrong length", lambda m, g, d: U(probing.fit)(_probe_feats(), torch.arange(39) % 2, n_boot=10),
     ValueError, r"probe labels: expected shape \(40,\)"),
    ("probing.fit", "groups of the wrong length", lambda m, g, d: U(probing.fit)(_probe_feats(), torch.arange(40) % 2,
                                                                                 groups=torch.arange(30), n_boot=10),
     ValueError, r"probe groups: expected a tensor of shape \(40,\)"),
    ("probing.fit", "integer features", lambda m, g, d: U(probing.fit)(torch.ones(2, 40, 4, dtype=torch.long), torch.arange(40) % 2),
     TypeError, "expected a floating-point tensor"),
    ("probing.fit", "no layer axis", lambda m, g, d: U(probing.fit)(_probe_feats()[0], torch.arange(40) % 2),
     ValueError, r"add a layer axis with features\[None\]"),
]


def _raised_in_interp(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return Path(frames[-1].filename).resolve().is_relative_to(Path(__file__).resolve().parents[1] / "interp")


@pytest.mark.parametrize(("entry", "case", "call", "exc", "fragment"), CASES,
                         ids=[f"{e}: {c}" for e, c, *_ in CASES])
def test_bad_input_table(entry, case, call, exc, fragment, gpt2_model, llama_model, tmp_path):
    with pytest.raises(exc, match=fragment) as info:
        call(gpt2_model, llama_model, tmp_path)
    assert _raised_in_interp(info.value), f"{entry} / {case}: raised outside interp/: {info.value!r}"


def test_table_rows_are_unique():
    keys = [(e, c) for e, c, *_ in CASES]
    assert len(keys) == len(set(keys))


def test_check_tokens_names_the_first_bad_id():
    t = torch.zeros(2, 4, dtype=torch.long)
    t[1, 2] = -1
    with pytest.raises(ValueError, match=r"first at row 1, position 2"):
        check_tokens(t, 50)


# ----------------------------------------------------------------- NaN and Inf (issue 10, item 7)

def _nan_embedding(model, token: int):
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.embed.W_E[token] = float("nan")
    return bad


def test_collect_names_the_rows_and_hook_of_nan_activations(gpt2_model, tmp_path):
    bad = _nan_embedding(gpt2_model, 7)
    tokens = torch.randint(8, 50, (5, 6), generator=torch.Generator().manual_seed(0))
    tokens[1, 4] = tokens[3, 0] = 7
    with pytest.raises(ValueError, match=r"NaN/Inf at hook_embed in rows \[1, 3\]"):
        collect(bad, tokens, hooks=["hook_embed", "blocks.1.hook_resid_post"], progress=False)
    # streamed: the NaN batch never reaches the disk
    with pytest.raises(ValueError, match=r"at blocks.1.hook_resid_post in rows \[2, 3\]"):  # dataset rows
        collect(bad, tokens[[0, 2, 1, 3]], hooks="blocks.1.hook_resid_post", out=tmp_path / "s", batch_size=2,
                progress=False)
    assert not list((tmp_path / "s").glob("shard_*"))
    # rows without the NaN token are unaffected and still match the healthy model
    ok = collect(bad, tokens[[0, 2, 4]], hooks="blocks.1.hook_resid_post", progress=False)
    ref = collect(gpt2_model, tokens[[0, 2, 4]], hooks="blocks.1.hook_resid_post", progress=False)
    torch.testing.assert_close(ok["blocks.1.hook_resid_post"], ref["blocks.1.hook_resid_post"])


def test_collect_keeps_the_causal_mask_of_attention_scores(gpt2_model, tokens):
    cache = collect(gpt2_model, tokens, hooks="blocks.0.attn.hook_attn_scores", progress=False)
    assert bool(torch.isneginf(cache["blocks.0.attn.hook_attn_scores"]).any())  # -inf above the diagonal is fine


def test_sweep_refuses_nan_logits_and_names_the_rows(gpt2_model):
    bad = _nan_embedding(gpt2_model, 7)
    clean = torch.randint(8, 50, (3, 5), generator=torch.Generator().manual_seed(1))
    corrupt = clean.clone()
    corrupt[2, 1] = 7
    with pytest.raises(ValueError, match=r"corrupted run logits: expected finite values, got NaN in rows \[2\]"):
        sweep(bad, clean, corrupt, logprob(3))


def test_probe_with_nan_rows_raises_instead_of_falling_to_chance():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    x = torch.randn(3, 200, 8, generator=g)
    x[:, :, 0] += 3.0 * (2 * y - 1)
    clean = probing.fit(x, y, n_boot=20)
    assert float(clean.value.min()) > 0.9
    x[:, [10, 50, 90, 130, 170], 2] = float("nan")
    for kind in ("logistic", "ridge"):
        with pytest.raises(ValueError, match=r"NaN/Inf in 5 of 200 rows \[10, 50, 90, 130, 170\] at layers \[0, 1, 2\]"):
            probing.fit(x, y.double() if kind == "ridge" else y, kind, n_boot=20)


# ------------------------------------------------------------- padding and tokens (item 9)

def test_logit_lens_on_a_left_padded_batch_equals_each_prompt_alone(any_model):
    prompts = [[5, 9, 2, 11], [7, 3], [1, 2, 3, 4, 5, 6]]
    batch = Batch.pad(prompts, side="left", pad_id=0)
    res = logit_lens(any_model, batch, k=3, keep_logits=True, progress=False)  # default: each last real token
    assert res.positions[:, 0].tolist() == [5, 5, 5]  # reported in the caller's (left) layout
    by_tensor = logit_lens(any_model, batch, pos=batch.last, k=3, keep_logits=True, progress=False)
    torch.testing.assert_close(by_tensor.logits, res.logits, rtol=0, atol=0)
    for i, p in enumerate(prompts):
        alone = logit_lens(any_model, torch.tensor([p]), k=3, keep_logits=True, progress=False)
        torch.testing.assert_close(res.logits[:, i], alone.logits[:, 0], rtol=1e-4, atol=1e-4)
        want = any_model(torch.tensor([p]))[0, -1]
        torch.testing.assert_close(res.logits[-1, i, 0], want, rtol=1e-4, atol=1e-4)
    # an explicit position counts from each prompt's own start
    res1 = logit_lens(any_model, batch, pos=1, keep_logits=True, progress=False)
    torch.testing.assert_close(res1.logits[-1, 1, 0], any_model(torch.tensor([prompts[1]]))[0, 1], rtol=1e-4, atol=1e-4)
    assert res1.positions[:, 0].tolist() == [3, 5, 1]


def test_run_with_interventions_on_a_right_padded_batch(gpt2_model):
    prompts = [[5, 9, 2, 11], [7, 3]]
    batch = Batch.pad(prompts, side="right", pad_id=0)
    logits, _ = run_with_interventions(gpt2_model, batch, [Zero(Node(1, "resid_pre", pos=1))])
    for i, p in enumerate(prompts):
        alone, _ = run_with_interventions(gpt2_model, torch.tensor([p]), [Zero(Node(1, "resid_pre", pos=1))])
        torch.testing.assert_close(logits[i, : len(p)], alone[0], rtol=1e-4, atol=1e-4)


def test_sweep_accepts_an_unpadded_batch(gpt2_model):
    clean, corrupt = _tok(2, 5), _tok(2, 5, seed=1)
    want = sweep(gpt2_model, clean, corrupt, logprob(3), layers=[1])
    got = sweep(gpt2_model, Batch.of(clean), Batch.of(corrupt), logprob(3), layers=[1])
    torch.testing.assert_close(got.values, want.values, rtol=0, atol=0)


def test_collect_to_a_store_writes_nothing_on_bad_input(gpt2_model, tmp_path):
    bad = _tok(130, 6)
    bad[100, 2] = 50  # in the third batch of 64: the first two would already be on disk
    with pytest.raises(ValueError, match=r"ids in \[0, 50\)"):
        collect(gpt2_model, bad, hooks="blocks.0.hook_resid_post", out=tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()



def test_logit_finiteness_check_reads_real_positions_only_and_survives_a_sum_overflow():
    """The engine's one-pass check (`check_finite_logits`): an Inf or NaN at a real position
    raises naming the row, a NaN at a pad position does not, and finite logits whose sum
    overflows float32 pass (the exact element-wise check decides)."""
    from interp.patching.engine import check_finite_logits
    from interp.prompts import Prompts

    p = Prompts.from_tokens([torch.tensor([1, 2, 3]), torch.tensor([4, 5])], side="right")
    logits = torch.zeros(2, 3, 4)
    logits[1, 2] = float("nan")  # row 1's pad position
    assert check_finite_logits(logits, p, "x") is logits
    huge = torch.full((2, 3, 4), 3e38)  # finite; every position's sum is inf in float32
    assert check_finite_logits(huge, p, "x") is huge
    for bad in (float("inf"), float("-inf"), float("nan")):
        x = logits.clone()
        x[0, 1, 3] = bad
        x[1, 2] = float("inf")  # row 1's pad: not counted
        with pytest.raises(ValueError, match=r"x: expected finite values, got (NaN|Inf) in rows \[0\]"):
            check_finite_logits(x, p, "x")
