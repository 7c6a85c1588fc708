"""The Flower server trusts no reply: a bad train reply is rejected and leaves the aggregate
as it would be without it, a malformed identity is refused with the node named, a client that
fails is recorded, and divergence on every client is the run's failure."""

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord

from fedclip.config import RunConfig
from fedclip.errors import ConfigError, TrainingError
from fedclip.flower.client_app import build_client_app
from fedclip.flower.server_app import main as _server_main
from tests.conftest import as_written
from tests.flower_grid import LocalGrid

server_main = as_written(_server_main)


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
