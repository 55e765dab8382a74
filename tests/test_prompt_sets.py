"""The prompt sets for pretrained models (data/prompts/) go through the same investigations.

No pretrained weights are reachable here, so a word-level tokenizer over the prompt sets'
vocabulary stands in for GPT-2's (same `encode(text, add_special_tokens=False)` interface) on a
random-initialised model: this checks the inputs' ground truth and the plumbing, not GPT-2."""

from __future__ import annotations

import re

from conftest import gpt2_config

from interp.data import read_jsonl, retrieval_prompts
from interp.hypotheses import multihop, positional_decay
from interp.hypotheses.inputs import _retrieval_prompts, _twohop_prompts
from interp.models import data_dir, new_model
from interp.tokens import HFTokenizer


class WordTokenizer:
    """Splits on spaces and punctuation; a leading space belongs to the word (like GPT-2)."""

    bos_token_id = 0

    def __init__(self, texts: list[str]) -> None:
        words = sorted({w for t in texts for w in self._split(t)} | {self._split(" " + x)[0] for t in texts
                                                                     for x in t.split()})
        self.vocab = ["<bos>", *words]
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @staticmethod
    def _split(text: str) -> list[str]:
        return re.findall(r" ?[A-Za-z]+|'s| ?\d+|[.,]", text)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.index[w] for w in self._split(text)]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)


def _model_with(tok: WordTokenizer):
    return new_model(gpt2_config(d_vocab=len(tok.vocab), n_ctx=128))


def test_twohop_prompt_set_labels_and_partners():
    recs = read_jsonl(data_dir() / "prompts" / "twohop_gpt2.jsonl")
    texts = [r["text"] for r in recs] + [" " + r[k] for r in recs for k in ("bridge", "answer", "subject")]
    tok = WordTokenizer(texts)
    model = _model_with(tok)
    x = _twohop_prompts(model, seed=0, tokenizer=HFTokenizer(tok))
    assert x.tokens.shape[0] >= 20 and x.tokens.shape == x.partner_tokens.shape
    # ground truth: the answer token is the first token of the record's answer; partners differ in bridge
    for i in range(5):
        text = tok.decode(x.tokens[i].tolist()[1:])
        rec = next(r for r in recs if r["text"] == text)
        assert tok.vocab[int(x.answer[i])] == " " + rec["answer"].split()[0]
        assert tok.vocab[int(x.bridge[i])] == " " + rec["bridge"].split()[0]
    assert bool((x.partner_answer != x.answer).any())
    r = multihop(model, x.tokens, x.bridge, x.answer, partner_tokens=x.partner_tokens,
                 partner_answer=x.partner_answer, positions=x.positions, control_types=x.control_types)
    assert not r.verdict.supported  # a random model solves nothing


def test_retrieval_prompt_set_by_distance():
    recs = retrieval_prompts(200, n_pairs=12, seed=0)
    tok = WordTokenizer([r["text"] for r in recs])
    model = _model_with(tok)
    sets = _retrieval_prompts(model, n_per=16, seed=0, tokenizer=HFTokenizer(tok))
    assert len(sets) >= 3
    for s in sets.values():
        # the fact's tokens spell "KEY's number is VALUE." and the answer is VALUE
        fact = tok.decode(s.tokens[0, list(s.fact_pos)].tolist())
        assert fact.strip().endswith(".") and "number is" in fact
        assert tok.vocab[int(s.answer[0])].strip() in fact
    r = positional_decay({"random": model}, sets)
    assert not r.verdict.supported
    m = r.models["random"]  # a model that does not retrieve gets no profile and no decay length
    assert not m.clean_shows_behaviour and m.profile is None and m.decay_fit.length is None
