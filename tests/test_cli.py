"""The `interp` command: help, models, cache, and clear errors (run as a user would)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

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
