"""Tokenizers, token validation and padded batches."""

from __future__ import annotations

import pytest
import torch

from interp.tokens import Batch, VocabTokenizer, check_tokens, realign


def test_vocab_tokenizer_roundtrip():
    tok = VocabTokenizer(("a", "b", "->", "?"))
    ids = tok.encode("a -> b ?")
    assert ids == [0, 2, 1, 3]
    assert tok.decode(ids) == "a -> b ?"
    with pytest.raises(ValueError, match="unknown token"):
        tok.encode("a c")


@pytest.mark.parametrize(
    ("bad", "match"),
    [(torch.zeros(2, 3), "integer dtype"), (torch.zeros(3, dtype=torch.long), "tokens\\[None\\]"),
     (torch.full((1, 3), 60), r"ids in \[0, 50\)"), ([1, 2], "torch.Tensor")],
)
def test_check_tokens_errors(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        check_tokens(bad, d_vocab=50)


def test_batch_layouts_hand_built():
    b = Batch.pad([[1, 2], [3, 4, 5]], side="left", pad_id=9)
    assert b.tokens.tolist() == [[9, 1, 2], [3, 4, 5]]
    assert b.mask.tolist() == [[False, True, True], [True, True, True]]
    assert b.last.tolist() == [2, 2]
    r = b.right()
    assert r.tokens.tolist() == [[1, 2, 9], [3, 4, 5]]
    assert r.last.tolist() == [1, 2]
    x = torch.tensor([[10.0, 20.0, 0.0], [1.0, 2.0, 3.0]])
    assert b.to_layout(x).tolist() == [[0.0, 10.0, 20.0], [1.0, 2.0, 3.0]]


def test_realign_inverse():
    x = torch.randn(4, 6, 3)
    s = torch.tensor([0, 1, 2, 5])
    torch.testing.assert_close(realign(realign(x, s), -s), x)


def test_batch_validation():
    with pytest.raises(ValueError, match="lengths"):
        Batch(torch.zeros(2, 3, dtype=torch.long), torch.tensor([1, 4]))
