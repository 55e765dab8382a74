"""probes: config loading, resumable sweeps (counted fits), process and Ray backends, CLI."""

from __future__ import annotations

import re

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from interp.models import ModelLoadError, new_model, save_model
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
        (r"sweep config \S+bad\.yaml", {"modles": ["x"], "extra": 1}, "['extra', 'modles']"),
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
    cfg = _config(model_dir, tmp_path / "b", hooks=["resid_post"])
    cell_path(cfg, plan(cfg)[0]).unlink()  # an interrupted parallel run resumes: only the lost cell is refitted
    again = sweep(cfg, workers=2, progress=False)
    assert (again.n_fitted, again.n_skipped) == (1, 2)
    pd.testing.assert_frame_equal(serial.frame, again.frame)


def test_ray_backend_on_a_local_instance(model_dir, tmp_path, ray_local):
    serial = sweep(_config(model_dir, tmp_path / "a", hooks=["resid_post"], positions=["last"]), progress=False)
    res = sweep(_config(model_dir, tmp_path / "b", hooks=["resid_post"], positions=["last"]),
                backend="ray", progress=False)
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


# ------------------------------------------------------------------ trust: no stale cells, checked input


def _small(model_dir, out, seed=0, n=N, C=1.0) -> SweepConfig:
    """One cell whose accuracy depends on the data seed, n and C (the bridge entity at the last position)."""
    return SweepConfig.from_dict({
        "name": "trust", "data": {"organism": "multihop", "n": n, "seed": seed, "kwargs": {"two_hop_share": 1.0}},
        "models": [model_dir], "hooks": ["resid_post"], "positions": ["last"],
        "targets": [{"name": "bridge", "field": "bridge", "kind": "logistic", "control": "token@fact1_pos"}],
        "probe": {"n_boot": 20, "C": C}, "out": str(out)})


@pytest.mark.parametrize("change, over", [("data.seed", {"seed": 1}), ("data.n", {"n": 160}),
                                          ("probe.C", {"C": 0.01})])
def test_changed_config_recomputes_cells_like_a_fresh_sweep(model_dir, tmp_path, change, over):
    """Regression: cells were 'done' when their file existed, so a changed data seed, n or C reported
    the old cells (or fitted new labels against the old activations)."""
    first = sweep(_small(model_dir, tmp_path / "run"), progress=False)
    changed = sweep(_small(model_dir, tmp_path / "run", **over), progress=False)
    fresh = sweep(_small(model_dir, tmp_path / "fresh", **over), progress=False)  # independent reference
    assert (changed.n_fitted, changed.n_skipped) == (1, 0)
    assert any(c.startswith(f"{change}: ") for c in changed.changed), changed.changed
    pd.testing.assert_frame_equal(changed.frame, fresh.frame)
    assert not first.frame["value"].equals(fresh.frame["value"])  # the change does move the numbers
    back = sweep(_small(model_dir, tmp_path / "run"), progress=False)  # the first config's cells are still there
    assert (back.n_fitted, back.n_skipped) == (0, 1)
    pd.testing.assert_frame_equal(back.frame, first.frame)


def test_cells_without_their_store_are_refitted_on_the_new_data(model_dir, tmp_path):
    """Regression: with the cell files gone but the store kept, new labels met the old store's activations."""
    sweep(_small(model_dir, tmp_path / "run"), progress=False)
    for f in (tmp_path / "run" / "cells").glob("*.parquet"):
        f.unlink()
    got = sweep(_small(model_dir, tmp_path / "run", seed=1), progress=False)
    fresh = sweep(_small(model_dir, tmp_path / "fresh", seed=1), progress=False)
    pd.testing.assert_frame_equal(got.frame, fresh.frame)


def _yaml(tmp_path, d) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


def test_config_wrong_types_get_one_clear_message(model_dir, tmp_path):
    good = _config(model_dir, tmp_path / "x").to_dict()
    cases = [
        ({"data": good["data"] | {"n": "many"}}, r"data\.n: expected an integer, got 'many' \(str\); e\.g\. `n: 2000`"),
        ({"data": good["data"] | {"seed": 1.5}}, r"data\.seed: expected an integer, got 1\.5 \(float\)"),
        ({"probe": {"C": "1e-3"}}, r"probe\.C: expected a number, got '1e-3' \(str\); .*write 1\.0e-3"),
        ({"probe": {"shuffled": "yes"}}, r"probe\.shuffled: expected true or false, got 'yes' \(str\)"),
        ({"probe": {"alphas": 1.0}}, r"probe\.alphas: expected a list of numbers, got 1\.0 \(float\)"),
        ({"models": 5}, r"models: expected a list of strings, got 5 \(int\)"),
        ({"layers": ["a"]}, r"layers: expected a list of integers or null, got \['a'\] \(list\)"),
        ({"batch_size": "64"}, r"batch_size: expected an integer, got '64' \(str\)"),
        ({"targets": [good["targets"][0] | {"kind": 3}]}, r"targets\[0\]\.kind: expected a string, got 3 \(int\)"),
        ({"positions": [1.5]}, r"positions: expected an int, 'last', 'all' or a non-empty list of ints, got 1\.5 \(float\)"),
        ({"data": "multihop"}, r"data: expected a mapping of DataSpec fields, got 'multihop' \(str\)"),
    ]
    for patch, message in cases:
        path = _yaml(tmp_path, good | patch)
        with pytest.raises(ValueError, match=rf"sweep config {re.escape(path)}: {message}"):
            load_config(path)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ndata: {organism: multihop, n: 100\nmodels: [a]\n")
    with pytest.raises(ValueError, match=rf"sweep config {re.escape(str(path))}:3:7: expected valid YAML, got a syntax error "
                                         r"\(while parsing a flow mapping started at line 2: .*fix the file at line 3"):
        load_config(path)
    res = CliRunner().invoke(app, ["sweep", str(path)])
    assert res.exit_code == 2 and f"{path}:3:7" in res.output and "--debug" in res.output
    res = CliRunner().invoke(app, ["sweep", str(path), "--debug"])
    assert isinstance(res.exception, ValueError) and res.exception.__cause__ is not None  # the traceback


@pytest.mark.parametrize("patch, error, message", [
    ({"data": {"organism": "multihop", "n": N, "kwargs": {"two_hop_sharee": 1.0}}}, ValueError,
     r"data\.kwargs: expected keyword arguments of the multihop dataset among \['two_hop_share'\], got unknown "
     r"\['two_hop_sharee'\]"),
    ({"data": {"organism": "multihopp", "n": N}}, ValueError, r"data\.organism: organism 'multihopp'"),
    ({"targets": [{"name": "b", "field": "bridgee"}]}, ValueError,
     r"target 'b' field 'bridgee': expected a tensor attribute of the dataset, got NoneType; available: .*'bridge'"),
    ({"positions": [50]}, ValueError, r"positions 50: expected indices in \[-\d+, \d+\)"),
    ({"layers": [0, 99]}, ValueError, r"layers: expected indices below the 4 layers of"),
    ({"models": ["/no/such/model"]}, ModelLoadError, r"model '/no/such/model': expected a model directory"),
], ids=["dataset-kwarg", "organism", "target-field", "position-range", "layer-range", "model-path"])
def test_bad_input_is_refused_before_any_file_is_written(model_dir, tmp_path, patch, error, message):
    """Regression: the output folder and config were written first, and a bad target field failed only
    after the activation store had been built."""
    out = tmp_path / "run"
    cfg = SweepConfig.from_dict(_small(model_dir, out).to_dict() | patch)
    with pytest.raises(error, match=message):
        sweep(cfg, progress=False)
    assert not out.exists()


def test_retrained_checkpoint_in_the_same_folder_is_recomputed(model_dir, tmp_path):
    """Regression: a model folder whose weights were replaced (retrained) kept its old cells and store."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(model_dir, ckpt)
    first = sweep(_small(str(ckpt), tmp_path / "run"), progress=False)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        other = save_model(new_model(multihop.config()), tmp_path / "other")
    for name in ("model.safetensors", "manifest.json"):
        shutil.copy(other / name, ckpt / name)
    got = sweep(_small(str(ckpt), tmp_path / "run"), progress=False)
    fresh = sweep(_small(str(other), tmp_path / "fresh"), progress=False)
    cols = ["layer", "value", "ci_low", "ci_high", "control", "shuffled"]
    pd.testing.assert_frame_equal(got.frame[cols], fresh.frame[cols])
    assert got.n_fitted == 1 and any(c.startswith("models.") and ".sha256: " in c for c in got.changed), got.changed
    assert not first.frame["value"].equals(fresh.frame["value"])


@pytest.mark.parametrize("family_", ["llama", "neox"])
def test_sweep_on_a_hugging_face_folder_matches_library_fit(family_, tmp_path):
    """A probe sweep over an HF folder (a TransformerBridge) and its random-initialised twin: the
    sweep's numbers equal interp.probing.fit on the Bridge's own run_with_cache activations."""
    import hf_zoo

    from interp.arch import is_bridge
    from interp.models import load_model
    from probes.sweep import build_model

    folder = str(hf_zoo.build(family_, tmp_path / family_, vocab_size=multihop.config().d_vocab))
    cfg = _config(folder, tmp_path / "run", models=[folder, "random:" + folder],
                  hooks=["resid_post"], positions=["last"],
                  targets=[{"name": "queried", "field": "a", "kind": "logistic", "control": "example"}])
    res = sweep(cfg, progress=False)
    model = load_model(folder)
    assert is_bridge(model) and is_bridge(build_model("random:" + folder))
    data = multihop.dataset(N, 0, two_hop_share=1.0)
    with torch.inference_mode():
        _, cache = model.run_with_cache(data.tokens)
    feats = torch.stack([cache[f"blocks.{i}.hook_resid_post"][:, -1] for i in range(2)])
    ref = fit(feats, data.a, "logistic", types=torch.arange(N), n_boot=50, seed=0)
    got = res.frame[res.frame["model"] == folder].sort_values("layer")
    torch.testing.assert_close(torch.tensor(got["value"].to_numpy()), ref.value)
    torch.testing.assert_close(torch.tensor(got["control"].to_numpy()), ref.control)
    assert len(res.frame[res.frame["model"] == "random:" + folder]) == 2
