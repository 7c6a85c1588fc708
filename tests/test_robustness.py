"""Hardening probes: no client crashes or steers the server, no run folder or checkpoint is
silently corrupted, bad input gets one line (exit 2) and nothing computed is lost."""

import json
import os
import shutil

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord

from fedclip.cli import main
from fedclip.config import RunConfig
from fedclip.errors import ConfigError, DataError, ResumeError, RunFolderError, TrainingError
from fedclip.flower.client_app import build_client_app
from fedclip.flower.server_app import main as _server_main
from fedclip.inprocess import experiment as _experiment
from fedclip.inprocess.experiment import prepare
from tests.conftest import as_written
from tests.flower_grid import LocalGrid

run = as_written(_experiment.run)
run_heldout = as_written(_experiment.run_heldout)
server_main = as_written(_server_main)


# --- the Flower server trusts no reply ---------------------------------------------------------
def _federation(toy_root, tiny_arch, tmp_path, **extra):
    run_config = {"backbone": tiny_arch, "data-root": str(toy_root), "heldout": "gamma",
                  "rounds": 2, "lr": 1e-3, "out": str(tmp_path / "flower"),
                  "classes": "cat,dog,red_car", "personalize-epochs": 0, **extra}
    return run_config, [{"partition-id": i, "num-partitions": 3} for i in range(3)]


def _metrics(**values):
    def change(content):
        content["metrics"] = MetricRecord({**dict(content["metrics"]), **values})
    return change


def _drop(key):
    def change(content):
        content["metrics"] = MetricRecord({k: v for k, v in dict(content["metrics"]).items()
                                           if k != key})
    return change


def _as_dtype(dtype):
    def change(content):
        arrays = content["arrays"].to_torch_state_dict()
        content["arrays"] = ArrayRecord({k: v.to(dtype) for k, v in arrays.items()})
    return change


def _huge(content):
    arrays = content["arrays"].to_torch_state_dict()
    content["arrays"] = ArrayRecord({k: torch.full_like(v, 1e30) for k, v in arrays.items()})


@pytest.mark.parametrize("change,reason", [
    (_metrics(**{"num-examples": float("inf")}), "declared at discovery"),
    (_metrics(**{"num-examples": -12}), "declared at discovery"),
    (_metrics(**{"num-examples": 10**15}), "declared at discovery"),
    (_drop("train-loss"), "train-loss"),
    (_metrics(**{"train-loss": float("nan")}), "train-loss"),
    (_as_dtype(torch.float64), "transfers fp32"),
    (_huge, "from the global parameters"),
])
def test_a_bad_train_reply_is_rejected_and_the_aggregate_is_unchanged(
        tiny_arch, toy_root, tmp_path, change, reason):
    from safetensors.torch import load_file

    def tamper(node, reply):
        if node == 1000 and reply.metadata.message_type == "train" and reply.has_content():
            change(reply.content)
        return reply

    run_config, nodes = _federation(toy_root, tiny_arch, tmp_path)
    result = server_main(LocalGrid(build_client_app(), nodes, run_config, tamper=tamper),
                         run_config)
    assert all(reason in r["rejected"]["alpha"] for r in result["history"][1:])
    run_config["out"] = str(tmp_path / "without")
    server_main(LocalGrid(build_client_app(), nodes, run_config, drop={1000: {1, 2}}),
                run_config)
    attacked = load_file(tmp_path / "flower" / "gamma" / "adapter-last.safetensors")
    honest = load_file(tmp_path / "without" / "gamma" / "adapter-last.safetensors")
    assert all(torch.equal(attacked[k], honest[k]) for k in honest)


@pytest.mark.parametrize("dim", [-5, 2.5])
def test_a_malformed_identity_is_refused_with_the_node_named(tiny_arch, toy_root, tmp_path, dim):
    def tamper(node, reply):
        if node == 1001 and reply.metadata.message_type == "query":
            reply.content["metrics"] = MetricRecord({**dict(reply.content["metrics"]),
                                                     "dim": dim})
        return reply

    run_config, nodes = _federation(toy_root, tiny_arch, tmp_path)
    with pytest.raises(ConfigError, match="node 1001 sent a malformed identity.*dim"):
        server_main(LocalGrid(build_client_app(), nodes, run_config, tamper=tamper), run_config)


def test_a_training_node_without_examples_is_refused():
    from fedclip.flower.discovery import NodeInfo, check_federation

    cfg = RunConfig.build(heldout="gamma", classes=("a", "b"))
    nodes = {1: NodeInfo(1, "alpha", "train", "alpha", 0, 0, 0, 0, 0, 32, 10.0),
             2: NodeInfo(2, "gamma", "heldout", "gamma", 0, 0, 0, 5, 5, 32, 10.0)}
    assert any("declares no training examples" in p
               for p in check_federation(cfg, nodes, None))


def test_a_failing_client_is_recorded_not_raised(tiny_arch, toy_root, tmp_path, monkeypatch):
    """A ClientApp that raises during training (here: it diverges) becomes an error reply,
    recorded as such; the round aggregates the others and the run completes."""
    from fedclip.algorithms.base import ClientSide

    real = ClientSide.train_client

    def diverging(self, job):
        if job.name == "alpha":
            raise TrainingError("training diverged: the local loss became nan")
        return real(self, job)

    monkeypatch.setattr(ClientSide, "train_client", diverging)
    run_config, nodes = _federation(toy_root, tiny_arch, tmp_path)
    result = server_main(LocalGrid(build_client_app(), nodes, run_config), run_config)
    for r in result["history"][1:]:
        assert "diverged" in r["rejected"]["alpha"]
        assert list(r["train_loss"]) == ["beta"]


def test_a_run_that_diverges_on_every_client_fails_and_keeps_its_checkpoint(
        tiny_arch, toy_root, tmp_path, monkeypatch):
    """Divergence on every client is the run's failure (exit 2 on the command line), never a
    completed run of unchanged parameters; the last checkpoint written stays."""
    from fedclip.algorithms.base import ClientSide

    real = ClientSide.train_client

    def diverging(self, job):
        if job.config.server_round >= 2:
            raise TrainingError("training diverged: the local loss became nan")
        return real(self, job)

    monkeypatch.setattr(ClientSide, "train_client", diverging)
    run_config, nodes = _federation(toy_root, tiny_arch, tmp_path, **{"checkpoint-every": 1})
    run_config["rounds"] = 3
    with pytest.raises(TrainingError, match="diverged on every client.*round 2"):
        server_main(LocalGrid(build_client_app(), nodes, run_config), run_config)
    folder = tmp_path / "flower"
    assert not (folder / "results.json").exists()
    from safetensors import safe_open

    with safe_open(str(folder / "gamma" / "checkpoint.safetensors"), framework="pt") as f:
        assert f.metadata()["round"] == "1"  # the last good round


# --- run folders and checkpoints ------------------------------------------------------------
def _cfg(toy_root, tiny_arch, **extra):
    values = {"data_root": str(toy_root), "backbone": tiny_arch, "heldout": "beta", "rounds": 2,
              "lr": 1e-3, "personalize_epochs": 0, **extra}
    return RunConfig.build(**values)


def test_a_refused_run_writes_nothing(tiny_arch, toy_root, tmp_path):
    out = tmp_path / "r"
    run(_cfg(toy_root, tiny_arch), out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ResumeError, match="already holds a run for beta"):
        run(_cfg(toy_root, tiny_arch, lr=5e-4), out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_held_out_runs_into_one_folder_add_up(tiny_arch, toy_root, tmp_path):
    out = tmp_path / "r"
    run(_cfg(toy_root, tiny_arch, heldout="beta"), out)
    run(_cfg(toy_root, tiny_arch, heldout="gamma"), out)
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted(r["heldout"] for r in runs) == ["beta", "gamma"]


def test_a_folder_that_is_not_a_run_and_a_file_are_refused(tiny_arch, toy_root, tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not a fedclip run folder"):
        run(_cfg(toy_root, tiny_arch), other)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file"):
        run(_cfg(toy_root, tiny_arch), tmp_path / "file")
    assert (other / "holiday.txt").read_text() == "mine"


def test_a_second_run_into_a_claimed_folder_is_refused(tiny_arch, toy_root, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / ".fedclip.lock").write_text(str(os.getppid()))  # a live process holds it
    with pytest.raises(RunFolderError, match=f"pid {os.getppid()}"):
        run(_cfg(toy_root, tiny_arch), out)
    (out / ".fedclip.lock").write_text("999999999")  # a dead one: taken over
    run(_cfg(toy_root, tiny_arch), out)
    assert not (out / ".fedclip.lock").exists()


def test_a_flipped_bit_in_a_checkpoint_is_detected(tiny_arch, toy_root, tmp_path):
    cfg = _cfg(toy_root, tiny_arch, checkpoint_every=1)
    run(cfg, tmp_path / "r")
    ckpt = tmp_path / "r" / "beta" / "checkpoint.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor
    ckpt.write_bytes(bytes(data))
    with pytest.raises(ResumeError, match="checksum"):
        run(cfg.replace(rounds=3), tmp_path / "r", resume=True)


def test_resume_follows_the_data_not_the_path_spelling(tiny_arch, toy_root, tmp_path):
    cfg = _cfg(toy_root, tiny_arch, checkpoint_every=1)
    run(cfg, tmp_path / "r")
    same = cfg.replace(data_root=str(toy_root) + "/", rounds=3)
    run(same, tmp_path / "r", resume=True)  # the same data, spelled differently: fine
    shutil.copy(next((toy_root / "alpha" / "cat").iterdir()),
                toy_root / "alpha" / "cat" / "extra.png")
    with pytest.raises(ResumeError, match="data"):
        run(cfg.replace(rounds=4), tmp_path / "r", resume=True)


def test_resume_names_what_differs_and_refuses_to_shrink(tiny_arch, toy_root, tmp_path):
    cfg = _cfg(toy_root, tiny_arch, checkpoint_every=1, rounds=3)
    run(cfg, tmp_path / "r")
    with pytest.raises(ResumeError, match=r"lr \(0.001 -> 0.0005\)"):
        run(cfg.replace(lr=5e-4), tmp_path / "r", resume=True)
    with pytest.raises(ResumeError, match="cannot shrink"):
        run(cfg.replace(rounds=2), tmp_path / "r", resume=True)


def test_history_lives_apart_from_the_checkpoint(tiny_arch, toy_root, tmp_path):
    cfg = _cfg(toy_root, tiny_arch, checkpoint_every=1, rounds=3)
    run(cfg, tmp_path / "r")
    lines = (tmp_path / "r" / "beta" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1, 2, 3]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "r" / "beta" / "checkpoint.safetensors"), "pt") as f:
        assert "history" not in f.metadata()


# --- training that goes wrong -----------------------------------------------------------------
def test_divergence_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
        tiny_arch, toy_root, tmp_path):
    cfg = _cfg(toy_root, tiny_arch, checkpoint_every=1, rounds=3)
    prep = prepare(cfg)
    run_heldout(cfg, prep, "beta", tmp_path / "r")
    import fedclip.algorithms.base as client  # where ClientSide.train_client finds it

    real = client.train_local

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        if kwargs["config"].server_round == 4:
            raise TrainingError("training diverged: test")
        return result

    client.train_local = poisoned
    try:
        with pytest.raises(TrainingError, match="diverged"):
            run_heldout(cfg.replace(rounds=5), prep, "beta", tmp_path / "r", resume=True)
    finally:
        client.train_local = real
    from fedclip.core.checkpoint import config_fingerprint  # noqa: F401

    ckpt = tmp_path / "r" / "beta" / "checkpoint.safetensors"
    from safetensors import safe_open

    with safe_open(str(ckpt), "pt") as f:
        assert f.metadata()["round"] == "3"


def test_an_infinite_lr_is_refused_and_a_huge_one_diverges_clearly(tiny_arch, toy_root,
                                                                     tmp_path, capsys):
    assert main(["run", "--data-root", str(toy_root), "--backbone", tiny_arch, "--out",
                 str(tmp_path / "a"), "--set", "lr=inf"]) == 2
    assert "lr" in capsys.readouterr().err
    code = main(["run", "--data-root", str(toy_root), "--backbone", tiny_arch, "--out",
                 str(tmp_path / "b"), "--heldout", "beta", "--rounds", "2", "--set",
                 "lr=10.0", "--set", "weight_decay=100.0"])
    err = capsys.readouterr().err
    assert code in (0, 2) and ("diverged" in err if code == 2 else True)


@pytest.mark.parametrize("argv,needle", [
    (["--set", "lr='1e-4'"], "lr"),
    (["--set", "batch_size=true"], "batch_size"),
    (["--seed", str(2**32)], "seed"),
    (["--set", "rounds=1", "--rounds", "2"], "rounds is set twice"),
    (["--set", "clients_per_domain=100"], "too few for 100 clients"),
])
def test_bad_settings_give_one_line_and_exit_2(tiny_arch, toy_root, tmp_path, capsys, argv,
                                                needle):
    code = main(["run", "--data-root", str(toy_root), "--backbone", tiny_arch, "--out",
                 str(tmp_path / "x"), "--heldout", "beta", *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


def test_round_zero_competes_for_selection(tiny_arch, toy_root, tmp_path):
    """A run whose training only hurts selects round 0 (the initial adapter)."""
    cfg = _cfg(toy_root, tiny_arch, rounds=2, lr=10.0, weight_decay=0.0, batch_size=2)
    try:
        r = run(cfg, tmp_path / "r")[0]
    except TrainingError:
        pytest.skip("diverged to NaN before selection: covered by the divergence test")
    vals = [h["mean_val_accuracy"] for h in r["history"]]
    assert r["best_round"] == max(range(len(vals)), key=lambda i: (vals[i], -i))


# --- bad input: one line, before any work ------------------------------------------------------
def test_odd_files_in_a_dataset_are_skipped_not_fatal(tiny_arch, toy_root, tmp_path, caplog):
    from fedclip.data.folder import scan_dataset

    cat = toy_root / "alpha" / "cat"
    (cat / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    os.mkfifo(cat / "pipe.jpg")
    (cat / "loop").symlink_to(cat)  # a link back to its own folder
    (cat / "again.png").symlink_to(cat / "img_000.png")
    domain = scan_dataset(toy_root).domains["alpha"]
    names = [f.name for f in domain.files if f.parent.name == "cat"]
    # the link to img_000.png is the same image: counted once, whichever name comes first
    assert len(names) == 10 and "pipe.jpg" not in names
    assert ("again.png" in names) != ("img_000.png" in names)
    assert "dangling link" in caplog.text and "not a regular file" in caplog.text


def test_domains_that_share_a_run_folder_are_refused(tiny_arch, toy_root, tmp_path):
    shutil.copytree(toy_root / "alpha", toy_root / "x y")
    shutil.copytree(toy_root / "alpha", toy_root / "x_y")
    with pytest.raises(DataError, match="would share the run folder"):
        run(_cfg(toy_root, tiny_arch), tmp_path / "r")


def test_an_unwritable_cache_is_refused_before_extraction(tiny_arch, toy_root, tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "cache-file"
        blocker.write_text("not a folder")
        cache = blocker / "sub"  # cannot be created, even as root
    else:
        cache = tmp_path / "ro"
        cache.mkdir(mode=0o500)
    with pytest.raises(RunFolderError, match="feature cache.*not writable"):
        run(_cfg(toy_root, tiny_arch, cache_dir=str(cache)), tmp_path / "r")


def test_hub_names_cannot_escape_the_cache(tmp_path):
    from PIL import Image

    from fedclip.data.sources import write_image_folder

    rows = [{"image": Image.new("RGB", (4, 4)), "label": 0, "domain": "../../../x"}]
    target = write_image_folder(rows, ["../evil"], tmp_path / "hub" / "ds")
    written = [p for p in tmp_path.rglob("*.png")]
    assert written and all(p.resolve().is_relative_to(target.resolve()) for p in written)


def test_predict_refuses_a_download_named_by_a_file(tiny_arch, toy_root, tmp_path):
    from fedclip.core.adapter_file import load_adapter, save_adapter
    from fedclip.errors import BackboneError
    from fedclip.predict import predict

    run(_cfg(toy_root, tiny_arch), tmp_path / "r")
    path = tmp_path / "r" / "beta" / "adapter.safetensors"
    adapter = load_adapter(path)
    evil = tmp_path / "evil.safetensors"
    save_adapter(evil, adapter.params, RunConfig.build(backbone="open_clip:hf-hub:attacker/repo@x"),
                 adapter.classes, adapter.logit_scale, 0, adapter.dim)
    image = next((toy_root / "beta" / "cat").iterdir())
    with pytest.raises(BackboneError, match="downloads weights.*--allow-download"):
        predict(evil, [image])
    from fedclip.errors import FedclipError

    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(bytes(data))
    with pytest.raises(FedclipError, match="checksum"):
        predict(tampered, [image])
    assert main(["predict", str(path), str(image), "--top", "0"]) == 2
    assert main(["predict", str(path), str(image), "--top", "2", "--out",
                 str(tmp_path / "p.csv")]) == 0
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0].startswith("file,rank") and len(lines) == 3  # header + top 2


def test_interrupt_exits_130_with_a_hint_only_where_resume_can_work(monkeypatch, capsys,
                                                                    tmp_path):
    import fedclip.inprocess.experiment as experiment

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "run", interrupted)
    argv = ["run", "--backbone", "standin", "--rounds", "1", "--out", str(tmp_path / "x")]
    assert main(argv) == 130
    assert "nothing resumable" in capsys.readouterr().err  # no folder, no --resume hint
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text("{}")
    assert main(argv) == 130
    assert "--resume" in capsys.readouterr().err


def test_sigterm_is_handled_as_an_interrupt(tiny_arch, toy_root, tmp_path, capsys,
                                           monkeypatch):
    """SIGTERM mid-run: exit 143 with a line, the lock released, and --resume continues."""
    import signal

    from fedclip.callbacks import Callback

    out = tmp_path / "r"

    class Kill(Callback):
        def on_round_end(self, heldout, record):  # noqa: ANN001, ANN201
            if record.round == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    import fedclip.callbacks as callbacks

    monkeypatch.setattr(callbacks, "loggers_from_specs", lambda *a, **k: [Kill()])
    argv = ["run", "--data-root", str(toy_root), "--backbone", tiny_arch, "--heldout",
            "beta", "--rounds", "3", "--out", str(out), "--set", "checkpoint_seconds=0"]
    assert main(argv) == 143
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "terminated" in err and "--resume" in err
    assert not (out / ".fedclip.lock").exists()
    assert main([*argv, "--resume"]) == 0
    assert json.loads((out / "results.json").read_text())["runs"][0]["history"][-1][
        "round"] == 3


def test_markup_in_paths_is_printed_as_text(tiny_arch, toy_root, tmp_path, capsys):
    out = tmp_path / "[bold red]run[/x]"
    assert main(["run", "--data-root", str(toy_root), "--backbone", tiny_arch, "--out",
                 str(out), "--heldout", "beta", "--rounds", "1"]) == 0
    assert "[bold red]run[/x]" in capsys.readouterr().out
    assert main(["run", "--data-root", str(tmp_path / "[/x]missing"), "--backbone",
                 tiny_arch, "--out", str(tmp_path / "y")]) == 2
    assert "[/x]missing" in capsys.readouterr().err


def test_a_data_root_one_level_off_is_named_before_extraction(toy_root, tmp_path):
    from fedclip.data.folder import scan_dataset

    above = tmp_path / "above"
    above.mkdir()
    shutil.copytree(toy_root, above / "PACS")
    with pytest.raises(DataError, match="one level too high.*--data-root"):
        scan_dataset(above)
    with pytest.raises(DataError, match="hold images directly"):
        scan_dataset(toy_root / "alpha")


def test_a_client_at_zero_percent_is_drawn_at_zero():
    from fedclip.report import _num

    assert _num(0.0) == 0.0 and _num(None) != _num(None)  # None: a gap (NaN)


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

    cfg = _cfg(toy_root, tiny_arch, rounds=4, checkpoint_every=100, checkpoint_seconds=0.0)
    interrupted_at_round_2(cfg, prepare(cfg), "beta", tmp_path / "r")
    with safe_open(str(tmp_path / "r" / "beta" / "checkpoint.safetensors"), "pt") as f:
        assert f.metadata()["round"] == "2"


def test_ctrl_c_during_extraction_resumes_with_the_runs_own_settings(tiny_arch, toy_root,
                                                                     tmp_path, capsys,
                                                                     monkeypatch):
    """The run folder holds its settings before extraction starts: `--resume` alone continues
    (not the default backbone, which would download), and the hint says so."""
    import fedclip.inprocess.experiment as experiment

    out = tmp_path / "r"
    real = experiment.prepare

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "prepare", interrupted)
    assert main(["run", "--data-root", str(toy_root), "--backbone", tiny_arch, "--heldout",
                 "beta", "--rounds", "1", "--out", str(out)]) == 130
    assert "--resume" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["backbone"] == tiny_arch
    monkeypatch.setattr(experiment, "prepare", real)
    assert main(["run", "--out", str(out), "--resume"]) == 0
    assert json.loads((out / "results.json").read_text())["config"]["backbone"] == tiny_arch
