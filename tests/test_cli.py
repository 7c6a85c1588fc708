"""The command line follows its registries; round callbacks and loggers in both runtimes;
a backbone that must download fails at once offline."""

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

from fedclip.callbacks import Callback, loggers_from_specs
from fedclip.cli import main
from fedclip.config import RunConfig
from fedclip.core.records import RoundRecord, RunResult
from fedclip.errors import BackboneError, ConfigError
from fedclip.flower.server_app import main as _server_main
from fedclip.inprocess import experiment as _experiment
from tests.conftest import as_written, one_line_error

run = as_written(_experiment.run)
server_main = as_written(_server_main)


class Recorder(Callback):
    def __init__(self) -> None:
        self.rounds: list[tuple[str, int, float | None]] = []
        self.results: list[tuple[str, dict]] = []
        self.closed = 0

    def on_round_end(self, heldout: str, record: RoundRecord) -> None:
        self.rounds.append((heldout, record.round, record.mean_val_accuracy))

    def on_run_end(self, heldout: str, result: RunResult) -> None:
        self.results.append((heldout, result.to_json()))

    def close(self) -> None:
        self.closed += 1


# --- help and choices from the registries ----------------------------------------------------
def test_help_lists_every_registered_algorithm_provider_and_default(capsys, monkeypatch):
    import typer.rich_utils

    from fedclip.algorithms import names
    from fedclip.backbones import providers

    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 400)  # no folding, no ellipsis
    monkeypatch.setenv("COLUMNS", "400")
    assert main(["run", "--help"]) == 0
    words = " ".join(capsys.readouterr().out.replace("│", " ").split())
    words = words.replace("- ", "-")  # a name wrapped at its hyphen ("personal-/transform")
    for name in names():
        assert name in words, name
    for prefix in providers():
        assert prefix in words
    assert "ViT-B-32@openai" in words and "pacs|vlcs|office" in words.replace(" ", "")


def test_help_imports_no_algorithm_and_no_backbone():
    """`fedclip run --help` lists algorithms and providers from the static tables, so it
    never waits for torch (seconds on a busy machine); the tables equal the registries."""
    import subprocess
    import sys

    from fedclip.algorithms import ALGORITHMS, names
    from fedclip.algorithms.registry import BUILTIN
    from fedclip.backbones import providers
    from fedclip.cli import BACKBONE_PREFIXES

    code = ("import contextlib, io, sys\nfrom fedclip.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['run', '--help']) == 0 and main(['compare', '--help']) == 0\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', "
            "'open_clip'}), sorted(m for m in sys.modules if m.startswith('fedclip.algorithms.')"
            " or m.startswith('fedclip.backbones')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["[]", "['fedclip.algorithms.registry']"]
    assert {n: ALGORITHMS[n].summary for n in names()} == BUILTIN  # no plugin installed here
    assert list(BACKBONE_PREFIXES) == list(providers())


def test_choices_come_from_the_dataset_specs_and_the_config(toy_root, tmp_path, capsys):
    assert main(["run", "--dataset", "imagenet", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "domainnet" in err and "office-home" in err
    assert main(["run", "--partition", "zipf", "--out", str(tmp_path / "y")]) == 2
    assert "dirichlet" in capsys.readouterr().err


def test_data_flags_reach_the_run_configuration(tiny_arch, toy_root, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--data-root", str(toy_root), "--backbone", tiny_arch, "--heldout",
                 "gamma", "--rounds", "1", "--clients-per-domain", "2", "--partition",
                 "dirichlet", "--dirichlet-alpha", "0.3", "--device", "cpu", "--out",
                 str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["clients_per_domain"], saved["partition"], saved["dirichlet_alpha"],
            saved["device"]) == (2, "dirichlet", 0.3, "cpu")
    result = json.loads((out / "results.json").read_text())["runs"][0]
    assert len(result["clients"]) == 4  # two domains, two clients each


def test_backbones_lists_every_provider_form(capsys):
    assert main(["backbones"]) == 0
    printed = capsys.readouterr().out
    for form in ("open_clip:ARCH@TAG", "open_clip:hf-hub:ORG/REPO", "hf:ORG/MODEL", "standin"):
        assert form in printed


# --- callbacks -------------------------------------------------------------------------------
def test_callbacks_see_every_round_and_result_in_process(tiny_arch, toy_root, tmp_path):
    cfg = RunConfig.build(data_root=str(toy_root), backbone=tiny_arch, heldout="all", rounds=2,
                          lr=1e-3)
    rec = Recorder()
    results = run(cfg, tmp_path / "run", callbacks=[rec])
    for result in results:
        seen = [(r, v) for h, r, v in rec.rounds if h == result["heldout"]]
        assert seen == [(h["round"], h["mean_val_accuracy"]) for h in result["history"]]
    assert [h for h, _ in rec.results] == ["alpha", "beta", "gamma"]
    assert [r for _, r in rec.results] == results
    assert rec.closed == 1
    # a resumed, already finished run reports its result again but replays no round
    rec2 = Recorder()
    run(cfg, tmp_path / "run", resume=True, callbacks=[rec2])
    assert rec2.rounds == [] and len(rec2.results) == 3 and rec2.closed == 1


def test_callbacks_are_closed_when_a_run_fails(toy_root, tmp_path):
    rec = Recorder()
    cfg = RunConfig.build(data_root=str(toy_root), backbone="standin", heldout="nowhere")
    with pytest.raises(Exception):  # noqa: B017 - any refusal
        run(cfg, tmp_path / "run", callbacks=[rec])
    assert rec.closed == 1 and rec.rounds == []


def test_flower_strategy_calls_the_same_hooks(tiny_arch, tmp_path):
    from fedclip.flower.client_app import build_client_app
    from tests.conftest import make_image_folder
    from tests.flower_grid import LocalGrid

    classes = {"cat": 6, "dog": 6}
    root = make_image_folder(tmp_path / "data", {d: classes for d in ("a", "b", "c")}, size=32)
    nodes = [{"data-root": str(root), "domain": d} for d in ("a", "b", "c")]
    run_config = {"backbone": tiny_arch, "heldout": "c", "rounds": 2, "lr": 1e-3,
                  "classes": "cat,dog", "out": str(tmp_path / "flower"),
                  "discover-timeout": 5.0, "log-to": "tensorboard"}
    rec = Recorder()
    result = server_main(LocalGrid(build_client_app(), nodes, run_config), run_config,
                         callbacks=[rec])
    local = run(RunConfig.build(data_root=str(root), backbone=tiny_arch, heldout="c",
                                rounds=2, lr=1e-3), tmp_path / "local", callbacks=[Recorder()])
    assert rec.rounds == [("c", h["round"], h["mean_val_accuracy"]) for h in local[0]["history"]]
    assert rec.results == [("c", result)] and rec.closed == 1
    # the run config's logger wrote the same rounds on the server
    assert [s for s, _ in _scalars(tmp_path / "flower" / "tensorboard" / "c",
                                   "accuracy/val")] == [0, 1, 2]


# --- TensorBoard -----------------------------------------------------------------------------
def _scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_logger_writes_what_the_results_hold(tiny_arch, toy_root, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert main(["run", "--data-root", str(toy_root), "--backbone", tiny_arch, "--heldout",
                 "all", "--rounds", "2", "--out", str(out), "--log-to", "tensorboard"]) == 0
    results = json.loads((out / "results.json").read_text())["runs"]
    for result in results:
        folder = out / "tensorboard" / result["heldout"]
        gen = _scalars(folder, "accuracy/generalization")
        assert [s for s, _ in gen] == [h["round"] for h in result["history"]]
        assert all(math.isclose(v, h["heldout_accuracy"], abs_tol=1e-6)
                   for (_, v), h in zip(gen, result["history"], strict=True))
        loss = _scalars(folder, "loss/train")
        assert [s for s, _ in loss] == [1, 2]  # round 0 trains nothing
        client = next(iter(result["history"][1]["val_accuracy"]))
        assert len(_scalars(folder, f"client_val_accuracy/{client}")) == 3


def test_a_logger_dir_and_unknown_loggers(tmp_path):
    pytest.importorskip("tensorboard")
    (logger,) = loggers_from_specs([f"tensorboard:{tmp_path / 'tb'}"], tmp_path / "out")
    record = RoundRecord(0)
    record.set_evaluation({"a": 0.5, "b": float("nan")}, {"a": 0.5}, None)
    logger.on_round_end("x/y", record)
    logger.close()
    assert _scalars(tmp_path / "tb" / "x_y", "accuracy/val") == [(0, 0.5)]
    with pytest.raises(ConfigError, match="unknown logger 'wandb'.*tensorboard"):
        loggers_from_specs(["wandb"], tmp_path)
    assert loggers_from_specs(["", " , "], tmp_path) == []


# --- offline ----------------------------------------------------------------------------------
@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to build a downloading open_clip model fails the test."""
    import open_clip

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", refuse)


def test_offline_a_downloading_backbone_fails_at_once_in_one_line(no_download, toy_root,
                                                                    tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached
    began = time.perf_counter()
    code = main(["run", "--data-root", str(toy_root), "--backbone",
                 "open_clip:ViT-B-32@openai", "--rounds", "1", "--out", str(tmp_path / "r")])
    assert code == 2 and time.perf_counter() - began < 60
    err = capsys.readouterr().err
    assert "needs to download its weights" in err and "standin" in err
    assert "HF_HUB_OFFLINE" in err and "Traceback" not in err


def test_an_unreachable_hub_fails_without_the_library_retrying(no_download, tmp_path,
                                                               monkeypatch):
    import fedclip.backbones as backbones

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    probed = []
    monkeypatch.setattr(backbones, "_reachable",
                        lambda host, timeout=3.0: probed.append(host) or "Network is unreachable")
    with pytest.raises(BackboneError, match="huggingface.co is unreachable.*standin"):
        backbones.load_backbone("open_clip:ViT-B-32@openai")
    with pytest.raises(BackboneError, match="hf:/path/to/folder"):
        backbones.load_backbone("hf:openai/clip-vit-base-patch32")
    assert probed == ["huggingface.co", "huggingface.co"]


def test_local_weights_never_probe_the_network(tiny_arch, monkeypatch):
    import fedclip.backbones as backbones

    monkeypatch.setattr(backbones, "_reachable", lambda *a, **k: pytest.fail("probed"))
    for spec in (tiny_arch, "open_clip:local-dir:/nowhere"):
        assert backbones.weights_source(spec) is None
    backbones.check_available(tiny_arch)


# --- plots ----------------------------------------------------------------------------------
def _fake(heldout, gen, rounds=3, trains=True):
    from fedclip.core.records import Scores

    history = []
    for k in range(rounds + 1 if trains else 1):
        history.append(RoundRecord(k))
        history[-1].set_evaluation({}, {}, gen)
    scores = Scores(gen, None)
    return RunResult(heldout, "x", "custom", "standin", False, "clip", 0, scores, 0, scores,
                     scores, 0, 0.0, (), 0, tuple(history), "in-process")


def test_compare_plot_keeps_one_style_per_algorithm_and_draws_no_missing_bar(tmp_path,
                                                                          monkeypatch):
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from fedclip.compare import generalization_values, plot

    runs = {"zeroshot": {0: [_fake("a", 0.4, trains=False), _fake("b", 0.5, trains=False)]},
            "fedclip": {0: [_fake("a", 0.6), _fake("b", None)]},
            "fedprox": {0: [_fake("a", 0.6), _fake("b", 0.7)]}}  # coincides with fedclip on a
    values = generalization_values(runs)
    assert values["fedclip"] == {"a": [0.6], "b": [None], "average": [0.6]}
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot(runs, tmp_path)
    assert (tmp_path / "compare.png").stat().st_size > 0
    (fig,) = figures
    ax_round, ax_bar = fig.axes
    lines = {ln.get_label(): ln for ln in ax_round.get_lines()}
    bars = {c.get_label(): c for c in ax_bar.containers}
    for algo in runs:  # the same colour in both panels
        assert to_hex(lines[algo].get_color()) == to_hex(bars[algo].patches[0].get_facecolor())
    assert (lines["fedclip"].get_marker(), lines["fedclip"].get_linestyle()) != (
        lines["fedprox"].get_marker(), lines["fedprox"].get_linestyle())
    assert len({to_hex(ln.get_color()) for ln in lines.values()}) == 3
    assert len(bars["fedclip"].patches) == 2  # a and the average; b has no result, no bar
    assert any(t.get_text() == "n/a" for t in ax_bar.texts)
    assert fig.legends and not ax_round.get_legend() and not ax_bar.get_legend()
    from matplotlib.ticker import MaxNLocator

    locator = ax_round.xaxis.get_major_locator()  # rounds are whole numbers
    assert isinstance(locator, MaxNLocator) and locator._integer
    assert all(c.errorbar is None for c in ax_bar.containers)  # one seed: no error bars
    figures.clear()
    runs["fedprox"][1] = [_fake("a", 0.5), _fake("b", 0.6)]  # a second seed: a spread to show
    plot(runs, tmp_path)
    (fig,) = figures
    bars = {c.get_label(): c for c in fig.axes[1].containers}
    assert bars["fedprox"].errorbar is not None


def test_flower_heldout_all_is_one_line_before_any_node_is_asked(tmp_path):
    from fedclip.flower.client_app import build_client_app
    from tests.flower_grid import LocalGrid

    run_config = {"backbone": "standin", "heldout": "all", "out": str(tmp_path / "f")}
    grid = LocalGrid(build_client_app(), [{"domain": "a"}], run_config)
    with pytest.raises(ConfigError, match="heldout must name one domain") as info:
        server_main(grid, run_config)
    assert "\n" not in str(info.value) and grid.sent == []


def test_compare_logs_each_run_apart(tiny_arch, toy_root, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "cmp"
    assert main(["compare", "--algorithms", "fedclip,fedprox", "--data-root", str(toy_root),
                 "--backbone", tiny_arch, "--heldout", "gamma", "--rounds", "1", "--out",
                 str(out), "--log-to", "tensorboard", "--log-to",
                 f"tensorboard:{tmp_path / 'tb'}"]) == 0
    for algo in ("fedclip", "fedprox"):
        for folder in (out / f"{algo}-seed0" / "tensorboard", tmp_path / "tb" / f"{algo}-seed0"):
            assert [s for s, _ in _scalars(folder / "gamma", "accuracy/val")] == [0, 1]
    assert main(["compare", "--out", str(tmp_path / "x"), "--log-to", "wandb"]) == 2
    assert not (tmp_path / "x").exists()


def test_verbosity_raises_fedclips_own_logging_only(capsys):
    import logging

    assert main(["-vv", "algorithms"]) == 0
    assert logging.getLogger("fedclip").getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("matplotlib").getEffectiveLevel() >= logging.WARNING
    assert main(["-v", "algorithms"]) == 0
    assert logging.getLogger("fedclip").getEffectiveLevel() == logging.INFO
    assert main(["algorithms"]) == 0
    logging.getLogger("fedclip").setLevel(logging.NOTSET)


def test_help_at_80_columns_cuts_no_option_name(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--clients-per-domain" in out and "\u2026" not in out and "\\[" not in out
    assert main(["--help"]) == 0
    assert "INTEGER" not in capsys.readouterr().out  # -v counts; it takes no value


def test_piped_output_is_plain_lines_and_a_cache_hit_says_so(tiny_arch, toy_root, tmp_path,
                                                              capsys):
    argv = ["run", "--data-root", str(toy_root), "--backbone", tiny_arch, "--heldout", "beta",
            "--rounds", "2", "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "\u2501" not in err  # no progress bar drawn into a pipe, at the end or anywhere
    assert err.count("features alpha: 30/30") == 1
    argv[-1] = str(tmp_path / "b")
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "features alpha: 30 images from the cache" in err and "img/s" not in err


def test_a_run_selected_at_round_zero_says_why_its_generalization_is_not_zero_shot():
    import dataclasses

    from fedclip.core.records import Scores
    from fedclip.report import round_zero_note

    at_zero = dataclasses.replace(_fake("a", 0.6), zeroshot=Scores(0.5, None))
    assert at_zero.best_round == 0 and at_zero.rounds == 3
    assert round_zero_note([dataclasses.replace(at_zero, best_round=2)]) is None
    note = round_zero_note([at_zero])
    assert note is not None and "not zero-shot" in note and "(a)" in note
    assert "x's model" in note  # the method named, not "the adapter" whatever it is
    # round 0 is the zero-shot classifier (a linear probe, prototypes): nothing to explain
    assert round_zero_note([_fake("a", 0.6)]) is None


def test_flower_run_names_a_misspelled_run_config_key():
    from fedclip.errors import FedclipError
    from fedclip.flower.launch import app_config_keys, check_run_config

    keys = app_config_keys(Path(__file__).resolve().parents[1])
    check_run_config(["heldout='sketch' rounds=20", "fedprox.mu=0.1"], keys)
    with pytest.raises(FedclipError, match="'heldot'; did you mean 'heldout'"):
        check_run_config(["heldot='sketch' rounds=20"], keys)


def test_flower_logs_a_refusal_in_one_line_and_a_bug_with_its_traceback(caplog):
    import logging

    from flwr.common import log

    from fedclip.errors import ConfigError
    from fedclip.flower.logs import one_line_refusals

    one_line_refusals()
    one_line_refusals()  # once per process, however often the app starts
    assert sum(type(f).__name__ == "OneLineRefusals"
               for f in logging.getLogger("flwr").filters) == 1
    with caplog.at_level(logging.ERROR, logger="flwr"):
        log(logging.ERROR, "ServerApp raised an exception", exc_info=ConfigError("bad key"))
        log(logging.ERROR, "ServerApp raised an exception", exc_info=KeyError("bug"))
    refusal, bug = caplog.records[-2:]
    assert refusal.getMessage() == "fedclip refused the run: bad key" and not refusal.exc_info
    assert bug.exc_info is not None


# --- the first hour: verbosity, a finished run re-printed, the embedded sample's note -------
def _toy_run(tiny_arch, toy_root, out, *flags, rounds="20"):
    return ["run", "--data-root", str(toy_root), "--backbone", tiny_arch, "--heldout", "beta",
            "--rounds", rounds, "--set", "personalize_epochs=0", "--out", str(out), *flags]


def test_verbosity_levels_mean_what_they_say(tiny_arch, toy_root, tmp_path, capsys,
                                             monkeypatch):
    monkeypatch.delenv("FLWR_LOG_LEVEL", raising=False)
    assert main(["-q", *_toy_run(tiny_arch, toy_root, tmp_path / "q")]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == (f"results: {tmp_path / 'q' / 'results.json'}, "
                           f"{tmp_path / 'q' / 'results.md'}, plots in {tmp_path / 'q'}/*/")
    assert err == ""  # no progress, no note, no warning
    assert main(_toy_run(tiny_arch, toy_root, tmp_path / "d")) == 0
    out, err = capsys.readouterr()
    assert "held out" in out and "gen 0-shot" in out  # the table
    def rounds(err: str) -> list[int]:  # "held out beta: round 4/20 val ..." -> 4
        return [int(line.split()[4].split("/")[0]) for line in err.splitlines()
                if ": round " in line and int(line.split()[4].split("/")[0]) > 0]

    assert rounds(err) == list(range(2, 21, 2))  # into a pipe: every tenth of the work
    assert main(["-v", *_toy_run(tiny_arch, toy_root, tmp_path / "v")]) == 0
    assert rounds(capsys.readouterr().err) == list(range(1, 21))  # -v: a line per round
    import os

    import fedclip.flower.launch as launch

    seen = []

    def flower_run(*args, **kwargs):  # what `flwr run` would inherit
        seen.append(os.environ.get("FLWR_LOG_LEVEL"))
        return "1", "finished:completed"

    monkeypatch.setattr(launch, "flower_run", flower_run)
    assert main(["-vv", "flower-run"]) == 0 and main(["flower-run"]) == 0
    assert seen == ["DEBUG", None]  # -vv: Flower's debug logs too, for that command only
    assert "FLWR_LOG_LEVEL" not in os.environ
    assert main(["-q", "-v", "algorithms"]) == 2
    assert "not both" in capsys.readouterr().err


def test_a_finished_run_is_reprinted_without_recomputing(tiny_arch, toy_root, tmp_path, capsys,
                                                         monkeypatch):
    out = tmp_path / "run"
    assert main(_toy_run(tiny_arch, toy_root, out, rounds="3")) == 0
    first = capsys.readouterr().out

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(_experiment, "run", no_training)
    assert main(["run", "--out", str(out), "--resume"]) == 0
    again, err = capsys.readouterr()
    assert "nothing recomputed" in err
    table = [line for line in first.splitlines() if "beta" in line]
    assert table and table == [line for line in again.splitlines() if "beta" in line]
    # more rounds, or a run not finished, resume as before
    monkeypatch.undo()
    assert main(["run", "--out", str(out), "--resume", "--rounds", "4"]) == 0
    assert "nothing recomputed" not in capsys.readouterr().err
    saved = json.loads((out / "results.json").read_text())["runs"][0]
    assert saved["history"][-1]["round"] == 4


def test_the_embedded_sample_says_what_it_can_show_and_the_real_command(tiny_arch, tmp_path,
                                                                        capsys):
    assert main(["run", "--backbone", tiny_arch, "--heldout", "sketch", "--rounds", "1",
                 "--set", "personalize_epochs=0", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "40 images" in out and "not how well a method works" in out
    assert "fedclip fetch pacs data/PACS" in out and "--data-root data/PACS" in out


def test_promptfolio_is_refused_under_its_own_name():
    from fedclip.algorithms import algorithm_class

    algo = algorithm_class("promptfolio")(RunConfig(algorithm="promptfolio",
                                                    backbone="hf:org/model"))
    with pytest.raises(BackboneError, match="^promptfolio learns tokens of a text tower; "
                                            "backbone 'hf:org/model' has no text tower"):
        algo.backbone  # noqa: B018 - the property loads (and refuses) the backbone


def test_predict_shows_files_as_given_relative_to_here(tiny_arch, toy_root, tmp_path, capsys,
                                                       monkeypatch):
    out = tmp_path / "run"
    assert main(_toy_run(tiny_arch, toy_root, out, rounds="1")) == 0
    capsys.readouterr()
    monkeypatch.chdir(toy_root)
    assert main(["predict", str(out / "beta" / "adapter.safetensors"), "beta/cat",
                 "--backbone", tiny_arch, "--out", str(tmp_path / "p.csv")]) == 0
    shown = capsys.readouterr().out
    assert "beta/cat/img_000.png" in shown and str(toy_root) not in shown.replace("\n", "")
    assert str(toy_root / "beta" / "cat" / "img_000.png") in (tmp_path / "p.csv").read_text()


# --- flower-run: the same table at the end; the local SuperLink stopped by its pid ----------
def test_flower_run_ends_with_the_in_process_table(tiny_arch, toy_root, tmp_path, capsys,
                                                   monkeypatch):
    import fedclip.flower.launch as launch

    out = tmp_path / "flower-out"
    assert main(_toy_run(tiny_arch, toy_root, out, rounds="2")) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if "beta" in line]

    def flower_run(app, superlink, run_config, echo, federation_config):
        for line in ("Flower banner", f"INFO :      results: {out / 'results.json'}"):
            echo(line)
        return "7", "finished:completed"

    monkeypatch.setattr(launch, "flower_run", flower_run)
    assert main(["flower-run", "local-sim"]) == 0
    shown = capsys.readouterr().out
    assert "Flower banner" in shown and "run 7: finished:completed" in shown
    assert table and [line for line in shown.splitlines() if "beta" in line] == table
    assert main(["-q", "flower-run", "local-sim"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0] == "run 7: finished:completed" and shown[1].startswith("results: ")
    assert len(shown) == 2


HEALTH_SERVER = """import http.server, sys
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def test_the_local_superlink_is_stopped_by_its_recorded_pid_only(tmp_path):
    import os
    import subprocess
    import sys

    from fedclip.flower.launch import PID_FILE, start_local_superlink, stop_local_superlink
    from tests.deployment import free_port

    home = tmp_path / "flwr-home"
    port = free_port()
    command = [sys.executable, "-c", HEALTH_SERVER, str(port)]
    # the same program started by someone else: a pattern would match it, a pid does not
    other = subprocess.Popen([sys.executable, "-c", HEALTH_SERVER, str(free_port())])
    try:
        pid = start_local_superlink(home, command=command, health=f"http://127.0.0.1:{port}/")
        record = json.loads((home / "local-superlink" / PID_FILE).read_text())
        assert record["pid"] == pid and record["command"] == command
        assert stop_local_superlink(home) == f"stopped the local SuperLink (pid {pid})"
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert other.poll() is None  # untouched
        assert "no SuperLink started by fedclip" in stop_local_superlink(home)
        # a recorded pid that now names another process (pid reuse) is left alone
        (home / "local-superlink" / PID_FILE).write_text(json.dumps(
            {"pid": other.pid, "started": "0", "command": command}))
        assert "had already stopped" in stop_local_superlink(home)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_the_local_superlinks_command_is_flowers_own(tmp_path, monkeypatch):
    from flwr.cli.constant import LOCAL_CONTROL_API_ADDRESS, LOCAL_SUPERLINK_HTTP_API_PORT

    from fedclip.flower.launch import _local_superlink, connection_address, local_ports

    control = LOCAL_CONTROL_API_ADDRESS.rpartition(":")[2]
    assert local_ports() == (LOCAL_SUPERLINK_HTTP_API_PORT, control)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    command, health = _local_superlink()
    assert command[command.index("--log-file") + 1] == str(
        tmp_path / "local-superlink" / "superlink.log")  # where Flower's own one logs
    assert health == f"http://127.0.0.1:{LOCAL_SUPERLINK_HTTP_API_PORT}/health"
    (tmp_path / "config.toml").write_text('[superlink]\ndefault = "local-sim"\n\n'
                                          '[superlink.local-sim]\naddress = ":local:"\n'
                                          '[superlink.far]\naddress = "host:9093"\n')
    assert connection_address(None, tmp_path) == ":local:"
    assert connection_address("far", tmp_path) == "host:9093"
    assert connection_address("none", tmp_path) is None


def test_dp_without_a_clipping_norm_names_the_value_to_set(capsys):
    assert main(["run", "--set", "dp=server", "--set", "aggregation=uniform", "--set",
                 "dp_epsilon=10", "--out", "unused"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--set dp_clipping_norm=0.8" in err and "dp-clipping-norm=0.8" in err


# --- fetch: a dataset from its pinned hub revision into a folder -----------------------------
def test_fetch_offline_says_what_to_do_in_one_line(tmp_path, capsys, monkeypatch):
    from fedclip.data import sources

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["fetch", "pacs", str(tmp_path / "PACS")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "PACS").exists()
    assert "run `fedclip fetch pacs DIR`, copy DIR to this machine, and pass --data-root" in err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    asked = []
    monkeypatch.setattr(sources, "_reachable", lambda host: asked.append(host) or False)
    assert main(["fetch", "pacs", str(tmp_path / "PACS")]) == 2
    assert asked == ["huggingface.co"] and "cannot be reached" in capsys.readouterr().err
    assert main(["fetch", "imagenet", str(tmp_path / "x")]) == 2
    assert "pacs, office-home or hf:ORG/NAME" in capsys.readouterr().err


def test_fetch_writes_the_pinned_revision_once(tmp_path, capsys, monkeypatch):
    import sys
    import types

    from PIL import Image

    from fedclip.data import sources
    from fedclip.data.folder import scan_dataset
    from fedclip.data.specs import PACS
    from tests.test_data import FakeHubDataset

    asked = []

    def load_dataset(dataset_id, split, revision):
        asked.append((dataset_id, split, revision))
        return FakeHubDataset(
            {"image": Image.new("RGB", (16, 16), c), "label": y, "domain": d}
            for d in PACS.domains for c, y in [("red", 0), ("blue", 1)])

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(sources, "_reachable", lambda host: True)
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # a hub client may set them
        monkeypatch.delenv(flag, raising=False)
    target = tmp_path / "data" / "PACS"
    assert main(["fetch", "pacs", str(target)]) == 0
    out, err = capsys.readouterr()
    assert asked == [("flwrlabs/pacs", "train", PACS.hub_revision)] and len(asked[0][2]) == 40
    assert f"hf:flwrlabs/pacs@{PACS.hub_revision}, 8 images" in err
    assert out.strip() == f"use it with: --data-root {target}"
    dataset = scan_dataset(target)
    assert dataset.name == "pacs" and set(dataset.domains) == set(PACS.domains)
    assert not (target / ".fetching").exists()
    assert main(["fetch", "pacs", str(target)]) == 0  # once: nothing downloaded again
    assert "already there" in capsys.readouterr().err and len(asked) == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["fetch", "pacs", str(tmp_path / "other")]) == 2
    assert "holds something else" in capsys.readouterr().err


# --- the paper's table: published numbers beside measured ones ------------------------------
def test_the_papers_numbers_are_transcribed_consistently():
    from fedclip.reproduce import HELDOUTS, METHODS

    for m in METHODS:  # each published average is the mean of its four domains, rounded
        mean = sum(m.published[h] for h in HELDOUTS) / 4
        assert abs(mean - m.published["average"]) <= 0.005 + 1e-9, m.label
    assert [m.algorithm for m in METHODS] == ["fedavg-cnn", "fedprox-cnn", "fedavg-full",
                                              "fedprox-full", "fedclip"]
    assert METHODS[-1].published["average"] - METHODS[3].published["average"] == pytest.approx(
        8.92)  # the abstract's "9% overall improvement on PACS"


def test_paper_runs_the_five_methods_and_prints_both_columns(tiny_arch, tmp_path, capsys):
    out = tmp_path / "paper"
    small = ["--set", "personalize_epochs=0"]
    for cnn in ("fedavg-cnn", "fedprox-cnn"):  # AlexNet's 57M parameters: too slow here
        small += ["--set", f"{cnn}.model=squeezenet1_1@none", "--set", f"{cnn}.image_size=64"]
    assert main(["paper", "--backbone", tiny_arch, "--heldout", "sketch", "--rounds", "1",
                 "--out", str(out), *small]) == 0
    shown = capsys.readouterr().out
    assert "random weights" in shown  # never read as the paper's numbers
    saved = json.loads((out / "paper.json").read_text())
    sketch, average = saved["rows"]
    assert sketch[0] == "sketch" and sketch[1::2] == ["56.14", "55.89", "89.16", "90.08", "94.99"]
    measured = sketch[2::2]
    assert all(0 <= float(v) <= 100 for v in measured)  # all five ran, on the tiny CLIP too
    for algorithm, value in zip(["fedavg-cnn", "fedprox-cnn", "fedavg-full", "fedprox-full",
                                 "fedclip"], measured, strict=True):
        result = json.loads((out / f"{algorithm}-seed0" / "results.json").read_text())
        assert f"{100 * result['runs'][0]['generalization']:.2f}" == value
    assert average[2::2] == ["n/a"] * 5  # one held-out domain is not the paper's mean
    assert "94.99" in shown and measured[-1] in shown


def test_paper_on_the_stand_in_says_it_is_not_clip_and_what_cannot_run():
    from fedclip.reproduce import caveat, not_runnable

    assert "NOT CLIP" in caveat("standin")
    assert not_runnable("fedavg-full", "standin") and not_runnable("fedprox-full", "standin")
    assert not_runnable("fedclip", "standin") is None
    assert not_runnable("fedavg-cnn", "standin") is None
    assert caveat("open_clip:ViT-B-32@openai") is None


# --- bad input and interrupts: one line, an exit code, nothing computed lost ----------------
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


def test_a_client_at_zero_percent_is_drawn_at_zero():
    from fedclip.report import _num

    assert _num(0.0) == 0.0 and _num(None) != _num(None)  # None: a gap (NaN)


@pytest.mark.parametrize("device", ["cuda:7", "tpu", "cuda:x"])
def test_a_device_this_machine_lacks_is_one_line(tmp_path, capsys, device):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has eight GPUs")
    line = one_line_error(capsys, ["run", "--backbone", "standin", "--device", device,
                                   "--out", str(tmp_path / "r")])
    assert device in line and "this machine has cpu" in line


@pytest.mark.parametrize("flag", ["--algorithms", "--seeds"])
def test_an_empty_compare_plan_is_one_line(tmp_path, capsys, flag):
    line = one_line_error(capsys, ["compare", flag, "", "--backbone", "standin", "--out",
                                   str(tmp_path / "c")])
    assert "at least one" in line


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
