"""Model loading and saving: round trips for both families, clear errors for bad specs."""

from __future__ import annotations

import json

import pytest
import torch

from interp.arch import Arch
from interp.models import ModelLoadError, load_model, read_manifest, save_model


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
