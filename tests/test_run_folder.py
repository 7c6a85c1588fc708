"""The one owner of a run folder, seen from every runtime: the same resume rules, the same
schema, nothing written after a refusal."""

from __future__ import annotations

import json

import pytest
from flwr.app import Context, RecordDict

from fedclip.config import RunConfig
from fedclip.core.records import RunResult, read_results_document
from fedclip.errors import ResumeError, RunFolderError
from fedclip.flower import secagg
from fedclip.flower.client_app import build_client_app
from fedclip.flower.server_app import main as server_main
from fedclip.inprocess import run
from tests.flower_grid import LocalGrid


def _in_process(toy_root, tiny_arch, out, **extra):  # noqa: ANN001, ANN202
    cfg = RunConfig.build(data_root=str(toy_root), backbone=tiny_arch, heldout="gamma",
                          lr=1e-3, personalize_epochs=1, **{"rounds": 2, **extra})
    return run(cfg, out)


def _flower(toy_root, tiny_arch, out, app=None, **extra):  # noqa: ANN001, ANN202
    run_config = {"backbone": tiny_arch, "data-root": str(toy_root), "heldout": "gamma",
                  "rounds": 2, "lr": 1e-3, "out": str(out), "classes": "cat,dog,red_car",
                  "personalize-epochs": 1, **extra}
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    if app is None:
        return server_main(LocalGrid(build_client_app(), nodes, run_config), run_config)
    grid = LocalGrid(app.build_client_app(), nodes, run_config)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=run_config)
    return app.run(grid, context, run_config)


def test_a_resume_into_fewer_rounds_is_refused_alike_in_both_runtimes(tiny_arch, toy_root,
                                                                      tmp_path):
    _in_process(toy_root, tiny_arch, tmp_path / "local", rounds=3)
    _flower(toy_root, tiny_arch, tmp_path / "flower", rounds=3)
    cfg = RunConfig.build(data_root=str(toy_root), backbone=tiny_arch, heldout="gamma",
                          lr=1e-3, personalize_epochs=1, rounds=2)
    with pytest.raises(ResumeError, match="cannot shrink") as local:
        run(cfg, tmp_path / "local", resume=True)
    with pytest.raises(ResumeError, match="cannot shrink") as flower:
        _flower(toy_root, tiny_arch, tmp_path / "flower", rounds=2, resume=True)
    assert str(local.value).split(" is at ")[1] == str(flower.value).split(" is at ")[1]
    # and neither starts over a run without being asked to
    with pytest.raises(ResumeError, match="resume"):
        _flower(toy_root, tiny_arch, tmp_path / "flower", rounds=3)


def test_every_runtime_writes_the_one_schema(tiny_arch, toy_root, tmp_path):
    produced = {
        "in-process": _in_process(toy_root, tiny_arch, tmp_path / "fedclip")[0],
        "local": _in_process(toy_root, tiny_arch, tmp_path / "local", algorithm="local")[0],
        "flower": _flower(toy_root, tiny_arch, tmp_path / "flower"),
        "flower-secagg+": _flower(toy_root, tiny_arch, tmp_path / "secagg", app=secagg),
    }
    for name, folder in (("in-process", "fedclip"), ("local", "local"), ("flower", "flower"),
                         ("flower-secagg+", "secagg")):
        config, runs = read_results_document(json.loads(
            (tmp_path / folder / "results.json").read_text()))
        (written,) = runs
        assert written.to_json() == produced[name].to_json()  # read back exactly
        assert written.runtime == name.replace("local", "in-process")
        assert [r.round for r in written.history] == [0, 1, 2]
        assert written.history[0].evaluated and written.best_round in (0, 1, 2)
        one = RunResult.from_json(json.loads(
            (tmp_path / folder / "gamma" / "result.json").read_text()))
        assert one.to_json() == written.to_json()
        assert config["heldout"] == "gamma"


@pytest.mark.parametrize("content", ["[]", '{"schema": "fedclip-results/1", "config": {}, '
                                           '"runs": ["junk"]}', "not json"])
def test_a_damaged_results_file_is_refused_before_training(tiny_arch, toy_root, tmp_path,
                                                           content):
    out = tmp_path / "r"
    out.mkdir()
    (out / "results.json").write_text(content)
    with pytest.raises(RunFolderError, match="results.json is damaged") as info:
        _in_process(toy_root, tiny_arch, out)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]  # nothing else written


def test_the_settings_of_a_run_folder_are_read_through_it(tmp_path):
    """config.json is read in one place: what write_config wrote comes back; a folder without
    one (or with a non-regular file by that name) has none; one that is not an object is a
    one-line refusal naming the file."""
    import os

    from fedclip.core.run_folder import CONFIG, RunFolder
    from fedclip.errors import ConfigError

    cfg = RunConfig.build(lr=1e-3, **{"fedprox.mu": 0.5})
    folder = RunFolder(tmp_path / "a", cfg)
    folder.out.mkdir()
    assert RunFolder.saved_settings(folder.out) == {} and not RunFolder.holds_settings(folder.out)
    folder.write_config()
    assert RunFolder.holds_settings(folder.out)
    assert RunConfig.validated(RunFolder.saved_settings(folder.out)) == cfg
    os.mkfifo(tmp_path / CONFIG)  # never opened: a read would block
    assert RunFolder.saved_settings(tmp_path) == {}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / CONFIG).write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"b/config.json is not a JSON object of settings"):
        RunFolder.saved_settings(tmp_path / "b")
