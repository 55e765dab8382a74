"""interp.metrics precision: statistics are computed in at least float32 (float64 logits stay
float64; bf16 logits are promoted to float32), checked against a hand computation in Python floats."""

from __future__ import annotations

import math

import pytest
import torch

from interp.metrics import answer_logprob, from_scalar, kl_to, logit_diff
from interp.prompts import Prompts


def _hand_logprob(row: list[float], i: int) -> float:
    m = max(row)
    return row[i] - (m + math.log(sum(math.exp(x - m) for x in row)))


def _case(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    # logits with more significant digits than float32 holds (values near 1e3 + small offsets)
    logits = (1000 + torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * 1e-3).to(dtype)
    partner = Prompts.from_tokens(torch.tensor([[1, 2, 3], [3, 2, 1]]), answers=torch.tensor([4, 0]))
    p = Prompts.from_tokens(torch.tensor([[0, 1, 2], [2, 1, 0]]), answers=torch.tensor([1, 3]), partner=partner)
    return logits, p


def test_float64_logits_give_float64_metrics_equal_to_a_hand_computation():
    # regression: every metric read `.float()`, so float64 logits lost precision (errors ~1e-4 here)
    logits, p = _case(torch.float64)
    rows = logits[:, -1].tolist()  # the last prompt position (single-token answers)
    lp = answer_logprob()(logits, p)
    assert lp.dtype == torch.float64
    want = torch.tensor([_hand_logprob(rows[0], 1), _hand_logprob(rows[1], 3)], dtype=torch.float64)
    torch.testing.assert_close(lp, want, atol=1e-12, rtol=0)
    ld = logit_diff()(logits, p)
    assert ld.dtype == torch.float64
    torch.testing.assert_close(ld, torch.tensor([rows[0][1] - rows[0][4], rows[1][3] - rows[1][0]],
                                                dtype=torch.float64), atol=1e-12, rtol=0)
    ref = logits[:, -1].flip(0)
    kl = kl_to(ref)(logits, p)
    assert kl.dtype == torch.float64
    want_kl = []
    for r, q in zip(ref.tolist(), rows, strict=True):
        lr = [_hand_logprob(r, i) for i in range(5)]
        lq = [_hand_logprob(q, i) for i in range(5)]
        want_kl.append(sum(math.exp(a) * (a - b) for a, b in zip(lr, lq, strict=True)))
    torch.testing.assert_close(kl, torch.tensor(want_kl, dtype=torch.float64), atol=1e-12, rtol=0)
    scalar = from_scalar(lambda x: x[0, -1, 0])(logits, p)
    assert scalar.dtype == torch.float64
    torch.testing.assert_close(scalar, logits[:, -1, 0], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_logits_give_float32_metrics(dtype):
    logits, p = _case(dtype)
    want = answer_logprob()(logits.double(), p)  # the same (rounded) logits, in float64
    for metric in (answer_logprob(), logit_diff(), kl_to(logits[:, -1].flip(0))):
        assert metric(logits, p).dtype == torch.float32, (metric.name, dtype)
    torch.testing.assert_close(answer_logprob()(logits, p), want.float(), atol=1e-4, rtol=0)
