"""The prompt sets for pretrained models (data/prompts/) go through the same investigations.

No pretrained weights are reachable here, so a byte-level BPE tokenizer trained offline on the
prompt sets (with the `tokenizers` library, a small vocabulary so that names and numbers split
into several tokens, as GPT-2's do) stands in for GPT-2's on a random-initialised model: this
checks the inputs' ground truth and the plumbing with multi-token names, not GPT-2."""

from __future__ import annotations

import pytest
import torch
from conftest import gpt2_config

from interp.data import read_jsonl, retrieval_prompts
from interp.hypotheses import multihop, positional_decay
from interp.hypotheses.inputs import _retrieval_prompts, _twohop_prompts
from interp.models import data_dir, new_model
from interp.tokens import HFTokenizer

TWOHOP = read_jsonl(data_dir() / "prompts" / "twohop_gpt2.jsonl")
RETRIEVAL = retrieval_prompts(200, n_pairs=12, seed=0)


ENTITIES = sorted({r[k] for r in TWOHOP for k in ("bridge", "answer")})


def train_bpe(extra: list[str]):
    """A GPT-2-like byte-level BPE (leading spaces belong to the word) trained on the prompt
    sets (+ `extra` text), with a vocabulary small enough that names take several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [r["text"] for r in TWOHOP] + [r["text"] for r in RETRIEVAL] + extra
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=800, special_tokens=["<bos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>")


@pytest.fixture(scope="module")
def bpe():
    """Most names split (72 of 100 entity names), and first tokens are shared (" Fl", " Ch")."""
    return train_bpe([])


@pytest.fixture(scope="module")
def bpe_words():
    """Bridges and answers seen often enough to be mostly whole tokens (as GPT-2's countries and
    capitals are); every subject takes several tokens, and prompt lengths vary."""
    return train_bpe([" " + w for w in ENTITIES] * 30)


def n_tokens(hf, word: str) -> int:
    return len(hf.encode(" " + word, add_special_tokens=False))


def test_the_stand_in_tokenizers_split_names(bpe, bpe_words):
    words = {r[k] for r in TWOHOP for k in ("subject", "bridge", "answer")}
    assert sum(n_tokens(bpe, w) > 1 for w in words) > len(words) / 2
    subjects = {r["subject"] for r in TWOHOP}
    assert all(n_tokens(bpe_words, w) > 1 for w in subjects)
    assert len({len(bpe_words.encode(r["text"])) for r in TWOHOP}) > 3  # lengths vary


def test_twohop_prompt_set_refuses_labels_that_merge_entities(bpe):
    """With " Florida" and " France" both starting " F...", a first-token label would merge two
    bridges into one class (23 bridges -> 9 labels before the fix): such prompts are left out,
    and too few left is a clear error, not a wrong probe target."""
    with pytest.raises(ValueError, match="unambiguous first tokens"):
        _twohop_prompts(_model_with(bpe), seed=0, tokenizer=HFTokenizer(bpe))


def _model_with(hf):
    return new_model(gpt2_config(d_vocab=len(hf), n_ctx=160))


def test_twohop_prompt_set_labels_and_partners(bpe_words):
    bpe = bpe_words
    tok = HFTokenizer(bpe)
    model = _model_with(bpe)
    x = _twohop_prompts(model, seed=0, tokenizer=tok, min_prompts=8)
    assert x.tokens.shape[0] >= 8 and x.tokens.shape == x.partner_tokens.shape
    first = {w: bpe.encode(" " + w, add_special_tokens=False)[0] for r in TWOHOP for w in (r["bridge"], r["answer"])}
    by_text = {r["text"]: r for r in TWOHOP}
    for i in range(x.tokens.shape[0]):
        assert int(x.tokens[i, 0]) == bpe.bos_token_id
        rec = by_text[bpe.decode(x.tokens[i, 1:].tolist())]
        # the labels are the first token of the record's answer / bridge (what the model must predict next)
        assert int(x.answer[i]) == first[rec["answer"]] and int(x.bridge[i]) == first[rec["bridge"]]
        partner = by_text[bpe.decode(x.partner_tokens[i, 1:].tolist())]
        assert partner["relation"] == rec["relation"] and partner["bridge"] != rec["bridge"]
        assert int(x.partner_answer[i]) == first[partner["answer"]]
    # a label token names one entity: no two bridges (or answers) kept share a first token, and a
    # partner's answer never shares the base answer's first token (else "switching" is free)
    kept = [by_text[bpe.decode(t[1:].tolist())] for t in x.tokens]
    for field in ("bridge", "answer"):
        ents = {r[field] for r in kept}
        assert len({first[e] for e in ents}) == len(ents), field
    assert bool((x.partner_answer != x.answer).all())
    # plumbing on a random model (it solves nothing); the rows twice, as multihop needs 20 to split probes
    two = lambda t: torch.cat([t, t])  # noqa: E731
    r = multihop(model, two(x.tokens), two(x.bridge), two(x.answer), partner_tokens=two(x.partner_tokens),
                 partner_answer=two(x.partner_answer), positions=x.positions, control_types=two(x.control_types))
    assert not r.verdict.supported


def test_retrieval_prompt_set_by_distance(bpe):
    tok = HFTokenizer(bpe)
    model = _model_with(bpe)
    sets = _retrieval_prompts(model, n_per=16, seed=0, tokenizer=tok)
    assert len(sets) >= 3
    recs = retrieval_prompts(16 * 12, n_pairs=12, seed=0)
    for s in sets.values():
        for i in range(s.tokens.shape[0]):
            text = bpe.decode(s.tokens[i, 1:].tolist())
            rec = next(r for r in recs if r["text"] == text)
            # the fact's tokens spell exactly " KEY's number is VALUE." and the answer is VALUE's first token
            fact = bpe.decode(s.tokens[i, list(s.fact_pos)].tolist())
            assert fact.strip() == f"{rec['key']}'s number is {rec['answer'].strip()}.", (fact, rec)
            assert int(s.answer[i]) == bpe.encode(rec["answer"], add_special_tokens=False)[0]
    r = positional_decay({"random": model}, sets)
    assert not r.verdict.supported
    m = r.models["random"]  # a model that does not retrieve gets no profile and no decay length
    assert not m.clean_shows_behaviour and m.profile is None and m.decay_fit.length is None
