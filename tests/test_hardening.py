"""Hardening, second pass: files, images, disks, settings and the environment, as a careless
user, a full disk and a file from elsewhere would try them. Each case gives one line (exit 2)
or a warning, never a traceback, a hang or a half-written file."""

import errno
import json
import logging
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from fedclip.cli import main
from fedclip.config import MAX_ASPECT_RATIO, MAX_TEMPLATE_CHARS, RunConfig
from fedclip.errors import ConfigError, DataError, FedclipError, ResumeError, RunFolderError
from fedclip.inprocess import experiment as _experiment
from tests.conftest import as_written

run = as_written(_experiment.run)


def _cfg(toy_root, tiny_arch, **extra):
    values = {"data_root": str(toy_root), "backbone": tiny_arch, "heldout": "beta", "rounds": 2,
              "lr": 1e-3, "personalize_epochs": 0, **extra}
    return RunConfig.build(**values)


def _one_line_error(capsys, argv) -> str:
    """Run the CLI, expect exit 2 and exactly one error line (no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# --- prompt templates are format strings: checked wherever they come from -------------------
@pytest.mark.parametrize(("template", "why"), [
    ("{0.__class__.__mro__} {}", "exactly one"),
    ("{:>30000000}", "exactly one"),
    ("a {} and a {}", "exactly one"),
    ("a {!r}", "exactly one"),
    ("a {name}", "exactly one"),
    ("a photo of {", "unbalanced"),
    ("a photo", "exactly one"),
    ("{}" + "x" * MAX_TEMPLATE_CHARS, "longer than"),
])
def test_a_prompt_template_with_anything_but_one_plain_field_is_refused(template, why):
    with pytest.raises(ConfigError, match=why):
        RunConfig.build(prompt_template=template)
    with pytest.raises(ConfigError, match=why):
        RunConfig.build(prompt_templates=("a {}", template))


def test_plain_templates_and_literal_braces_are_accepted():
    cfg = RunConfig.build(prompt_template="a {{sketch}} of a {}.",
                          prompt_templates=("@openai-imagenet", "itap of a {}."))
    assert cfg.prompt_template.format("dog") == "a {sketch} of a dog."
    with pytest.raises(ConfigError, match="unknown prompt ensemble"):
        RunConfig.build(prompt_templates=("@imagenet-ish",))


def test_a_template_in_a_preset_is_refused_before_anything_runs(tmp_path, capsys):
    preset = tmp_path / "p.toml"
    preset.write_text('prompt_template = "{0.__class__} {}"\n')
    line = _one_line_error(capsys, ["run", "--config", str(preset), "--backbone", "standin",
                                    "--out", str(tmp_path / "r")])
    assert "prompt template" in line and not (tmp_path / "r").exists()


def _forge_adapter(src, dst, **changes):
    """A copy of an adapter file with metadata ``changes`` and a valid checksum (what an
    attacker who knows the format writes)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fedclip.tensors import checksum

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        params = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta.pop("checksum")
    meta.update(changes)
    meta["checksum"] = checksum(params, meta)
    save_file(params, str(dst), metadata=meta)
    return dst


@pytest.fixture
def adapter_file(tiny_arch, toy_root, tmp_path):
    run(_cfg(toy_root, tiny_arch, rounds=1), tmp_path / "r")
    return tmp_path / "r" / "beta" / "adapter.safetensors"


@pytest.mark.parametrize("template", ["{0.__class__.__mro__} {}", "{:>30000000}"])
def test_an_adapter_file_with_a_hostile_template_is_refused_in_one_line(
        adapter_file, toy_root, tmp_path, capsys, template):
    evil = _forge_adapter(adapter_file, tmp_path / "evil.safetensors",
                          prompt_template=template)
    image = next((toy_root / "beta" / "cat").iterdir())
    line = _one_line_error(capsys, ["predict", str(evil), str(image)])
    assert "prompt template" in line and "exactly one" in line


@pytest.mark.parametrize("algorithm", ["fedavg-full", "promptfl"])
def test_predict_loads_the_adapters_own_backbone_for_every_algorithm(
        adapter_file, toy_root, tmp_path, capsys, monkeypatch, algorithm):
    """An adapter naming the offline stand-in but an algorithm that loads a backbone must not
    make predict fetch the default ViT-B/32: the algorithm gets the file's backbone (which the
    download guard covered), and one that cannot train it is one line."""
    import fedclip.backbones as backbones

    def no_network(*args, **kwargs):
        raise AssertionError("predict tried to reach the network")

    monkeypatch.setattr(backbones, "_reachable", no_network)
    evil = _forge_adapter(adapter_file, tmp_path / "x.safetensors", backbone="standin",
                          algorithm=algorithm, options="{}")
    image = next((toy_root / "beta" / "cat").iterdir())
    line = _one_line_error(capsys, ["predict", str(evil), str(image)])
    assert "standin" in line and "ViT-B-32" not in line


# --- checkpoints and run folders -------------------------------------------------------------
def test_a_pickle_named_as_a_backbone_checkpoint_is_one_line(tiny_arch, toy_root, tmp_path,
                                                             capsys):
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    bad = tmp_path / "weights.pt"
    bad.write_bytes(pickle.dumps(Payload()))
    arch = tiny_arch.split(":", 1)[1].split("@")[0]
    line = _one_line_error(capsys, ["run", "--data-root", str(toy_root), "--backbone",
                                    f"open_clip:{arch}@{bad}", "--heldout", "beta", "--rounds",
                                    "1", "--out", str(tmp_path / "r")])
    assert str(bad) in line and "not a plain weights file" in line
    assert "weights_only=False" not in line  # never advise unsafe loading


def test_a_checkpoint_with_other_shapes_is_refused_in_one_line(tiny_arch, toy_root, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fedclip.tensors import checksum

    out = tmp_path / "r"
    run(_cfg(toy_root, tiny_arch, rounds=1), out)
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
        run(_cfg(toy_root, tiny_arch, rounds=2), out, resume=True)


def _fifo(path):
    path.unlink(missing_ok=True)
    os.mkfifo(path)


@pytest.mark.parametrize("name", ["results.json", "beta/checkpoint.safetensors"])
def test_a_fifo_in_place_of_a_run_file_is_refused_not_waited_on(tiny_arch, toy_root, tmp_path,
                                                                name):
    out = tmp_path / "r"
    run(_cfg(toy_root, tiny_arch, rounds=1), out)
    _fifo(out / name)
    failure: list[BaseException] = []

    def resume():
        try:
            run(_cfg(toy_root, tiny_arch, rounds=2), out, resume=True)
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
    run(_cfg(toy_root, tiny_arch, rounds=1, heldout="alpha"), out)
    document = json.loads((out / "results.json").read_text())
    if isinstance(content, dict):
        content = {**content, "schema": document["schema"], "config": document["config"]}
    (out / "results.json").write_text(json.dumps(content))
    import fedclip.inprocess.experiment as experiment

    trained = []
    monkeypatch.setattr(experiment, "prepare", lambda *a, **k: trained.append(1))
    with pytest.raises(RunFolderError, match="damaged"):
        run(_cfg(toy_root, tiny_arch, rounds=1), out)
    assert not trained  # refused before any extraction or training


@pytest.mark.parametrize("content", ["[1, 2]", '"x"', "\xff\xfe"])
def test_a_config_json_that_is_not_settings_is_one_line(tmp_path, capsys, content):
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.json").write_text(content, encoding="latin-1")
    line = _one_line_error(capsys, ["run", "--backbone", "standin", "--out", str(out),
                                    "--resume"])
    assert "config.json" in line and "settings" in line


# --- disks ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("code", "said"), [(errno.ENOSPC, "no space left"),
                                            (errno.EROFS, "read-only")])
def test_a_full_or_read_only_disk_is_one_line_and_leaves_nothing_partial(
        tiny_arch, toy_root, tmp_path, capsys, monkeypatch, code, said):
    """The feature cache's writer (safetensors, which raises its own error type with the OS
    text inside) and the run folder's JSON writer both fail on the disk."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError(f"Error while serializing: IoError({os.strerror(code)} "
                              f"(os error {code}))")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    argv = ["run", "--data-root", str(toy_root), "--backbone", tiny_arch, "--heldout", "beta",
            "--rounds", "1", "--out", str(tmp_path / "r")]
    line = _one_line_error(capsys, argv)
    assert said in line and "cannot write" in line and ".safetensors" in line
    cache = os.environ["FEDCLIP_CACHE"]
    assert not [p for p in os.listdir(os.path.join(cache, "images"))
                if p.endswith(".tmp")] if os.path.isdir(os.path.join(cache, "images")) else True
    from fedclip import io

    monkeypatch.undo()
    monkeypatch.setenv("FEDCLIP_CACHE", cache)

    def text_full(self, data):  # noqa: ANN001
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(io.Path, "write_bytes", text_full)
    with pytest.raises(FedclipError, match=said):
        io.atomic_write_text(tmp_path / "x.json", "{}")
    assert not list(tmp_path.glob(".x.json.*"))


def test_compare_refuses_a_folder_holding_other_files(tmp_path, capsys):
    out = tmp_path / "c"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    line = _one_line_error(capsys, ["compare", "--algorithms", "zeroshot", "--backbone",
                                    "standin", "--out", str(out)])
    assert "holds other files" in line and "thesis.tex" in line


# --- images -----------------------------------------------------------------------------------
def test_odd_images_are_skipped_or_converted_with_one_warning_per_folder(
        tiny_arch, toy_root, tmp_path, caplog, monkeypatch):
    from fedclip.features import read_image

    cat = toy_root / "beta" / "cat"
    Image.new("L", (1, 100_000)).save(cat / "strip.png", optimize=True)  # a few hundred bytes
    assert (cat / "strip.png").stat().st_size < 2000
    grey16 = np.full((32, 32), 40_000, dtype=np.uint16)
    Image.fromarray(grey16).save(cat / "deep.png")
    for k in range(12):
        (cat / f"broken_{k:02d}.jpg").write_bytes(b"not an image")

    preprocess = lambda img: torch.from_numpy(np.asarray(img, dtype=np.float32))  # noqa: E731
    pixels, why = read_image(cat / "deep.png", preprocess)
    assert why is None and pixels is not None
    assert abs(float(pixels.mean()) - 40_000 * 255 / 65535) < 1  # scaled, not clipped white
    assert read_image(cat / "strip.png", preprocess)[1].startswith("1 x 100000")
    assert f"over {MAX_ASPECT_RATIO:g}" in read_image(cat / "strip.png", preprocess)[1]

    with caplog.at_level(logging.WARNING):
        results = run(_cfg(toy_root, tiny_arch, rounds=1, heldout="alpha"), tmp_path / "r")
    skipped = results[0]["skipped_images"]["beta"]
    assert "cat/strip.png" in skipped and "cat/deep.png" not in skipped
    assert len([s for s in skipped if "broken" in s]) == 12
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()
             and "beta/cat" in r.getMessage()]
    assert len(lines) == 1 and "skipped 13 image(s)" in lines[0] and "and 8 more" in lines[0]
    assert "not an image PIL can read" in lines[0]


def test_an_image_deleted_during_extraction_is_skipped(tiny_arch, toy_root, tmp_path,
                                                       monkeypatch):
    import fedclip.features as features

    victim = toy_root / "beta" / "dog" / "img_003.png"
    real = features.image_cache_key

    def delete_then_key(fingerprint, domain):  # noqa: ANN001
        victim.unlink(missing_ok=True)  # after the scan listed it, before it is read
        return real(fingerprint, domain)

    monkeypatch.setattr(features, "image_cache_key", delete_then_key)
    results = run(_cfg(toy_root, tiny_arch, rounds=1), tmp_path / "r")
    assert "dog/img_003.png" in results[0]["skipped_images"]["beta"]


def test_linked_and_hidden_class_folders_are_named(toy_root, caplog):
    from fedclip.data.folder import scan_dataset

    (toy_root / "alpha" / "kitten").symlink_to(toy_root / "alpha" / "cat")
    (toy_root / "beta" / ".cache").mkdir()
    Image.new("RGB", (8, 8)).save(toy_root / "beta" / ".cache" / "x.png")
    with caplog.at_level(logging.WARNING):
        dataset = scan_dataset(toy_root, "custom", ("cat", "dog", "kitten", "red_car"))
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "kitten is a link to class 'cat'" in text
    assert "ignored hidden folder(s) .cache in domain 'beta'" in text
    labels = dataset.domains["alpha"].labels
    assert (labels == 2).sum() == 0 and (labels == 0).sum() == 10  # one label per file


# --- settings and the environment --------------------------------------------------------------
@pytest.mark.parametrize("device", ["cuda:7", "tpu", "cuda:x"])
def test_a_device_this_machine_lacks_is_one_line(tmp_path, capsys, device):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has eight GPUs")
    line = _one_line_error(capsys, ["run", "--backbone", "standin", "--device", device,
                                    "--out", str(tmp_path / "r")])
    assert device in line and "this machine has cpu" in line


def test_split_fractions_that_leave_a_client_without_training_data(toy_root, capsys,
                                                                   tmp_path):
    line = _one_line_error(capsys, ["run", "--data-root", str(toy_root), "--backbone",
                                    "standin", "--set", "train_fraction=0.01", "--out",
                                    str(tmp_path / "r")])
    assert "no training image" in line and "train_fraction" in line
    with pytest.raises(ConfigError, match="val_fraction"):
        RunConfig.build(val_fraction=0.0)


def test_a_preset_that_is_not_utf8_text_is_one_line(tmp_path, capsys):
    preset = tmp_path / "bin.toml"
    preset.write_bytes(b"\xff\xfe rounds = 1\n")
    line = _one_line_error(capsys, ["run", "--config", str(preset), "--out",
                                    str(tmp_path / "r")])
    assert "not UTF-8" in line


@pytest.mark.parametrize("flag", ["--algorithms", "--seeds"])
def test_an_empty_compare_plan_is_one_line(tmp_path, capsys, flag):
    line = _one_line_error(capsys, ["compare", flag, "", "--backbone", "standin", "--out",
                                    str(tmp_path / "c")])
    assert "at least one" in line


def test_environment_values_are_parsed_as_people_write_them(monkeypatch, tmp_path):
    from fedclip.config import env_flag
    from fedclip.features import default_cache_dir

    monkeypatch.setenv("FEDCLIP_CACHE", "")
    assert default_cache_dir() == default_cache_dir().home() / ".cache" / "fedclip"
    monkeypatch.setenv("FEDCLIP_CACHE", "~/x")
    assert default_cache_dir() == default_cache_dir().home() / "x"
    for value, on in [("false", False), ("0", False), ("no", False), ("", False),
                      ("1", True), ("TRUE", True), ("yes", True)]:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert env_flag("HF_HUB_OFFLINE") is on, value
    with pytest.raises(DataError):
        from fedclip.data.folder import scan_dataset

        scan_dataset(tmp_path / "nothing")


def test_a_bug_is_said_to_be_one(monkeypatch, capsys, tmp_path):
    """Bad input is one line; anything else is a bug, and the line after its traceback says
    so (exit 1), so that a user reports it instead of hunting for a mistake of theirs."""
    import fedclip.inprocess.experiment as experiment

    def broken(*args, **kwargs):
        raise RuntimeError("an internal invariant")

    monkeypatch.setattr(experiment, "run", broken)
    assert main(["run", "--backbone", "standin", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "a bug in fedclip" in err
