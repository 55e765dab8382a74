"""The shipped prompt sets (data/prompts/*.jsonl) go through the investigations whole.

No pretrained weights are reachable here, so a byte-level BPE tokenizer trained offline on the
prompt sets (with the `tokenizers` library, a small vocabulary so that names and numbers split
into several tokens, as GPT-2's do) stands in for GPT-2's on a random-initialised model: this
checks the sets' schema, spans and partners and the plumbing with multi-token names and prompts
of many lengths (no modal-length filter), not GPT-2."""

from __future__ import annotations

import json

import pytest
import torch

from interp.hypotheses import inputs, positional_decay
from interp.hypotheses.base import random_like
from interp.models import data_dir, new_model
from interp.prompts import LAST, read_prompts
from tests.conftest import gpt2_config

SETS = data_dir() / "prompts"


def lines(name: str) -> list[dict]:
    return [json.loads(x) for x in (SETS / name).read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def bpe():
    """A GPT-2-like byte-level BPE (leading spaces belong to the word) trained on the prompt sets,
    with a vocabulary small enough that names take several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [o[k] for name in ("twohop.jsonl", "retrieval.jsonl") for x in lines(name) for o in (x, x["partner"])
             for k in ("prompt", "answer")]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=800, special_tokens=["<bos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>")


@pytest.fixture(scope="module")
def model(bpe):
    m = new_model(gpt2_config(d_vocab=len(bpe), n_ctx=512))
    m.tokenizer = bpe
    return m


def test_twohop_set_keeps_every_prompt_with_spans_and_partners(bpe, model):
    recs = lines("twohop.jsonl")
    x = inputs.twohop("pretrained", model, prompts=SETS / "twohop.jsonl")
    p = x.prompts
    assert len(p) == len(recs) and len(set(p.prompt_lengths.tolist())) > 1  # every length kept
    for i in (0, 17, len(recs) - 1):
        r = recs[i]
        # the subject span covers exactly the subject's characters; the answer follows the prompt
        s = p.span("subject")[i]
        ids = p.right().tokens[i, s[0]:s[1]].tolist()
        assert bpe.decode(ids).strip() == r["spans"]["subject"]
        assert bpe.decode(p.answers[i, : int(p.answer_lengths[i])].tolist()) == r["answer"]
        assert bpe.decode(p.partner.answers[i, : int(p.partner.answer_lengths[i])].tolist()) == r["partner"]["answer"]
        assert r["partner"]["meta"]["relation"] == r["meta"]["relation"]
        assert r["partner"]["meta"]["bridge"] != r["meta"]["bridge"]
        # the bridge label: the first token of meta.bridge as the prompt's continuation
        want = bpe(r["prompt"] + r["meta"]["bridge"], add_special_tokens=False)["input_ids"]
        got = bpe(r["prompt"], add_special_tokens=False)["input_ids"]
        assert int(x.bridge[i]) == want[len(got)]
        # control type: the subject's first token
        assert int(x.control_types[i]) == int(p.right().tokens[i, s[0]])


def test_retrieval_set_decay_groups_every_prompt_by_its_own_distance(bpe, model):
    recs = lines("retrieval.jsonl")
    p = inputs.decay("pretrained", model, prompts=SETS / "retrieval.jsonl")
    assert len(p) == len(recs)
    dist = p.index(LAST) - p.index("fact")
    # the distance in tokens grows with the distance in lines (the fact line is k lines back)
    by_lines = torch.tensor([r["meta"]["distance_lines"] for r in recs])
    for k in range(1, 12):
        assert float(dist[by_lines == k].double().mean()) < float(dist[by_lines == k + 1].double().mean())
    # the partner changes only the number (the route's source) and so the answer
    src = p.span("source")
    for i in (0, 50):
        ids = p.right().tokens[i, src[i, 0]:src[i, 1]].tolist()
        assert bpe.decode(ids).strip() == recs[i]["answer"].strip()
    r = positional_decay({"m": model}, p, bins=(8, 16, 32, 64, 128, 256), baseline={"m": random_like(model)},
                         positions_per_prompt=4)
    m = r.models["m"]
    assert sum(len(v) for v in m.rows.values()) == len(recs)  # no prompt dropped
    for d, rows in m.rows.items():
        assert bool((dist[rows] <= d).all())
    assert not m.clean_shows_behaviour and m.profile is None  # a random model does not retrieve


def test_a_bad_line_names_its_number(tmp_path, bpe):
    bad = tmp_path / "bad.jsonl"
    text = (SETS / "twohop.jsonl").read_text().splitlines()
    bad.write_text("\n".join(text[:3] + ['{"prompt": "x", "answr": " y"}'] + text[3:5]) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:4: .*unknown \['answr'\]"):
        read_prompts(bad, bpe)
