"""The one owner of a run folder, seen from every runtime: the same resume rules, the same
schema, nothing written after a refusal; what a folder holds (a lock, a checkpoint with its
checksum, the history beside it, the run's own settings) and what it refuses."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
import torch
from flwr.app import Context, RecordDict

from fedclip.cli import main
from fedclip.config import RunConfig
from fedclip.core.records import RunResult, read_results_document
from fedclip.errors import DataError, FedclipError, ResumeError, RunFolderError
from fedclip.flower import secagg
from fedclip.flower.client_app import build_client_app
from fedclip.flower.server_app import main as server_main
from fedclip.inprocess import prepare, run
from tests.conftest import one_line_error, toy_cfg
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


def test_a_refused_run_writes_nothing(tiny_arch, toy_root, tmp_path):
    out = tmp_path / "r"
    run(toy_cfg(toy_root, tiny_arch), out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ResumeError, match="already holds a run for beta"):
        run(toy_cfg(toy_root, tiny_arch, lr=5e-4), out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_held_out_runs_into_one_folder_add_up(tiny_arch, toy_root, tmp_path):
    out = tmp_path / "r"
    run(toy_cfg(toy_root, tiny_arch, heldout="beta"), out)
    run(toy_cfg(toy_root, tiny_arch, heldout="gamma"), out)
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted(r["heldout"] for r in runs) == ["beta", "gamma"]


def test_a_folder_that_is_not_a_run_and_a_file_are_refused(tiny_arch, toy_root, tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not a fedclip run folder"):
        run(toy_cfg(toy_root, tiny_arch), other)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file"):
        run(toy_cfg(toy_root, tiny_arch), tmp_path / "file")
    assert (other / "holiday.txt").read_text() == "mine"


def test_a_second_run_into_a_claimed_folder_is_refused(tiny_arch, toy_root, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / ".fedclip.lock").write_text(str(os.getppid()))  # a live process holds it
    with pytest.raises(RunFolderError, match=f"pid {os.getppid()}"):
        run(toy_cfg(toy_root, tiny_arch), out)
    (out / ".fedclip.lock").write_text("999999999")  # a dead one: taken over
    run(toy_cfg(toy_root, tiny_arch), out)
    assert not (out / ".fedclip.lock").exists()


def test_a_flipped_bit_in_a_checkpoint_is_detected(tiny_arch, toy_root, tmp_path):
    cfg = toy_cfg(toy_root, tiny_arch, checkpoint_every=1)
    run(cfg, tmp_path / "r")
    ckpt = tmp_path / "r" / "beta" / "checkpoint.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor
    ckpt.write_bytes(bytes(data))
    with pytest.raises(ResumeError, match="checksum"):
        run(cfg.replace(rounds=3), tmp_path / "r", resume=True)


def test_resume_follows_the_data_not_the_path_spelling(tiny_arch, toy_root, tmp_path):
    cfg = toy_cfg(toy_root, tiny_arch, checkpoint_every=1)
    run(cfg, tmp_path / "r")
    same = cfg.replace(data_root=str(toy_root) + "/", rounds=3)
    run(same, tmp_path / "r", resume=True)  # the same data, spelled differently: fine
    shutil.copy(next((toy_root / "alpha" / "cat").iterdir()),
                toy_root / "alpha" / "cat" / "extra.png")
    with pytest.raises(ResumeError, match="data"):
        run(cfg.replace(rounds=4), tmp_path / "r", resume=True)


def test_resume_names_what_differs_and_refuses_to_shrink(tiny_arch, toy_root, tmp_path):
    cfg = toy_cfg(toy_root, tiny_arch, checkpoint_every=1, rounds=3)
    run(cfg, tmp_path / "r")
    with pytest.raises(ResumeError, match=r"lr \(0.001 -> 0.0005\)"):
        run(cfg.replace(lr=5e-4), tmp_path / "r", resume=True)
    with pytest.raises(ResumeError, match="cannot shrink"):
        run(cfg.replace(rounds=2), tmp_path / "r", resume=True)


def test_history_lives_apart_from_the_checkpoint(tiny_arch, toy_root, tmp_path):
    cfg = toy_cfg(toy_root, tiny_arch, checkpoint_every=1, rounds=3)
    run(cfg, tmp_path / "r")
    lines = (tmp_path / "r" / "beta" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1, 2, 3]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "r" / "beta" / "checkpoint.safetensors"), "pt") as f:
        assert "history" not in f.metadata()


def test_domains_that_share_a_run_folder_are_refused(tiny_arch, toy_root, tmp_path):
    shutil.copytree(toy_root / "alpha", toy_root / "x y")
    shutil.copytree(toy_root / "alpha", toy_root / "x_y")
    with pytest.raises(DataError, match="would share the run folder"):
        run(toy_cfg(toy_root, tiny_arch), tmp_path / "r")


def test_resume_reads_the_runs_own_settings(tiny_arch, toy_root, tmp_path, capsys):
    out = tmp_path / "r"
    base = ["run", "--data-root", str(toy_root), "--backbone", tiny_arch, "--heldout", "beta",
            "--out", str(out), "--set", "lr=1e-3", "--set", "checkpoint_every=1"]
    assert main([*base, "--rounds", "2"]) == 0
    # only --resume and the new round count: everything else comes from config.json
    assert main(["run", "--out", str(out), "--resume", "--rounds", "3", "--threads", "1"]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert runs[0]["rounds"] == 3 and runs[0]["backbone"] == tiny_arch
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-3
    capsys.readouterr()
    assert main(["run", "--out", str(out), "--resume", "--rounds", "3", "--set",
                 "lr=5e-4"]) == 2
    assert "lr (0.001 -> 0.0005)" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-3  # refused: unchanged


def test_checkpoints_follow_time_as_well_as_rounds(tiny_arch, toy_root, tmp_path):
    """checkpoint_every=100 but checkpoint_seconds=0: an interrupt after round 2 loses
    nothing."""
    from safetensors import safe_open

    from tests.conftest import interrupted_at_round_2

    cfg = toy_cfg(toy_root, tiny_arch, rounds=4, checkpoint_every=100, checkpoint_seconds=0.0)
    interrupted_at_round_2(cfg, prepare(cfg), "beta", tmp_path / "r")
    with safe_open(str(tmp_path / "r" / "beta" / "checkpoint.safetensors"), "pt") as f:
        assert f.metadata()["round"] == "2"


def test_a_checkpoint_with_other_shapes_is_refused_in_one_line(tiny_arch, toy_root, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fedclip.tensors import checksum

    out = tmp_path / "r"
    run(toy_cfg(toy_root, tiny_arch, rounds=1), out)
    path = out / "beta" / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    key = next(k for k in tensors if k.startswith("global/"))
    tensors[key] = torch.zeros(*[n + 1 for n in tensors[key].shape])
    meta.pop("checksum")
    meta["checksum"] = checksum(tensors, meta)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ResumeError, match="does not fit this run's model"):
        run(toy_cfg(toy_root, tiny_arch, rounds=2), out, resume=True)


def _fifo(path):
    path.unlink(missing_ok=True)
    os.mkfifo(path)


@pytest.mark.parametrize("name", ["results.json", "beta/checkpoint.safetensors"])
def test_a_fifo_in_place_of_a_run_file_is_refused_not_waited_on(tiny_arch, toy_root, tmp_path,
                                                                name):
    out = tmp_path / "r"
    run(toy_cfg(toy_root, tiny_arch, rounds=1), out)
    _fifo(out / name)
    failure: list[BaseException] = []

    def resume():
        try:
            run(toy_cfg(toy_root, tiny_arch, rounds=2), out, resume=True)
        except BaseException as exc:  # noqa: BLE001
            failure.append(exc)

    worker = threading.Thread(target=resume, daemon=True)
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():  # unblock the reader, then fail
        with open(out / name, "wb"):
            pass
        pytest.fail(f"--resume hung on a FIFO named {name}")
    assert failure and isinstance(failure[0], FedclipError)
    assert "regular file" in str(failure[0])


@pytest.mark.parametrize("content", [
    [], "a string", {"schema": "fedclip-results/1", "config": {}, "runs": ["junk"]},
    {"schema": "fedclip-results/1", "config": {}, "runs": [{"heldout": 3}]},
])
def test_a_damaged_results_json_is_refused_before_training(tiny_arch, toy_root, tmp_path,
                                                           content, monkeypatch):
    out = tmp_path / "r"
    run(toy_cfg(toy_root, tiny_arch, rounds=1, heldout="alpha"), out)
    document = json.loads((out / "results.json").read_text())
    if isinstance(content, dict):
        content = {**content, "schema": document["schema"], "config": document["config"]}
    (out / "results.json").write_text(json.dumps(content))
    import fedclip.inprocess.experiment as experiment

    trained = []
    monkeypatch.setattr(experiment, "prepare", lambda *a, **k: trained.append(1))
    with pytest.raises(RunFolderError, match="damaged"):
        run(toy_cfg(toy_root, tiny_arch, rounds=1), out)
    assert not trained  # refused before any extraction or training


@pytest.mark.parametrize("content", ["[1, 2]", '"x"', "\xff\xfe"])
def test_a_config_json_that_is_not_settings_is_one_line(tmp_path, capsys, content):
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.json").write_text(content, encoding="latin-1")
    line = one_line_error(capsys, ["run", "--backbone", "standin", "--out", str(out),
                                   "--resume"])
    assert "config.json" in line and "settings" in line


def test_compare_refuses_a_folder_holding_other_files(tmp_path, capsys):
    out = tmp_path / "c"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    line = one_line_error(capsys, ["compare", "--algorithms", "zeroshot", "--backbone",
                                   "standin", "--out", str(out)])
    assert "holds other files" in line and "thesis.tex" in line
