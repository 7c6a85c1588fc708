"""Flower apps: parity with the in-process runner, robustness of the strategy."""

import pytest
import torch
from flwr.app import ArrayRecord, Message
from safetensors.torch import load_file

from fedclip.config import RunConfig
from fedclip.errors import ConfigError
from fedclip.flower.client_app import build_client_app
from fedclip.flower.server_app import main as _server_main
from fedclip.inprocess import experiment as _experiment
from tests.conftest import as_written
from tests.flower_grid import LocalGrid

run = as_written(_experiment.run)
server_main = as_written(_server_main)


def _federation(toy_root, tiny_arch, tmp_path, **extra):
    run_config = {"backbone": tiny_arch, "data-root": str(toy_root), "heldout": "gamma",
                  "rounds": 3, "lr": 1e-3, "out": str(tmp_path / "flower"),
                  "classes": "cat,dog,red_car", **extra}
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    return run_config, nodes


@pytest.mark.parametrize("optimizer_state", ["reset", "keep"])
def test_flower_matches_in_process_runner(tiny_arch, toy_root, tmp_path, optimizer_state):
    run_config, nodes = _federation(toy_root, tiny_arch, tmp_path,
                                    **{"optimizer-state": optimizer_state})
    grid = LocalGrid(build_client_app(), nodes, run_config)
    flower = server_main(grid, run_config)
    cfg = RunConfig.build(backbone=tiny_arch, data_root=str(toy_root), heldout="gamma",
                          rounds=3, lr=1e-3, optimizer_state=optimizer_state)
    local = run(cfg, tmp_path / "local")[0]
    wf = load_file(tmp_path / "flower" / "gamma" / "adapter-last.safetensors")
    wl = load_file(tmp_path / "local" / "gamma" / "adapter-last.safetensors")
    assert max((wf[k] - wl[k]).abs().max().item() for k in wl) < 1e-5
    for key in ("val_accuracy", "test_accuracy", "heldout_accuracy"):
        assert [r[key] for r in flower["history"]] == [r[key] for r in local["history"]]
    assert flower["zeroshot"] == local["zeroshot"]
    assert flower["best_round"] == local["best_round"]
    # only the adapter crosses the wire: 2 training nodes, down and up, fp32
    assert flower["bytes_per_round"] == local["bytes_per_round"] == 2 * 2 * 2112 * 4
    # the held-out node never receives a train message
    heldout_node = 1002
    assert not [m for m in grid.sent if m.metadata.message_type == "train"
                and m.metadata.dst_node_id == heldout_node]


def test_fp16_transfer_halves_the_bytes(tiny_arch, toy_root, tmp_path):
    run_config, nodes = _federation(toy_root, tiny_arch, tmp_path, transfer="fp16")
    half = server_main(LocalGrid(build_client_app(), nodes, run_config), run_config)
    assert half["bytes_per_round"] == 2 * 2 * 2112 * 2
    assert 0 <= half["generalization"] <= 1


def _poison(kind):
    def tamper(node, reply):
        if node != 1000 or reply.metadata.message_type != "train":
            return reply
        arrays = reply.content["arrays"].to_torch_state_dict()
        key = next(iter(arrays))
        if kind == "nan":
            arrays[key] = arrays[key].clone().fill_(float("nan"))
        else:
            arrays[key] = torch.zeros(3, 3)
        reply.content["arrays"] = ArrayRecord(arrays)
        return reply
    return tamper


@pytest.mark.parametrize("kind,reason", [("nan", "NaN or inf"), ("shape", "shape")])
def test_malformed_update_is_rejected_and_the_round_aggregates_the_rest(
        tiny_arch, toy_root, tmp_path, caplog, kind, reason):
    run_config, nodes = _federation(toy_root, tiny_arch, tmp_path, rounds=2)
    result = server_main(LocalGrid(build_client_app(), nodes, run_config, tamper=_poison(kind)),
                         run_config)
    rounds = [r for r in result["history"] if r["round"] > 0]
    assert all(reason in r["rejected"]["alpha"] for r in rounds)
    assert all(list(r["train_loss"]) == ["beta"] for r in rounds)
    assert "rejected the update of alpha" in caplog.text
    final = load_file(tmp_path / "flower" / "gamma" / "adapter-last.safetensors")
    assert all(torch.isfinite(v).all() for v in final.values())


def test_a_missing_client_is_recorded_and_the_run_completes(tiny_arch, toy_root, tmp_path):
    run_config, nodes = _federation(toy_root, tiny_arch, tmp_path)
    grid = LocalGrid(build_client_app(), nodes, run_config, drop={1001: {2, 3}})
    result = server_main(grid, run_config)
    assert result["rounds"] == 3 and result["missing_clients"] == ["beta"]
    assert [r["missing"] for r in result["history"][1:]] == [[], ["beta"], ["beta"]]


def test_simulation_needs_one_node_per_client_plus_heldout(tiny_arch, toy_root, tmp_path):
    run_config, _ = _federation(toy_root, tiny_arch, tmp_path)
    nodes = [{"partition-id": i, "num-partitions": 4} for i in range(4)]
    with pytest.raises(Exception, match="needs 3 SuperNodes"):
        server_main(LocalGrid(build_client_app(), nodes, run_config), run_config)


def test_messages_are_well_formed_flower_messages(tiny_arch, toy_root, tmp_path):
    run_config, nodes = _federation(toy_root, tiny_arch, tmp_path, rounds=1)
    grid = LocalGrid(build_client_app(), nodes, run_config)
    server_main(grid, run_config)
    kinds = [m.metadata.message_type for m in grid.sent]
    assert kinds.count("query") == 3 and kinds.count("train") == 2
    # round 0 and round 1 on all three nodes, then personalization on the two training nodes
    assert kinds.count("evaluate") == 6 + 2
    assert all(isinstance(m, Message) for m in grid.sent)


def test_a_round_is_one_exchange_with_one_message_per_node(tiny_arch, toy_root, tmp_path):
    """Round r's parameters are evaluated inside round r + 1's train messages (the held-out
    node in an evaluate message of the same exchange): rounds cost one exchange each, and the
    records still equal the in-process ones (test_flower_matches_in_process_runner)."""
    run_config, nodes = _federation(toy_root, tiny_arch, tmp_path, rounds=3)
    grid = LocalGrid(build_client_app(), nodes, run_config)
    exchanges = []
    honest = grid.send_and_receive

    def send_and_receive(messages, *, timeout=None):  # noqa: ANN001, ANN202
        messages = list(messages)
        exchanges.append([(m.metadata.dst_node_id, m.metadata.message_type,
                           dict(m.content["config"]) if "config" in m.content else {})
                          for m in messages])
        return honest(messages, timeout=timeout)

    grid.send_and_receive = send_and_receive
    result = server_main(grid, run_config)
    exchanges = [e for e in exchanges if e]
    for exchange in exchanges:  # never two messages to one node in one exchange
        assert len({node for node, _, _ in exchange}) == len(exchange)
    kinds = [sorted(kind for _, kind, _ in e) for e in exchanges]
    # discovery, round 0, rounds 1-3 (2 trainers; from round 2 also the held-out node's
    # evaluation of the previous round), round 3's own evaluation, personalization
    assert kinds == [["query"] * 3, ["evaluate"] * 3, ["train"] * 2,
                     ["evaluate", "train", "train"], ["evaluate", "train", "train"],
                     ["evaluate"] * 3, ["evaluate"] * 2]
    for rnd, exchange in ((2, exchanges[3]), (3, exchanges[4])):
        assert all(c["evaluate-round"] == rnd - 1 for _, k, c in exchange if k == "train")
        assert all(c["server-round"] == rnd - 1 for _, k, c in exchange if k == "evaluate")
    assert [r["round"] for r in result["history"]] == [0, 1, 2, 3]
    assert all(len(r["val_accuracy"]) == 2 and r["heldout_accuracy"] is not None
               for r in result["history"])


def test_client_side_clipping_bounds_each_round_and_noise_changes_the_result(
        tiny_arch, toy_root, tmp_path):
    from fedclip.adapters import build_adapter, get_params

    clip = 0.01
    run_config, nodes = _federation(toy_root, tiny_arch, tmp_path, rounds=2, dp="client",
                                    aggregation="uniform", **{"dp-clipping-norm": clip,
                                                              "dp-noise-multiplier": 1e-9})
    clipped = server_main(LocalGrid(build_client_app(), nodes, run_config), run_config)
    final = load_file(tmp_path / "flower" / "gamma" / "adapter-last.safetensors")
    init = get_params(build_adapter(32, seed=0))
    moved = torch.sqrt(sum(((final[k] - init[k]) ** 2).sum() for k in init)).item()
    assert 0 < moved <= 2 * clip + 1e-6  # each round moves by a mean of clipped updates
    run_config["out"] = str(tmp_path / "noisy")
    run_config["dp-noise-multiplier"] = 1.0
    server_main(LocalGrid(build_client_app(), nodes, run_config), run_config)
    noisy = load_file(tmp_path / "noisy" / "gamma" / "adapter-last.safetensors")
    assert any(not torch.allclose(noisy[k], final[k]) for k in final)
    assert clipped["rounds"] == 2


def _secagg(tmp_path, run_config, nodes, name):  # noqa: ANN001, ANN202
    """A SecAgg+ run into tmp_path/name; its final adapter and result."""
    from flwr.app import Context, RecordDict

    from fedclip.flower import secagg

    run_config = {**run_config, "out": str(tmp_path / name)}
    grid = LocalGrid(secagg.build_client_app(), nodes, run_config)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=run_config)
    result = secagg.run(grid, context, run_config)
    return load_file(tmp_path / name / "gamma" / "adapter-last.safetensors"), result, grid


def _max_diff(a, b) -> float:  # noqa: ANN001
    return max((a[k] - b[k]).abs().max().item() for k in b)


def test_secagg_plus_aggregate_equals_plain_fedavg(tiny_arch, toy_root, tmp_path):
    """SecAgg+ (legacy workflow path) against the in-process FedAvg, 2 rounds."""
    run_config, nodes = _federation(toy_root, tiny_arch, tmp_path, rounds=2,
                                    **{"secagg-max-weight": 100.0})
    secure, result, grid = _secagg(tmp_path, run_config, nodes, "secure")
    cfg = RunConfig.build(backbone=tiny_arch, data_root=str(toy_root), heldout="gamma",
                          rounds=2, lr=1e-3)
    run(cfg, tmp_path / "local")
    plain = load_file(tmp_path / "local" / "gamma" / "adapter-last.safetensors")
    diff = _max_diff(secure, plain)
    print(f"secagg+ vs fedavg max abs diff {diff:.2e}")
    assert diff < 1e-3, diff  # quantization (2^22 levels over [-8, 8]) and weight rounding
    assert any(m.metadata.message_type == "train" for m in grid.sent)
    assert result.runtime == "flower-secagg+" and [r.round for r in result.history] == [0, 1, 2]
    # the payloads: float32 arrays (numpy's .npy header, 128 bytes each) down to all three
    # nodes (the legacy workflow instructs the held-out one too; it answers with 0 examples),
    # an int64 masked vector up from each of the two training clients
    values = sum(t.numel() for t in plain.values())
    down = 4 * values + 128 * len(plain)
    assert [(r.bytes_sent, r.bytes_received) for r in result.history[1:]] == [
        (3 * down, 2 * 8 * values)] * 2


def test_secagg_plus_runs_the_algorithms_server_step(tiny_arch, toy_root, tmp_path):
    """fedadam through SecAgg+ takes FedAdam's server step on the secure mean: it ends where
    a plain Flower run of FedAdam ends (within the quantization), not where FedAvg ends.
    Uniform weights of 1 with secagg-max-weight 1 keep the weights exact, so only the
    parameters' quantization (2^22 levels over [-8, 8], about 4e-6 per client) remains;
    FedAdam's step amplifies it (about server-lr x 0.1 / tau = 10x per round)."""
    run_config, nodes = _federation(toy_root, tiny_arch, tmp_path, rounds=2,
                                    algorithm="fedadam", aggregation="uniform",
                                    **{"secagg-max-weight": 1.0, "fedadam.server-lr": 0.1})
    secure, result, _ = _secagg(tmp_path, run_config, nodes, "secure")
    server_main(LocalGrid(build_client_app(), nodes, {**run_config, "out": str(
        tmp_path / "plain")}), {**run_config, "out": str(tmp_path / "plain")})
    fedadam = load_file(tmp_path / "plain" / "gamma" / "adapter-last.safetensors")
    fedavg, _, _ = _secagg(tmp_path, {**run_config, "algorithm": "fedclip"}, nodes, "avg")
    tolerance = 1e-3  # the quantization of the secure sum, as for FedAvg above
    print(f"secagg+ fedadam vs plain fedadam {_max_diff(secure, fedadam):.2e}, vs fedavg "
          f"{_max_diff(secure, fedavg):.2e}")
    assert _max_diff(secure, fedadam) < tolerance
    assert _max_diff(secure, fedavg) > 10 * tolerance  # not silently FedAvg
    assert result.algorithm == "fedadam"


@pytest.mark.parametrize(("extra", "why"), [
    ({"algorithm": "scaffold"}, "per-client extras"),
    ({"algorithm": "ditto"}, "keeps a model per client"),
    ({"aggregation": "median"}, "needs the individual updates"),
    ({"resume": True}, "resume=true is not available"),
])
def test_secagg_plus_refuses_what_a_secure_sum_cannot_carry(tiny_arch, toy_root, tmp_path,
                                                            extra, why):
    run_config, nodes = _federation(toy_root, tiny_arch, tmp_path, rounds=1, **extra)
    with pytest.raises(ConfigError, match=why) as info:
        _secagg(tmp_path, run_config, nodes, "refused")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "refused").exists()  # refused before anything is written


def test_app_config_in_pyproject_agrees_with_the_defaults():
    """pyproject lists the defaults so that `flwr run -c` may override them: no drift, and
    every RunConfig field a user may set is settable on Flower."""
    import tomllib
    from pathlib import Path

    from fedclip.flower.settings import FLOWER_KEYS, run_config_to_cfg

    app = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    config = app["tool"]["flwr"]["app"]["config"]
    options = {k: v for k, v in config.items() if isinstance(v, dict)}
    flat = {k: v for k, v in config.items() if not isinstance(v, dict)}
    defaults = RunConfig()
    differs = {"backbone", "heldout", "rounds"}  # the app's demo choices
    for key, value in flat.items():
        if key in FLOWER_KEYS:
            assert value == FLOWER_KEYS[key], key
        elif key in ("classes", "prompt-templates"):
            assert value == "" and getattr(defaults, key.replace("-", "_")) is None
        elif key not in differs:
            assert getattr(defaults, key.replace("-", "_")) == value, key
    assert set(FLOWER_KEYS) <= set(flat)
    settable = {k.replace("_", "-") for k in RunConfig.model_fields} - {
        "data-root", "cache-dir", "extract-batch-size", "options"}
    assert settable <= set(flat), settable - set(flat)
    # algorithm options as Flower flattens them (NAME.KEY) reach the algorithm
    flower_flat = {f"{a}.{k}": v for a, table in options.items() for k, v in table.items()}
    cfg, _ = run_config_to_cfg({**flat, **flower_flat, "fedprox.mu": 0.5})
    assert cfg.options["fedprox"]["mu"] == 0.5
    from fedclip.algorithms import algorithm_class

    assert options["fedprox"]["mu"] == algorithm_class("fedprox").Options().mu


def test_secagg_sends_the_weight_cap_and_clients_weigh_themselves_under_it():
    """Under SecAgg+ clients weigh themselves inside the secure sum: the server sends the cap
    (max_weight_ratio x the median of the sizes reported at round 0) with the round, and a
    client that holds more examples weighs no more than it (hand-computed: sizes 10, 30 and
    1000 have median 30, so the cap is 60)."""
    from types import SimpleNamespace

    from fedclip.algorithms import get_algorithm
    from fedclip.core.client import ClientUpdate
    from fedclip.core.server import Server
    from fedclip.flower.secagg import SecureStrategy
    from fedclip.flower.secagg_client import AdapterClient

    algorithm = get_algorithm(RunConfig.build(backbone="standin", heldout="d",
                                              classes=("x", "y")))
    server = Server(algorithm, {"a": 10, "b": 30, "c": 1000})
    server.start(algorithm.init_global(4))
    strategy = SecureStrategy(server, {}, None, 1.0)
    strategy.plan = server.plan()
    config = strategy.fit_config(1)
    assert config["weight-cap"] == 60.0 and config["server-round"] == 1

    class Big(AdapterClient):
        def __init__(self) -> None:  # a site of 1000 train examples, no backbone needed
            self.algorithm, self.keys = algorithm, ["w"]
            self.site = SimpleNamespace(data=SimpleNamespace(train=None), name="c",
                                        class_text=torch.zeros(1, 4), logit_scale=1.0)

        def _params(self, arrays):  # noqa: ANN001, ANN202
            return {"w": torch.zeros(1)}

    algorithm.client.train_client = lambda job: ClientUpdate({"w": torch.zeros(1)}, {}, 1000, 0.1)
    _, weight, _ = Big().fit([torch.zeros(1).numpy()], config)
    assert weight == 60
    _, weight, _ = Big().fit([torch.zeros(1).numpy()], {**config, "weight-cap": 5000.0})
    assert weight == 1000
    _, weight, _ = Big().fit([torch.zeros(1).numpy()], {**config, "weight-cap": 60.5})
    assert weight == 60.5  # a float cap is not truncated (as every runtime weighs)


def test_the_polling_grid_waits_for_every_reply_and_stops_at_the_timeout():
    """PollingGrid: Flower's send_and_receive semantics through push/pull, a shorter wait."""
    import time
    from types import SimpleNamespace

    from fedclip.flower.grid import PollingGrid

    class SlowGrid:  # one reply per pull; "lost" never answers
        pulls = 0

        def push_messages(self, messages):
            return list(messages)

        def pull_messages(self, waiting):
            self.pulls += 1
            ready = sorted(i for i in waiting if i != "lost")[:1]
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
                    for i in ready]

    inner = SlowGrid()
    replies = PollingGrid(inner, 0.01).send_and_receive(["a", "b", "c"])
    assert [r.metadata.reply_to_message_id for r in replies] == ["a", "b", "c"]
    assert inner.pulls == 3
    start = time.monotonic()
    replies = PollingGrid(SlowGrid(), 0.01).send_and_receive(["a", "lost"], timeout=0.2)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert 0.2 <= time.monotonic() - start < 2
