"""probes: config loading, resumable sweeps (counted fits), process and Ray backends, CLI."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from interp.models import new_model, save_model
from interp.organisms import multihop
from interp.probing import fit
from probes.cli import app
from probes.config import SweepConfig, load_config
from probes.sweep import cell_path, plan, sweep

N = 240


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random-initialised model of the multihop organism's shape, saved like a checkpoint."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = new_model(multihop.config())
    return str(save_model(model, tmp_path_factory.mktemp("models") / "mh"))


def _config(model_dir, out, **over) -> SweepConfig:
    d = {
        "name": "test-sweep",
        "data": {"organism": "multihop", "n": N, "seed": 0, "kwargs": {"two_hop_share": 1.0}},
        "models": [model_dir],
        "hooks": ["resid_pre", "resid_post"],
        "positions": ["last", -2],
        "targets": [
            {"name": "queried", "field": "a", "kind": "logistic", "control": "example"},
            {"name": "pos", "field": "position", "kind": "ridge", "control": "token",
             "positions": [[1, 2, 3, 4, 5, 6]]},
        ],
        "probe": {"n_boot": 50, "alphas": [0.1, 1.0, 10.0]},
        "out": str(out),
    }
    d.update(over)
    return SweepConfig.from_dict(d)


def test_config_rejects_unknown_keys_and_lists_them(tmp_path):
    good = yaml.safe_load(open("probes/configs/multihop_bridge.yaml"))
    assert load_config("probes/configs/multihop_bridge.yaml").targets[0].control == "token@fact1_pos"
    for where, patch, unknown in [
        ("sweep config", {"modles": ["x"], "extra": 1}, "['extra', 'modles']"),
        ("data", {"data": good["data"] | {"seeds": 1}}, "['seeds']"),
        ("targets[0]", {"targets": [good["targets"][0] | {"kinds": "ridge"}]}, "['kinds']"),
        ("probe", {"probe": {"c": 1.0}}, "['c']"),
    ]:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(good | patch))
        with pytest.raises(ValueError, match=rf"{where}: expected keys among .* got unknown keys {unknown!s}".replace("[", r"\[").replace("]", r"\]")):
            load_config(path)
    with pytest.raises(ValueError, match="hooks: expected site names"):
        SweepConfig.from_dict(good | {"hooks": ["resid_postt"]})
    with pytest.raises(ValueError, match="expected pooled positions"):
        SweepConfig.from_dict(good | {"targets": [{"name": "p", "field": "position", "kind": "ridge"}]})


def test_sweep_matches_library_fit_and_resumes(model_dir, tmp_path):
    cfg = _config(model_dir, tmp_path / "run")
    cells = plan(cfg)
    assert len(cells) == 2 * (2 + 1)  # hooks x (2 positions for `queried` + 1 pooled entry for `pos`)
    first = sweep(cfg, progress=False)
    assert (first.n_fitted, first.n_skipped) == (6, 0)
    again = sweep(cfg, progress=False)
    assert (again.n_fitted, again.n_skipped) == (0, 6)  # nothing refitted
    pd.testing.assert_frame_equal(first.frame, again.frame)
    cell_path(cfg, cells[1]).unlink()  # lose one finished cell: exactly that one is refitted
    third = sweep(cfg, progress=False)
    assert (third.n_fitted, third.n_skipped) == (1, 5)
    pd.testing.assert_frame_equal(first.frame, third.frame)

    # the sweep's numbers equal interp.probing.fit on activations from TransformerLens's own cache
    from interp.models import load_model

    model = load_model(model_dir)
    data = multihop.dataset(N, 0, two_hop_share=1.0)
    _, cache = model.run_with_cache(data.tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
    feats = torch.stack([cache["resid_post", layer][:, -1] for layer in range(model.cfg.n_layers)])
    ref = fit(feats, data.a, "logistic", types=torch.arange(N), n_boot=50, seed=0)
    got = first.frame.query("hook == 'resid_post' and position == 'last' and target == 'queried'")
    torch.testing.assert_close(torch.tensor(got["value"].to_numpy()), ref.value)
    torch.testing.assert_close(torch.tensor(got["control"].to_numpy()), ref.control)
    torch.testing.assert_close(torch.tensor(got["ci_low"].to_numpy()), ref.ci_low)
    # ground truth of any model with learned positions: resid_pre 0 = token + position embedding, so
    # the absolute position is decodable there; shuffled positions are not
    pos = first.frame.query("hook == 'resid_pre' and target == 'pos' and layer == 0").iloc[0]
    assert pos["value"] > 0.95 and pos["ci_low"] > 0.9 and pos["shuffled"] < 0.05
    assert {"probes.parquet", "probes.csv", "probes.html"} <= {p.name for p in (tmp_path / "run").iterdir()}
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "run" / "probes.parquet"), first.frame)


def test_worker_processes_give_the_same_table(model_dir, tmp_path):
    serial = sweep(_config(model_dir, tmp_path / "a", hooks=["resid_post"]), progress=False)
    par = sweep(_config(model_dir, tmp_path / "b", hooks=["resid_post"]), workers=2, progress=False)
    assert par.n_fitted == serial.n_fitted == 3
    pd.testing.assert_frame_equal(serial.frame, par.frame)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="ray is not installed (optional extra: pip install 'interp[ray]')")
def test_ray_backend_on_a_local_instance(model_dir, tmp_path):
    import ray

    serial = sweep(_config(model_dir, tmp_path / "a", hooks=["resid_post"], positions=["last"]), progress=False)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        res = sweep(_config(model_dir, tmp_path / "b", hooks=["resid_post"], positions=["last"]),
                    backend="ray", progress=False)
    finally:
        ray.shutdown()
    assert res.n_fitted == 2
    pd.testing.assert_frame_equal(serial.frame, res.frame)


def test_cli_sweep_and_plan(model_dir, tmp_path):
    cfg = _config(model_dir, tmp_path / "cli", hooks=["resid_post"], positions=["last"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    runner = CliRunner()
    res = runner.invoke(app, ["sweep", str(path), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "fitted 2 cells, skipped 0" in res.output
    res = runner.invoke(app, ["sweep", str(path), "--quiet"])
    assert "fitted 0 cells, skipped 2" in res.output
    res = runner.invoke(app, ["plan", str(path)])
    assert res.output.count("done") == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg.to_dict() | {"workers": 3}))
    res = runner.invoke(app, ["sweep", str(bad)])
    assert res.exit_code == 2 and "unknown keys ['workers']" in res.output
