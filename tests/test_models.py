"""Model loading and saving: round trips for both families, clear errors for bad specs."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest
import torch

from interp.arch import Arch
from interp.atomic import DestinationError
from interp.models import ModelLoadError, load_model, new_model, read_manifest, save_model


def test_save_load_roundtrip_same_logits(any_model, tokens, tmp_path):
    path = save_model(any_model, tmp_path / "m", manifest={"task": "unit"}, vocab=[f"t{i}" for i in range(50)])
    loaded = load_model(path)
    assert not loaded.training
    assert Arch.of(loaded) == Arch.of(any_model)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(tokens), any_model(tokens), rtol=0, atol=0)
    assert read_manifest(path)["task"] == "unit"
    assert (path / "tokenizer.json").is_file()
    # the weights are safetensors, and the sha256 recorded is the file's
    assert (path / "model.safetensors").read_bytes()[8:9] == b"{"


def test_load_casts_dtype(gpt2_model, tokens, tmp_path):
    path = save_model(gpt2_model, tmp_path / "m")
    half = load_model(path, dtype=torch.bfloat16)
    assert half.W_E.dtype == torch.bfloat16
    with torch.inference_mode():
        torch.testing.assert_close(half(tokens).float(), gpt2_model(tokens), atol=0.15, rtol=0.05)


def test_llama_family_is_grouped(llama_model):
    arch = Arch.of(llama_model)
    assert arch.grouped and arch.n_kv_heads == 2 and arch.positional == "rotary"


def test_corrupted_checkpoint_refused(gpt2_model, tmp_path):
    path = save_model(gpt2_model, tmp_path / "m")
    w = path / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="expected sha256"):
        load_model(path)


def test_truncated_checkpoint_without_manifest_refused(gpt2_model, tmp_path):
    path = save_model(gpt2_model, tmp_path / "m")
    (path / "manifest.json").unlink()
    w = path / "model.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    with pytest.raises(ModelLoadError, match="readable safetensors"):
        load_model(path)


def test_missing_files_and_bad_config(gpt2_model, tmp_path):
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(tmp_path)  # an existing dir that is not a model
    path = save_model(gpt2_model, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["n_lyers"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unknown keys"):
        load_model(path)


def test_unknown_name_suggests(monkeypatch):
    with pytest.raises(ModelLoadError, match="did you mean.*gpt2"):
        load_model("gtp2")


def test_offline_pretrained_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="Pre-download"):
        load_model("pythia-70m")


def test_unknown_organism(monkeypatch, tmp_path):
    monkeypatch.setenv("INTERP_DATA", str(tmp_path))
    with pytest.raises(ModelLoadError, match="organisms train"):
        load_model("organism:nope")


# ------------------------------------------------------------------ saving never deletes user files

def _logits(model, tokens):
    with torch.inference_mode():
        return model(tokens)


def test_save_into_a_user_folder_is_refused_and_keeps_its_files(gpt2_model, tmp_path):
    (tmp_path / "notes.txt").write_text("my results")
    with pytest.raises(DestinationError, match="non-empty directory that is not one.*notes.txt"):
        save_model(gpt2_model, tmp_path)
    assert os.listdir(tmp_path) == ["notes.txt"]  # nothing written, nothing deleted
    assert (tmp_path / "notes.txt").read_text() == "my results"


def test_overwrite_replaces_only_the_models_own_files(gpt2_model, llama_model, tokens, tmp_path):
    path = save_model(gpt2_model, tmp_path / "m", vocab=[f"t{i}" for i in range(50)])
    (path / "notes.txt").write_text("my results")
    with pytest.raises(DestinationError, match="existing interp model; pass overwrite=True"):
        save_model(llama_model, path)
    torch.testing.assert_close(_logits(load_model(path), tokens), _logits(gpt2_model, tokens), rtol=0, atol=0)
    save_model(llama_model, path, overwrite=True)  # no vocab this time: the old tokenizer.json goes
    assert sorted(os.listdir(path)) == ["config.json", "manifest.json", "model.safetensors", "notes.txt"]
    assert (path / "notes.txt").read_text() == "my results"
    torch.testing.assert_close(_logits(load_model(path), tokens), _logits(llama_model, tokens), rtol=0, atol=0)


def test_save_onto_an_existing_file_is_refused(gpt2_model, tmp_path):
    f = tmp_path / "results.csv"
    f.write_text("a,b\n1,2\n")
    with pytest.raises(DestinationError, match="got an existing file"):
        save_model(gpt2_model, f)
    with pytest.raises(DestinationError, match="a path under the file"):
        save_model(gpt2_model, f / "m")
    assert os.listdir(tmp_path) == ["results.csv"] and f.read_text() == "a,b\n1,2\n"  # no .old left


def test_save_to_dot_and_relative_paths(gpt2_model, tokens, tmp_path, monkeypatch):
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    save_model(gpt2_model, ".")
    save_model(gpt2_model, "sub/m")
    for spec in (".", "sub/m", here, here / "sub" / "m"):
        torch.testing.assert_close(_logits(load_model(spec), tokens), _logits(gpt2_model, tokens), rtol=0, atol=0)
    with pytest.raises(DestinationError, match="pass overwrite=True"):
        save_model(gpt2_model, ".")


def test_hugging_face_folder_loads_as_a_bridge(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from interp.arch import is_bridge

    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=16, vocab_size=20)).eval()
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)  # no tokenizer files: the model still loads
    assert is_bridge(model) and Arch.of(model).n_layers == 1
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-5, rtol=0)
    (tmp_path / "model.safetensors").unlink()  # config only (weights not downloaded): a clear error
    with pytest.raises(ModelLoadError, match="expected weights"):
        load_model(tmp_path)


# ---------------------------------------------------- shipped checkpoints are failures, never skips

TESTS = Path(__file__).resolve().parent
_SHIPPED = re.compile(r"organism|checkpoint|shipped|ModelLoadError|SAELoadError|list_saes|sae:", re.I)


def _skips_of_shipped_checkpoints(path: Path) -> list[str]:
    """`pytest.skip(...)` / `skipif(...)` calls in `path` conditioned on (or explaining) a checkpoint."""
    tree = ast.parse(path.read_text())
    src = path.read_text()
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("skip", "skipif")):
            continue
        context = [ast.get_source_segment(src, node) or ""]
        up = parents.get(node)
        while up is not None and not isinstance(up, ast.FunctionDef | ast.Module):
            if isinstance(up, ast.If):
                context.append(ast.get_source_segment(src, up.test) or "")
            if isinstance(up, ast.ExceptHandler) and up.type is not None:
                context.append(ast.get_source_segment(src, up.type) or "")
            up = parents.get(up)
        if _SHIPPED.search(" ".join(context)):
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_no_test_skips_when_a_shipped_checkpoint_is_missing_or_corrupted():
    # A skip would hide a corrupted checkpoint (ModelLoadError is also the sha256 mismatch).
    offenders = [hit for f in sorted(TESTS.glob("test_*.py")) for hit in _skips_of_shipped_checkpoints(f)]
    assert offenders == []


def test_a_corrupted_shipped_checkpoint_fails_the_lens_test(tmp_path, monkeypatch):
    import importlib.util
    import shutil

    from interp.models import organisms_dir

    shutil.copytree(organisms_dir() / "planning", tmp_path / "organisms" / "planning")
    w = tmp_path / "organisms" / "planning" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-4] + b"\0\0\0\0")  # its sha256 no longer matches the manifest
    monkeypatch.setenv("INTERP_DATA", str(tmp_path))
    spec = importlib.util.spec_from_file_location("_lens_tests", TESTS / "test_lens.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        mod.test_future_lens_on_the_planning_organism_beats_bigram()
    except pytest.skip.Exception as e:
        pytest.fail(f"a corrupted shipped checkpoint was skipped, not failed: {e}")
    except ModelLoadError as e:
        assert "expected sha256" in str(e)
    else:
        pytest.fail("the lens test ran on a corrupted checkpoint")


def test_new_model_does_not_share_its_config(gpt2_model):
    # Regression: a twin built from another model's cfg shared the object, so `twin.to(bf16)`
    # silently turned the original's cfg.dtype into bfloat16 (and its saves into bf16 checkpoints).
    twin = new_model(gpt2_model.cfg)
    twin.to(torch.bfloat16)
    assert gpt2_model.cfg.dtype == torch.float32
    assert twin.cfg.dtype == torch.bfloat16
