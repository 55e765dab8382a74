"""The `interp` command: help, models, cache, and clear errors (run as a user would)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from interp import cli
from interp.models import save_model
from interp.store import open_store

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def interp(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "interp.cli", *args], capture_output=True, text=True,
                          env=ENV, check=check, timeout=300)


def test_help_lists_commands():
    out = interp("--help").stdout
    for cmd in ("models", "cache", "demo", "organisms", "sae", "run"):
        assert cmd in out, cmd


# What `interp ... --help` may not import: it would cost ~10 s of start-up on a shared CPU.
HEAVY = ("torch", "transformer_lens", "sae_lens", "pandas", "plotly", "sklearn")
HELP_PROBE = """
import runpy, sys
sys.argv = ["interp", *sys.argv[1:]]
try:
    runpy.run_module("interp.cli", run_name="__main__")
except SystemExit as e:
    assert e.code in (0, None), e.code
print(sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], ["models", "--help"], ["cache", "--help"], ["demo", "--help"],
                                  ["probe-sweep", "--help"], ["organisms", "--help"], ["organisms", "train", "--help"],
                                  ["sae", "--help"], ["sae", "train", "--help"], ["run", "--help"],
                                  ["run", "decay", "--help"]], ids=" ".join)
def test_help_imports_no_torch(argv):
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", HELP_PROBE.format(heavy=HEAVY), *argv], capture_output=True,
                         text=True, env=ENV, timeout=120)
    elapsed = time.perf_counter() - t0
    print(f"interp {' '.join(argv)}: {elapsed:.2f} s (goal < 2 s; bench/cli_help.py times each command)")
    assert res.returncode == 0, res.stderr[-2000:]
    assert elapsed < 5, f"interp {' '.join(argv)} took {elapsed:.1f} s"  # generous: a shared CPU
    assert res.stdout.strip().splitlines()[-1] == "[]", res.stdout
    assert "Usage: interp" in res.stdout


@pytest.mark.parametrize("module", ["interp", "interp.sae"])
def test_lazy_public_names_resolve(module):
    m = importlib.import_module(module)
    assert set(m._LAZY) == set(m.__all__)  # a name added to __all__ needs its module in _LAZY
    for name in m.__all__:
        assert getattr(m, name) is getattr(importlib.import_module(m._LAZY[name]), name), name
        assert name in dir(m)
    with pytest.raises(AttributeError):
        m.not_a_name  # noqa: B018


def test_errors_from_interp_are_one_line_bugs_keep_their_traceback(gpt2_model, tmp_path, monkeypatch, capsys):
    import interp.cache

    model_dir = save_model(gpt2_model, tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text('{"tokens": [1, 2]}\n')
    argv = ["cache", str(model_dir), str(data), "--hooks", "blocks.0.hook_resid_pots", "--out", str(tmp_path / "s")]
    with pytest.raises(SystemExit) as e:  # interp's own validation: one line, exit 2
        cli.main(argv)
    assert e.value.code == 2 and "closest" in capsys.readouterr().err
    with pytest.raises(Exception, match="closest") as e:  # --debug: the exception itself, traceback and all
        cli.main(["--debug", *argv])
    assert not isinstance(e.value, SystemExit)
    monkeypatch.setenv("INTERP_DEBUG", "1")
    with pytest.raises(Exception, match="closest"):
        cli.main(argv)
    monkeypatch.delenv("INTERP_DEBUG")

    def bug(*args, **kwargs):
        raise ValueError("a ValueError raised outside interp's code is a bug, not a validation message")

    monkeypatch.setattr(interp.cache, "collect", bug)
    with pytest.raises(ValueError, match="is a bug"):
        cli.main(argv)

    def key_error(*args, **kwargs):
        return {}["missing"]

    monkeypatch.setattr(interp.cache, "collect", key_error)
    with pytest.raises(KeyError):
        cli.main(argv)


def test_cache_command_builds_a_store(gpt2_model, tmp_path):
    model_dir = save_model(gpt2_model, tmp_path / "m")
    data = tmp_path / "d.jsonl"
    rows = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]
    data.write_text("\n".join(json.dumps({"tokens": r}) for r in rows) + "\n")
    res = interp("cache", str(model_dir), str(data), "--hooks", "blocks.*.hook_resid_post", "--positions", "last",
                 "--out", str(tmp_path / "s"))
    assert "cached 3 prompts" in res.stdout
    store = open_store(tmp_path / "s")
    for i, r in enumerate(rows):
        _, ref = gpt2_model.run_with_cache(torch.tensor([r]))
        torch.testing.assert_close(store["blocks.2.hook_resid_post"][i, 0], ref["blocks.2.hook_resid_post"][0, -1],
                                   atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_one_line_errors(gpt2_model, tmp_path):
    model_dir = save_model(gpt2_model, tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text('{"tokens": [1, 2]}\n{"tokens": [1, 2\n')
    res = interp("cache", str(model_dir), str(data), "--hooks", "blocks.0.hook_resid_post", "--out",
                 str(tmp_path / "s"), check=False)
    assert res.returncode == 2
    assert "line 2: expected a JSON object" in res.stderr and "Traceback" not in res.stderr
    data.write_text('{"tokens": [1, 2]}\n')
    res = interp("cache", str(model_dir), str(data), "--hooks", "blocks.0.hook_resid_pots", "--out",
                 str(tmp_path / "s"), check=False)
    assert res.returncode == 2 and "closest" in res.stderr
    res = interp("cache", "gtp2", str(data), "--hooks", "x", "--out", str(tmp_path / "s"), check=False)
    assert res.returncode == 2 and "did you mean" in res.stderr


def test_probe_sweep_hands_over_to_probes(tmp_path):
    res = interp("probe-sweep", str(tmp_path / "missing.yaml"), check=False)
    assert res.returncode != 0 and "expected a YAML file" in res.stdout + res.stderr


def test_run_reports_never_replace_an_earlier_run(tmp_path):
    # Regression: every `interp run` wrote reports/run.html, silently replacing the last run's report.
    from interp.atomic import DestinationError
    from interp.cli_run import report_path

    first = report_path("decay", ["organism:retrieval-learned", "organism:retrieval-nope"], root=tmp_path)
    assert first == tmp_path / "run-decay-organism_retrieval-learned_organism_retrieval-nope.html"
    first.write_text("earlier run")
    second = report_path("decay", ["organism:retrieval-learned", "organism:retrieval-nope"], root=tmp_path)
    assert second.name.endswith("-2.html") and second != first
    assert report_path("routes", "/models/my-llama", root=tmp_path).name == "run-routes-my-llama.html"
    with pytest.raises(DestinationError, match="expected a new file, got an existing one; pass --overwrite"):
        report_path("decay", "x", first)
    assert report_path("decay", "x", first, overwrite=True) == first
    assert first.read_text() == "earlier run"  # nothing was written by choosing a path


def test_run_refuses_an_existing_out_before_any_work(tmp_path):
    out = tmp_path / "mine.html"
    out.write_text("keep me")
    res = interp("run", "routes", "--out", str(out), check=False)
    assert res.returncode == 2 and "pass --overwrite" in res.stderr and "Traceback" not in res.stderr
    assert out.read_text() == "keep me"


def test_organisms_eval_json_is_pure_json():
    # Regression: `--json` printed the metrics and then the acceptance table on stdout.
    res = interp("organisms", "eval", "planning", "--n", "64", "--json", check=False)
    doc = json.loads(res.stdout)
    assert doc["organism"] == "planning" and set(doc["acceptance"]) and doc["passed"] is (res.returncode == 0)
    assert all(r["value"] == pytest.approx(doc["metrics"][k]) for k, r in doc["acceptance"].items()
               if k in doc["metrics"])


# ---------------------------------------------------------------- interp run --prompts FILE.jsonl

def _write(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _city_sets(tmp_path):
    """JSONL prompt sets of different token lengths (CITY_PROMPTS): two-hop-style with partners,
    with a `fact` span at different distances, and with a same-length partner and a `source`."""
    from tests.conftest import CITY_PROMPTS

    k = len(CITY_PROMPTS)
    twohop, decay, routes = [], [], []
    for roll in (1, 2, 3, 4):
        for i, (text, subj, ans) in enumerate(CITY_PROMPTS):
            o_text, o_subj, o_ans = CITY_PROMPTS[(i + roll) % k]
            twohop.append({"prompt": text, "answer": ans, "spans": {"subject": subj}, "meta": {"bridge": ans},
                           "partner": {"prompt": o_text, "answer": o_ans, "spans": {"subject": o_subj}}})
            decay.append({"prompt": text, "answer": ans, "spans": {"fact": text.split()[roll % 2]}})
            routes.append({"prompt": text, "answer": ans, "spans": {"source": subj},
                           "partner": {"prompt": text, "answer": ans, "spans": {"source": subj}}})
    return (_write(tmp_path / "twohop.jsonl", twohop), _write(tmp_path / "decay.jsonl", decay),
            _write(tmp_path / "routes.jsonl", routes))


@pytest.fixture
def bpe_model(bpe_tokenizer):
    from interp.models import new_model
    from tests.conftest import gpt2_config

    model = new_model(gpt2_config())
    model.tokenizer = bpe_tokenizer
    return model


def test_run_commands_take_a_prompt_set_of_any_lengths(bpe_model, bpe_tokenizer, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from interp import cli_run
    from interp.hypotheses import run
    from interp.prompts import read_prompts

    twohop, decay, routes = _city_sets(tmp_path)
    lengths = read_prompts(twohop, bpe_tokenizer).prompt_lengths
    assert len(set(lengths.tolist())) == 5  # five token lengths, no modal-length filter
    monkeypatch.setattr(run, "load", lambda spec: bpe_model)
    cases = [("multihop", twohop), ("decay", decay), ("last-token", twohop), ("routes", routes)]
    for name, path in cases:
        out = tmp_path / f"{name}.html"
        res = CliRunner().invoke(cli_run.app, [name, "--model", "my-model", "--prompts", str(path), "--out", str(out)])
        assert res.exit_code == 0, (name, res.output, res.exception)
        assert out.is_file() and "Verdict" in out.read_text()
        assert f"{name}:" in res.output
    # what the command ran, called directly: every prompt kept, each read at its own last token
    r = run.run_last_token("my-model", prompts=twohop, model=bpe_model)
    assert r.clean.logprob.shape == (20,) and r.meta["lengths"] == sorted(set(lengths.tolist()))
    d = run.run_decay(["my-model"], prompts=decay, models={"m": bpe_model})
    assert sum(len(x) for x in d.models["m"].rows.values()) == 20 and len(d.distances) >= 3
    m = run.run_multihop("my-model", prompts=twohop, model=bpe_model)
    from interp.hypotheses import inputs

    x = inputs.twohop("my-model", bpe_model, prompts=twohop)  # meta.bridge is the answer in this set
    assert torch.equal(x.bridge, read_prompts(twohop, bpe_tokenizer).first_answer)
    assert m.probes[("last", "bridge")].meta["n"] == 20 and m.iia_logit_diff["last"].shape[1] == 20
    # the random model does not show a routes effect (the partner is the prompt itself): no verdict
    rr = run.run_routes("my-model", prompts=routes, model=bpe_model)
    assert not rr.clean_shows_behaviour and not rr.verdict.supported


def test_run_without_prompts_on_a_pretrained_model_says_what_to_pass(bpe_model, monkeypatch):
    from interp.hypotheses import run

    monkeypatch.setattr(run, "load", lambda spec: bpe_model)
    with pytest.raises(ValueError, match="--prompts FILE.jsonl"):
        run.run_multihop("my-model")
    with pytest.raises(ValueError, match="--prompts FILE.jsonl"):
        run.run_decay(["my-model"])


def test_models_table_fits_the_terminal_and_shows_results_not_settings():
    res = subprocess.run([sys.executable, "-m", "interp.cli", "models"], capture_output=True, text=True,
                         env={**ENV, "COLUMNS": "72"}, check=True, timeout=120)
    lines = res.stdout.splitlines()
    assert max(map(len, lines)) <= 72, max(lines, key=len)
    assert "eval_seed" not in res.stdout and "n_eval" not in res.stdout  # evaluation settings are not metrics
    from interp.models import list_organisms, read_manifest

    flat = " ".join(res.stdout.split()).replace("│", "").replace("  ", " ")
    for name in list_organisms():
        for c in read_manifest(f"organism:{name}")["acceptance"].values():
            assert f"{c['value']:.3g}" in flat, (name, c)  # the held-out acceptance values


def test_progress_is_plain_lines_off_a_terminal():
    import io

    from rich.console import Console

    from interp.progress import progress

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=200)
    with progress(console, "running decay", every=0.01):
        time.sleep(0.2)
    lines = buf.getvalue().splitlines()
    assert lines[0].endswith("running decay ...") and any("running decay: still running" in x for x in lines[1:])
    assert "\x1b" not in buf.getvalue()  # no spinner control codes in a log file


def test_demo_prints_a_line_per_investigation_off_a_terminal(monkeypatch):
    import io

    from rich.console import Console

    import interp.demo
    from interp.hypotheses.base import Verdict
    from interp.hypotheses.run import Sizes

    class Done:
        verdict = Verdict(True, "done")

    monkeypatch.setattr(interp.demo, "_jobs", lambda sizes: {"a": Done, "b": Done})
    buf = io.StringIO()
    interp.demo.run_investigations(Sizes.smoke(), Console(file=buf, force_terminal=False, width=200))
    out = buf.getvalue()
    assert "[1/2] running a ..." in out and "[2/2] running b ..." in out and "a (" in out and "done" in out



@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cache_text_follows_the_tokenizers_own_bos_rule(hf_folder, tmp_path, family):
    # regression: `interp cache` wrapped every Hugging Face tokenizer with always-add-BOS (and read a
    # Hugging Face folder's tokenizer.json as a word list: KeyError 'vocab'). The reference is the
    # toolkit's one rule, Prompts.from_text with the model's tokenizer; --(no-)prepend-bos forces it.
    from transformers import AutoTokenizer

    from interp.models import load_model
    from interp.prompts import Prompts

    folder = hf_folder(family)
    tok = AutoTokenizer.from_pretrained(folder)
    texts = ["the cat sat on the mat", "a dog ran"]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    model = load_model(folder)
    ref = Prompts.from_text(texts, model.tokenizer)
    plain = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    for flag, want in ((None, [ref.tokens[i, : int(ref.lengths[i])].tolist() for i in range(len(texts))]),
                       ("--prepend-bos", [[tok.bos_token_id, *w] for w in plain]), ("--no-prepend-bos", plain)):
        out = tmp_path / f"s{flag}"
        with pytest.raises(SystemExit) as done:
            cli.main(["cache", str(folder), str(data), "--hooks", "blocks.0.hook_resid_post", "--out", str(out),
                      *([flag] if flag else [])])
        assert done.value.code == 0
        store = open_store(out)
        assert store.lengths.tolist() == [len(w) for w in want], flag
        for i, w in enumerate(want):
            _, cache = model.run_with_cache(torch.tensor([w]))
            torch.testing.assert_close(store["blocks.0.hook_resid_post"][i, : len(w)],
                                       cache["blocks.0.hook_resid_post"][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cache_tokenizer_adds_bos_only_where_the_tokenizer_does(hf_folder, family):
    # regression: a tokenizer that has a BOS token but does not add one (GPT-2's, Olmo's as
    # TransformerLens attaches it) got one prepended by `interp cache` alone
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from interp.cli import _tokenizer_for

    tok = AutoTokenizer.from_pretrained(hf_folder(family))
    assert tok.bos_token_id is not None
    enc = _tokenizer_for("no-such-folder", SimpleNamespace(tokenizer=tok))
    for t in ("the cat sat on the mat", "a dog ran"):
        assert enc.encode(t) == tok(t)["input_ids"]  # the tokenizer's own encoding
    assert (enc.encode("a dog")[0] == tok.bos_token_id) == (family == "llama")
