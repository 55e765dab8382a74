"""Prompts and the per-example metric contract, against hand computations."""

from __future__ import annotations

import json

import pytest
import torch

from interp.metrics import answer_logprob, as_metric, kl_to, logit_diff, rank, top1
from interp.prompts import Prompts, as_prompts, read_prompts
from interp.tokens import VocabTokenizer, realign
from tests.conftest import CITY_PROMPTS

TOK = VocabTokenizer(tuple("a b c d e f g h".split()))


def test_vocab_tokenizer_spans_and_teacher_forced_answers():
    p = Prompts.from_text(["a b c", "d e f g h"], TOK, spans={"s": ["b", "e f"]}, answers=[" d e", " a"])
    # the first answer's tokens but the last are appended after its prompt
    assert p.tokens[0, :4].tolist() == [0, 1, 2, 3] and p.lengths.tolist() == [4, 5]
    assert p.prompt_lengths.tolist() == [3, 5]
    assert p.span("s").tolist() == [[1, 2], [1, 3]] and p.index("s").tolist() == [1, 2]
    assert p.index("last").tolist() == [2, 4] and p.span("answer").tolist() == [[2, 4], [4, 5]]
    assert p.answers.tolist() == [[3, 4], [0, -1]]


def test_answer_logprob_sums_teacher_forced_tokens_in_either_layout():
    p = Prompts.from_text(["a b c", "d e f g h"], TOK, answers=[" d e", " a"])
    logits = torch.randn(2, p.tokens.shape[1], 8, generator=torch.Generator().manual_seed(0))
    lp = logits.log_softmax(-1)
    want = torch.stack([lp[0, 2, 3] + lp[0, 3, 4], lp[1, 4, 0]])
    torch.testing.assert_close(answer_logprob()(logits, p), want)
    left = p.to_side("left")
    assert left.tokens[0].tolist() == [0, 0, 1, 2, 3]
    torch.testing.assert_close(answer_logprob()(realign(logits, left.shift()), left), want)
    assert torch.equal(left.right().tokens, p.tokens)
    # top-1: every answer token must be the argmax of its position
    hits = torch.tensor([float(logits[0, 2].argmax() == 3 and logits[0, 3].argmax() == 4),
                         float(logits[1, 4].argmax() == 0)])
    assert torch.equal(top1()(logits, p), hits)
    assert torch.equal(rank()(logits, p), torch.stack([(logits[0, 2] > logits[0, 2, 3]).sum(),
                                                        (logits[1, 4] > logits[1, 4, 0]).sum()]).float())


def test_logit_diff_reads_the_partners_answer_and_kl_is_zero_on_itself():
    partner = Prompts.from_text(["a b d", "d e f g a"], TOK, answers=[" e", " b"])
    p = Prompts.from_text(["a b c", "d e f g h"], TOK, answers=[" d", " a"], partner=partner)
    logits = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    want = torch.stack([logits[0, 2, 3] - logits[0, 2, 4], logits[1, 4, 0] - logits[1, 4, 1]])
    torch.testing.assert_close(logit_diff()(logits, p), want)
    ref = torch.stack([logits[0, 2], logits[1, 4]])
    torch.testing.assert_close(kl_to(ref)(logits, p), torch.zeros(2), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="partner"):
        logit_diff()(logits, p.with_partner(None))


def test_scalar_metrics_are_applied_per_example():
    logits = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(2))
    m = as_metric(lambda lg: lg[:, -1, 0].mean())
    torch.testing.assert_close(m(logits, as_prompts(torch.zeros(3, 4, dtype=torch.long))), logits[:, -1, 0])


def test_bpe_offsets_map_multi_token_names(bpe_tokenizer):
    texts = [p for p, _, _ in CITY_PROMPTS]
    p = Prompts.from_text(texts, bpe_tokenizer, spans={"subject": [s for _, s, _ in CITY_PROMPTS]},
                          answers=[a for _, _, a in CITY_PROMPTS])
    assert len(set(p.prompt_lengths.tolist())) > 1  # lengths differ
    for i, (_text, subject, answer) in enumerate(CITY_PROMPTS):
        s, e = p.span("subject")[i].tolist()
        assert e - s >= 2  # names of several tokens
        assert bpe_tokenizer.decode(p.tokens[i, s:e]).strip() == subject
        assert p.tokens[i, 0] == bpe_tokenizer.bos_token_id
        n = int(p.answer_lengths[i])
        assert bpe_tokenizer.decode(p.answers[i, :n]).strip() == answer.strip()


def test_read_prompts_jsonl_and_bad_lines(tmp_path, bpe_tokenizer):
    path = tmp_path / "p.jsonl"
    lines = [{"prompt": t, "answer": a, "spans": {"subject": s},
              "partner": {"prompt": t2, "answer": a2, "spans": {"subject": s2}}}
             for (t, s, a), (t2, s2, a2) in zip(CITY_PROMPTS, CITY_PROMPTS[1:] + CITY_PROMPTS[:1], strict=True)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    p = read_prompts(path, bpe_tokenizer, side="left")
    assert len(p) == 5 and p.side == "left" and p.partner is not None
    assert torch.equal(p.partner.answers[0], read_prompts(path, bpe_tokenizer).answers[1])
    bad = dict(lines[0]) | {"colour": 1}
    path.write_text(json.dumps(lines[0]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: .*unknown \['colour'\]"):
        read_prompts(path, bpe_tokenizer)
    path.write_text(json.dumps(lines[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2"):
        read_prompts(path, bpe_tokenizer)
    path.write_text(json.dumps({"prompt": "the colosseum is in", "spans": {"subject": "eiffel"}}) + "\n")
    with pytest.raises(ValueError, match="expected a substring"):
        read_prompts(path, bpe_tokenizer)


def test_bad_spans_and_reserved_names():
    with pytest.raises(ValueError, match="inside its 3 tokens"):
        Prompts.from_tokens([[1, 2, 3]], spans={"x": [(2, 5)]})
    with pytest.raises(ValueError, match="defined by the toolkit"):
        Prompts.from_tokens([[1, 2, 3]], spans={"last": [0]})
    p = Prompts.from_tokens([[1, 2, 3], [4, 5]], spans={"x": [-1, 0]}, answers=[[6, 7], 1])
    assert p.span("x").tolist() == [[3, 4], [0, 1]]  # -1: the last token of the (forced) sequence
    q = p.select([1])
    assert q.tokens.tolist() == [[4, 5]] and q.answers.tolist() == [[1, -1]]


# ------------------------------------------- real tokenizers of six HF families (tests/hf_zoo.py)

ZOO_TEXTS = [("the eiffel tower is in", "eiffel tower", " paris"), ("the capital of germany is", "germany", " berlin"),
             ("bob went to the park and saw", "park", " a dog")]


def test_from_text_follows_each_family_tokenizer(family, hf_folder):
    """Default BOS handling is the tokenizer's own (its post-processor): the prompt tokens equal
    ``tok(text).input_ids``; answers equal ``tok(prompt + answer)`` minus the prompt's tokens; a
    span's tokens decode to its text."""
    import hf_zoo
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_folder(family))
    texts = [t for t, _, _ in ZOO_TEXTS]
    p = Prompts.from_text(texts, tok, spans={"subject": [s for _, s, _ in ZOO_TEXTS]},
                          answers=[a for _, _, a in ZOO_TEXTS], side="left")
    r = p.right()
    for i, (text, subject, answer) in enumerate(ZOO_TEXTS):
        want = tok(text).input_ids
        n = int(p.prompt_lengths[i])
        assert r.tokens[i, :n].tolist() == want
        assert (want[0] == tok.bos_token_id) == (family in hf_zoo.BOS_FAMILIES)
        full = tok(text + answer).input_ids
        assert full[:n] == want  # these answers continue their prompts' tokens
        assert p.answers[i, : int(p.answer_lengths[i])].tolist() == full[n:]
        s, e = p.span("subject")[i].tolist()
        assert tok.decode(r.tokens[i, s:e]).strip() == subject
    # forced either way, and the toolkit's Tokenizer protocol (HFTokenizer) on the same tokenizer
    bos = tok.bos_token_id
    on = Prompts.from_text(texts, tok, prepend_bos=True)
    off = Prompts.from_text(texts, tok, prepend_bos=False)
    for i, text in enumerate(texts):
        plain = tok(text, add_special_tokens=False).input_ids
        assert on.tokens[i, : int(on.lengths[i])].tolist() == [bos, *plain]
        assert off.tokens[i, : int(off.lengths[i])].tolist() == plain
    from interp.tokens import HFTokenizer

    assert torch.equal(Prompts.from_text(texts, HFTokenizer(tok, prepend_bos=False)).tokens, off.tokens)


def test_prepend_bos_true_without_a_bos_token_raises(bpe_tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")  # like Qwen's: no BOS at all
    assert Prompts.from_text(["a b"], tok).tokens.tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="expected a tokenizer with a BOS token"):
        Prompts.from_text(["a b"], tok, prepend_bos=True)
