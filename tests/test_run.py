"""End to end: the CLI and the API on a tiny random open_clip over generated images."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedclip.cli import main
from fedclip.config import RunConfig
from fedclip.errors import ResumeError
from fedclip.inprocess import experiment as _experiment
from fedclip.inprocess.experiment import prepare
from tests.conftest import as_written, interrupted_at_round_2

run = as_written(_experiment.run)
run_heldout = as_written(_experiment.run_heldout)

RESULT_KEYS = {"heldout", "algorithm", "generalization", "personalization", "zeroshot",
               "best_round", "trainable_params", "bytes_per_round", "seconds_per_round",
               "history", "last"}


def test_cli_end_to_end(tiny_arch, toy_root, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--data-root", str(toy_root), "--backbone", tiny_arch, "--heldout", "all",
                 "--rounds", "3", "--seed", "1", "--out", str(out), "--set", "lr=1e-3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "held out" in printed and "mean" in printed
    results = json.loads((out / "results.json").read_text())
    assert [r["heldout"] for r in results["runs"]] == ["alpha", "beta", "gamma"]
    for r in results["runs"]:
        assert set(r) >= RESULT_KEYS
        assert 0 <= r["generalization"] <= 1 and 0 <= r["best_round"] <= 3
        clients = {"alpha", "beta", "gamma"} - {r["heldout"]}
        assert set(r["personalization"]["per_client"]) == clients
        assert r["trainable_params"] == 2 * (32 * 32 + 32)
        assert r["bytes_per_round"] == 2 * 2 * r["trainable_params"] * 4
        assert [h["round"] for h in r["history"]] == [0, 1, 2, 3]
        run_dir = out / r["heldout"]
        assert {"adapter.safetensors", "adapter-last.safetensors", "history.png",
                "checkpoint.safetensors", "result.json"} <= {p.name for p in run_dir.iterdir()}
    assert "| mean |" in (out / "results.md").read_text()
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-3


def test_training_changes_the_adapter_and_the_same_seed_repeats(tiny_arch, toy_root, tmp_path):
    cfg = RunConfig.build(data_root=str(toy_root), backbone=tiny_arch, heldout="gamma", rounds=3,
                          lr=1e-3)
    a = run(cfg, tmp_path / "a")[0]
    b = run(cfg, tmp_path / "b")[0]
    run(cfg.replace(seed=5), tmp_path / "c")
    assert a["history"][1:] and [h["val_accuracy"] for h in a["history"]] == [
        h["val_accuracy"] for h in b["history"]]
    wa, wb = (load_file(tmp_path / x / "gamma" / "adapter-last.safetensors") for x in "ab")
    wc = load_file(tmp_path / "c" / "gamma" / "adapter-last.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    init = run(cfg.replace(rounds=0), tmp_path / "d")[0]
    assert init["rounds"] == 0 and init["best_round"] == 0


@pytest.mark.parametrize("optimizer_state", ["reset", "keep"])
def test_resume_after_interruption_equals_uninterrupted(tiny_arch, toy_root, tmp_path,
                                                        optimizer_state):
    cfg = RunConfig.build(data_root=str(toy_root), backbone=tiny_arch, heldout="beta", rounds=4,
                          lr=1e-3, checkpoint_every=1, optimizer_state=optimizer_state)
    prep = prepare(cfg)
    full = run_heldout(cfg, prep, "beta", tmp_path / "full")

    interrupted_at_round_2(cfg, prep, "beta", tmp_path / "cut")
    with pytest.raises(ResumeError, match="--resume"):
        run_heldout(cfg, prep, "beta", tmp_path / "cut")
    with pytest.raises(ResumeError, match="different configuration"):
        run_heldout(cfg.replace(lr=5e-4), prep, "beta", tmp_path / "cut", resume=True)
    resumed = run_heldout(cfg, prep, "beta", tmp_path / "cut", resume=True)
    strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in h]  # noqa: E731, E501
    assert strip(resumed["history"]) == strip(full["history"])
    wf = load_file(tmp_path / "full" / "beta" / "adapter-last.safetensors")
    wr = load_file(tmp_path / "cut" / "beta" / "adapter-last.safetensors")
    assert all(torch.equal(wf[k], wr[k]) for k in wf)


def test_zeroshot_trains_nothing(tiny_arch, toy_root, tmp_path):
    cfg = RunConfig.build(data_root=str(toy_root), backbone=tiny_arch, heldout="alpha",
                          algorithm="zeroshot", rounds=5)
    r = run(cfg, tmp_path / "z")[0]
    assert r["trainable_params"] == 0 and r["bytes_per_round"] == 0 and r["rounds"] == 0
    assert r["generalization"] == r["zeroshot"]["generalization"]


@pytest.mark.parametrize("argv,message", [
    (["--data-root", "/nonexistent/x"], "does not exist"),
    (["--backbone", "clip"], "unknown backbone spec"),
    (["--heldout", "omega"], "unknown held-out domain 'omega'"),
    (["--loss", "mse"], "loss"),
    (["--set", "bogus_key=1"], "bogus_key"),
])
def test_bad_input_gives_one_line_and_exit_2(tiny_arch, toy_root, tmp_path, capsys, argv,
                                             message):
    base = ["run", "--data-root", str(toy_root), "--backbone", tiny_arch, "--rounds", "1",
            "--out", str(tmp_path / "o")]
    code = main(base + argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err.replace("\n", " ")
    assert "Traceback" not in err


def test_predict_reproduces_the_reported_heldout_accuracy(tiny_arch, toy_root, tmp_path,
                                                          capsys):
    from fedclip.errors import BackboneError
    from fedclip.predict import predict

    cfg = RunConfig.build(data_root=str(toy_root), backbone=tiny_arch, heldout="beta", rounds=3,
                          lr=1e-3)
    result = run(cfg, tmp_path / "r")[0]
    adapter = tmp_path / "r" / "beta" / "adapter.safetensors"
    rows = predict(adapter, [toy_root / "beta"])
    truth = [p.parent.name for p in sorted((toy_root / "beta").rglob("*.png"))]
    predicted = {r["file"]: r["class"] for r in rows}
    files = sorted((toy_root / "beta").rglob("*.png"))
    accuracy = sum(predicted[str(f.resolve())] == t for f, t in zip(files, truth, strict=True))
    assert accuracy / len(files) == pytest.approx(result["generalization"])
    with pytest.raises(BackboneError, match="trained on"):
        predict(adapter, [toy_root / "beta"], backbone="standin")
    assert main(["predict", str(adapter), str(files[0]), "--out", str(tmp_path / "p.csv")]) == 0
    assert "probability" in (tmp_path / "p.csv").read_text()
    assert main(["predict", str(tmp_path / "missing.safetensors"), str(files[0])]) == 2


def test_personalization_fine_tunes_copies_and_never_touches_the_global(tiny_arch, toy_root,
                                                                         tmp_path):
    from fedclip.inprocess.experiment import build_federation

    cfg = RunConfig.build(data_root=str(toy_root), backbone=tiny_arch, heldout="beta", rounds=2,
                          lr=1e-3)
    result = run(cfg, tmp_path / "p")[0]
    pers = result["personalized"]
    assert set(pers["per_client"]) == {"alpha", "gamma"}
    assert all(0 <= e <= cfg.personalize_epochs for e in pers["epochs"].values())
    fed = build_federation(cfg, prepare(cfg), "beta")
    params = load_file(tmp_path / "p" / "beta" / "adapter.safetensors")
    before = {k: v.clone() for k, v in params.items()}
    again = fed.personalize(params, cfg.personalize_epochs)
    assert all(torch.equal(before[k], params[k]) for k in params)
    assert again.to_json() == pers  # seeded: the same numbers
    # a client that keeps epoch 0 scores exactly what the global adapter scores on its test
    for name, epoch in pers["epochs"].items():
        if epoch == 0:
            assert pers["per_client"][name] == result["personalization"]["per_client"][name]


def test_local_clients_train_alone_and_send_nothing(tiny_arch, toy_root, tmp_path):
    cfg = RunConfig.build(data_root=str(toy_root), backbone=tiny_arch, heldout="beta", rounds=3,
                          lr=1e-3, algorithm="local", checkpoint_every=1)
    r = run(cfg, tmp_path / "l")[0]
    assert r["bytes_per_round"] == 0 and r["personalized"] is None
    assert (tmp_path / "l" / "beta" / "adapter-alpha.safetensors").exists()
    assert (tmp_path / "l" / "beta" / "adapter-gamma.safetensors").exists()
    last = load_file(tmp_path / "l" / "beta" / "checkpoint.safetensors")
    assert any(not torch.equal(last[f"client/alpha/personal/{k}"],
                               last[f"client/gamma/personal/{k}"])
               for k in ("attention.0.weight", "attention.2.weight"))  # never averaged
    # alpha's adapter equals a one-client federation of alpha alone (nothing from gamma)
    from fedclip.inprocess.experiment import build_federation
    from fedclip.inprocess.federation import Federation

    fed = build_federation(cfg.replace(algorithm="fedclip"), prepare(cfg), "beta")
    alone = Federation(fed.algorithm, [fed.clients[0]], fed.class_text, fed.logit_scale)
    state = alone.run()
    assert state.round == 3
    for k, v in state.global_params.items():
        torch.testing.assert_close(last[f"client/alpha/personal/{k}"], v)


def test_compare_writes_the_paper_tables(tiny_arch, toy_root, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--algorithms", "zeroshot,fedclip,local,fedprox", "--seeds", "0,1",
                 "--data-root", str(toy_root), "--backbone", tiny_arch, "--rounds", "2",
                 "--out", str(out), "--set", "lr=1e-3"])
    assert code == 0
    summary = json.loads((out / "compare.json").read_text())
    gen = summary["tables"]["generalization"]
    assert gen["header"] == ["held out", "zeroshot", "fedclip", "local", "fedprox"]
    assert [r[0] for r in gen["rows"]] == ["alpha", "beta", "gamma", "average"]
    resources = {r[0]: r for r in summary["tables"]["resources"]["rows"]}
    assert resources["zeroshot"][1] == "0" and resources["local"][2] == "0"
    assert resources["fedclip"][1] == f"{2 * (32 * 32 + 32):,}"
    assert summary["backbone_params"] > 2 * (32 * 32 + 32)
    assert (out / "compare.png").exists() and (out / "fedclip-seed1" / "results.json").exists()
    assert "±" in (out / "compare.md").read_text()  # two seeds: a spread
    assert main(["compare", "--seeds", "x", "--out", str(tmp_path / "bad")]) == 2


def test_backbone_fedavg_trains_the_backbone_and_fedclip_never_does(tiny_arch, toy_root,
                                                                     tmp_path):
    from fedclip.backbones import load_backbone

    frozen = {k: v.clone() for k, v in load_backbone(tiny_arch).model.state_dict().items()}
    base = RunConfig.build(data_root=str(toy_root), backbone=tiny_arch, heldout="beta",
                           rounds=2, lr=1e-3)
    full = run(base.replace(algorithm="fedavg-full"), tmp_path / "full")[0]
    model = load_file(tmp_path / "full" / "beta" / "adapter-last.safetensors")
    assert full["trainable_params"] == sum(v.numel() for v in frozen.values()
                                           if v.is_floating_point()) == sum(
        v.numel() for v in model.values())
    assert full["bytes_per_round"] == 2 * 2 * full["trainable_params"] * 4
    changed = [k for k in model if not torch.equal(model[k], frozen[k])]
    assert any(k.startswith("visual.") for k in changed)  # image encoder trained
    assert any(k.startswith("transformer.") for k in changed)  # text encoder trained
    run(base, tmp_path / "adapter")  # fedclip: the backbone is never touched
    again = load_backbone(tiny_arch).model.state_dict()
    assert all(torch.equal(again[k], frozen[k]) for k in frozen)
    # several steps per round, so that the proximal pull (zero at the first step) acts
    small = base.replace(batch_size=6, rounds=1)
    run(small.replace(algorithm="fedavg-full"), tmp_path / "avg1")
    run(small.replace(algorithm="fedprox-full", options={"fedprox-full": {"mu": 50.0}}),
        tmp_path / "prox1")
    avg1, prox1 = (load_file(tmp_path / d / "beta" / "adapter-last.safetensors")
                   for d in ("avg1", "prox1"))

    def drift(w):
        return sum(((w[k] - frozen[k]) ** 2).sum().item() for k in w)

    assert drift(prox1) < drift(avg1)  # the proximal term keeps clients near the global
    with pytest.raises(Exception, match="open_clip"):
        run(base.replace(algorithm="fedavg-full", backbone="standin"), tmp_path / "bad")


def test_plots_drawn_in_background_are_the_plots_drawn_here(tiny_arch, toy_root, tmp_path):
    """``fedclip run`` draws its history plots in a second process (matplotlib's import off
    the run's path): the same PNG as drawn in-process, every plot there when the block ends,
    and a worker that died leaves the plot to this process."""
    from fedclip import report
    from fedclip.core.records import RunResult

    cfg = RunConfig.build(data_root=str(toy_root), backbone=tiny_arch, heldout="gamma", rounds=2)
    run(cfg, tmp_path / "run")
    result = RunResult.from_json(json.loads((tmp_path / "run" / "results.json").read_text())
                                 ["runs"][0])
    report.plot_history(result, tmp_path / "here.png")
    with report.plots_in_background():
        worker = report._WORKER.get()
        assert worker is not None
        report.plot_history(result, tmp_path / "there.png")
        assert [path for _, path in worker.sent] == [tmp_path / "there.png"]
    assert worker.proc.returncode == 0
    assert (tmp_path / "there.png").read_bytes() == (tmp_path / "here.png").read_bytes()
    with report.plots_in_background():
        worker = report._WORKER.get()
        worker.proc.kill()
        worker.proc.wait()
        report.plot_history(result, tmp_path / "fallback.png")  # drawn here
        assert worker.sent == [] and (tmp_path / "fallback.png").exists()
    with report.plots_in_background():  # a process that cannot draw: drawn here at the end
        worker = report._WORKER.get()
        worker.proc.stdin.write("not json\n")
        worker.proc.stdin.flush()
        worker.proc.wait()
        worker.sent.append((report.history_data(result), tmp_path / "late.png"))
    assert (tmp_path / "late.png").read_bytes() == (tmp_path / "here.png").read_bytes()
