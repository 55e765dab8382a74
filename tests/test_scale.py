"""probes.grid: patching and investigation sweeps over models x prompt sets x methods, resumable
cell by cell, on the local, process and Ray backends; numbers equal the library called directly."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from interp.hypotheses.run import run_last_token
from interp.metrics import logit_diff
from interp.models import load_model
from interp.organisms import multihop
from interp.patching import sweep
from probes.cli import app
from probes.grid import GridConfig, cell_path, grid, load_grid_config, plan
from probes.identity import prompts_identity

N = 24
GRID_COLUMNS = ["model", "prompt_set", "method_name"]


def _config(out, **over) -> GridConfig:
    d = {"name": "test-grid", "out": str(out),
         "models": ["organism:multihop", "random:organism:multihop"],
         "prompts": [{"organism": "multihop", "n": N, "seed": 0}],
         "methods": [{"name": "resid", "method": "patch",
                      "params": {"site": "resid_pre", "positions": ["fact1", "last"], "metric": "logit_diff"}},
                     {"name": "suff", "method": "last-token"}],
         "n_boot": 100}
    d.update(over)
    return GridConfig.from_dict(d)


class Interrupt(Exception):
    pass


def _stop_after(k: int):
    seen = []

    def on_cell(record):
        seen.append(record)
        if len(seen) == k:
            raise Interrupt
    return on_cell


def _cell(frame: pd.DataFrame, model: str, method: str) -> pd.DataFrame:
    rows = frame[(frame["model"] == model) & (frame["method_name"] == method)]
    return rows.drop(columns=GRID_COLUMNS).dropna(axis=1, how="all").reset_index(drop=True)


def _same(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Equal tables up to column order and int -> float (the combined table's concat)."""
    want = want.dropna(axis=1, how="all")
    assert sorted(got.columns) == sorted(want.columns)
    pd.testing.assert_frame_equal(got[sorted(got.columns)], want[sorted(want.columns)], check_dtype=False)


def test_grid_equals_direct_calls_and_resumes_after_an_interruption(tmp_path):
    cfg = _config(tmp_path / "run")
    cells = plan(cfg)
    assert len(cells) == 4
    with pytest.raises(Interrupt):
        grid(cfg, on_cell=_stop_after(2))
    assert len(list((tmp_path / "run" / "cells").glob("*.parquet"))) == 2  # each finished cell is on disk
    resumed = grid(cfg)
    assert (resumed.n_computed, resumed.n_skipped) == (2, 2)
    again = grid(cfg)
    assert (again.n_computed, again.n_skipped) == (0, 4)  # nothing recomputed
    pd.testing.assert_frame_equal(resumed.frame, again.frame)

    # each cell equals the library function called directly
    model = load_model("organism:multihop")
    direct = sweep(model, multihop.prompts(N, 0), logit_diff(), site="resid_pre", positions=["fact1", "last"],
                   n_boot=100).to_frame()
    _same(_cell(again.frame, "organism:multihop", "resid"), direct)
    direct_lt = run_last_token("organism:multihop", n=N, seed=0, model=model)
    got = _cell(again.frame, "organism:multihop", "suff")
    _same(got.drop(columns=["verdict", "verdict_sentence"]), direct_lt.to_frame().rename(columns={"model": "result_model"}))
    assert bool(got["verdict"].iloc[0]) == direct_lt.verdict.supported
    # ground truth of the organism: patching the clean residual at the query (last) position from
    # layer 1 on restores the clean answer; the random baseline restores nothing comparable
    trained = _cell(again.frame, "organism:multihop", "resid").query("pos == 'last' and layer >= 1")
    rand = _cell(again.frame, "random:organism:multihop", "resid").query("pos == 'last' and layer >= 1")
    assert (trained["normalised"] > 0.95).all() and (trained["ci_low"] > 10).all()
    assert (rand["value"].abs() < trained["ci_low"].min()).all()

    # a changed parameter makes new cells (the old ones stay on disk, unused)
    changed = grid(_config(tmp_path / "run", n_boot=200))
    assert (changed.n_computed, changed.n_skipped) == (2, 2)  # the patching cells; last-token has no n_boot
    assert any("n_boot" in c for c in changed.changed)


def test_worker_processes_give_the_same_table(tmp_path):
    one = _config(tmp_path / "a", methods=[{"name": "resid", "method": "patch", "params": {"site": "resid_pre"}}])
    serial = grid(one)
    par = grid(_config(tmp_path / "b", methods=[{"name": "resid", "method": "patch", "params": {"site": "resid_pre"}}]),
               workers=2)
    assert par.n_computed == serial.n_computed == 2
    pd.testing.assert_frame_equal(serial.frame, par.frame)


def test_ray_backend_interrupted_then_resumed_on_a_local_instance(tmp_path, ray_local):
    methods = [{"name": f"p-{site}", "method": "patch", "params": {"site": site, "positions": ["last"]}}
               for site in ("resid_pre", "attn_out", "v")]
    cfg = _config(tmp_path / "ray", models=["organism:multihop"], methods=methods)
    local = grid(_config(tmp_path / "local", models=["organism:multihop"], methods=methods))
    with pytest.raises(Interrupt):
        grid(cfg, backend="ray", on_cell=_stop_after(1))
    # the interrupted map cancelled and settled its other tasks before returning
    written = len(list((tmp_path / "ray" / "cells").glob("*.parquet")))
    assert 1 <= written < 3
    resumed = grid(cfg, backend="ray")
    assert (resumed.n_computed, resumed.n_skipped) == (3 - written, written)
    again = grid(cfg)
    assert (again.n_computed, again.n_skipped) == (0, 3)
    pd.testing.assert_frame_equal(resumed.frame, local.frame)
    model = load_model("organism:multihop")
    direct = sweep(model, multihop.prompts(N, 0), logit_diff(), site="v", positions=["last"], n_boot=100).to_frame()
    _same(_cell(resumed.frame, "organism:multihop", "p-v"), direct)


def test_config_errors_and_prompt_file_identity(tmp_path):
    good = _config(tmp_path / "x").to_dict()
    for patch, match in [
        ({"modles": []}, r"unknown keys \['modles'\]"),
        ({"methods": [{"name": "a", "method": "pach"}]}, r"expected one of \['patch'"),
        ({"methods": [{"name": "a", "method": "patch", "params": {"sites": "v"}}]}, r"unknown keys \['sites'\]"),
        ({"methods": [{"name": "a", "method": "patch", "params": {"metric": "kl"}}]}, "metric: expected one of"),
        ({"prompts": [{"organism": "multihop", "path": "x.jsonl"}]}, "expected a JSONL path or an organism"),
    ]:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(good | patch))
        with pytest.raises(ValueError, match=match):
            load_grid_config(path)
    with pytest.raises(ValueError, match="builds the prompts of the model's own organism"):
        grid(_config(tmp_path / "y", prompts=[{"organism": "planning", "n": 8}]))
    # a JSONL prompt set is identified by its content: an edit makes new cells, a touch does not
    f = tmp_path / "set.jsonl"
    f.write_text(json.dumps({"prompt": "a b", "answer": " c"}) + "\n")
    first = prompts_identity({"path": str(f)})
    f.write_text(f.read_text())
    assert prompts_identity({"path": str(f)}) == first
    f.write_text(json.dumps({"prompt": "a b", "answer": " d"}) + "\n")
    assert prompts_identity({"path": str(f)}) != first
    cfg = _config(tmp_path / "z", prompts=[str(f)], models=["organism:multihop"], methods=good["methods"][:1])
    before = cell_path(cfg, plan(cfg)[0])
    f.write_text(json.dumps({"prompt": "a b", "answer": " e"}) + "\n")
    assert cell_path(cfg, plan(cfg)[0]) != before


def test_cli_grid_and_plan(tmp_path):
    cfg = _config(tmp_path / "cli", models=["organism:multihop"],
                  methods=[{"name": "resid", "method": "patch", "params": {"site": "resid_pre"}}])
    path = tmp_path / "g.json"  # JSON configs work as YAML does
    path.write_text(json.dumps(cfg.to_dict()))
    runner = CliRunner()
    res = runner.invoke(app, ["grid", str(path), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "computed 1 cells, skipped 0" in res.output
    res = runner.invoke(app, ["grid", str(path), "--quiet"])
    assert "computed 0 cells, skipped 1" in res.output
    res = runner.invoke(app, ["grid-plan", str(path)])
    assert res.output.count("done") == 1
    frame = pd.read_parquet(tmp_path / "cli" / "grid.parquet")
    assert torch.isfinite(torch.tensor(frame["value"].to_numpy())).all()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(cfg.to_dict() | {"workers": 3}))
    res = runner.invoke(app, ["grid", str(bad)])
    assert res.exit_code == 2 and "unknown keys ['workers']" in res.output
