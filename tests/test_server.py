"""The one server, driven by every runtime: the same plan and the same client updates through
the in-process driver, the Flower driver (the grid harness) and the SecAgg+ driver give the
same round records.

The clients are scripted (``scripted-test``, registered here): each one moves every shared
parameter by a fixed step and reports a fixed loss, so that what differs between the runs can
only be the server's bookkeeping. Scenarios: an honest run with a weight cap and rounds that
are and are not evaluated, a rejected update, a non-finite aggregate, a DP budget that ends
the run early.
"""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from fedclip.algorithms.base import (
    Algorithm,
    ClientJob,
    ClientSide,
    ClientUpdate,
    ServerSide,
    State,
)
from fedclip.algorithms.registry import ALGORITHMS, register
from fedclip.config import RunConfig
from fedclip.core.client import steps_per_round
from fedclip.core.server import AggregateNotFinite, Server
from fedclip.errors import TrainingError
from fedclip.inprocess import run
from fedclip.tensors import Params
from tests.conftest import make_image_folder

CLASSES = ("cat", "dog", "red_car")
STEP = {"alpha": 1e-5, "beta": 2e-5, "gamma": 3e-5}  # each client's move per coordinate


class ScriptOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    scenario: str = "honest"


class ScriptedClient(ClientSide):
    """Clients that move by a fixed step (see the module docstring)."""

    def train_client(self, job: ClientJob) -> ClientUpdate:
        rnd = job.config.server_round
        step = STEP[job.name]
        if job.config.values["scenario"] == "reject" and job.name == "alpha" and rnd == 2:
            step = 1e3  # far past what its local steps can move: the distance rule's case
        params = {k: v + step for k, v in self.shared(job.params).items()}
        steps = steps_per_round(self.cfg, len(job.train), job.config.local_epochs)
        return ClientUpdate(params, {}, len(job.train), 0.25 * rnd + step, steps=steps)


class ScriptedServer(ServerSide):
    """FedCLIP's server side, whose step overflows in round 2 when the scenario asks."""

    def init_server_state(self, global_params: Params) -> State:
        return {"t": torch.zeros(())}

    def aggregate(self, current, updates, server_state):  # noqa: ANN001, ANN201
        params, _ = super().aggregate(current, updates, server_state)
        t = int(server_state["t"]) + 1
        if self.options.scenario == "nonfinite" and t == 2:  # the server's step overflows
            params = {k: v * float("inf") for k, v in params.items()}
        return params, {"t": torch.tensor(float(t))}

    def round_metrics(self, current, new, updates):  # noqa: ANN001, ANN201
        """How many updates the aggregate saw (the server records it by name)."""
        return {"updates": float(len(updates))}


class Scripted(Algorithm):
    name = "scripted-test"
    summary = "scripted clients (tests only)"
    Options = ScriptOptions
    Client = ScriptedClient
    Server = ScriptedServer


@pytest.fixture(autouse=True, scope="module")
def _scripted_registered():
    """``scripted-test`` is known to the registry (every runtime finds algorithms by name)
    while this module runs, and only then: the registry's listings stay the built-ins'."""
    register(Scripted)
    yield
    ALGORITHMS.pop(Scripted.name, None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):  # noqa: ANN001, ANN201
    """alpha is five times the others, so the weight cap (2 x the median) binds."""
    root = tmp_path_factory.mktemp("server") / "data"
    sizes = {"alpha": 20, "beta": 4, "gamma": 4, "delta": 4}
    return make_image_folder(root, {d: {c: n for c in CLASSES} for d, n in sizes.items()},
                             size=32)


SCENARIOS = {
    "honest": dict(rounds=3, eval_every=2),
    "reject": dict(rounds=3, eval_every=1),
    "nonfinite": dict(rounds=3, eval_every=1, checkpoint_every=1),
    "dp-budget": dict(rounds=4, eval_every=1, dp="client", dp_clipping_norm=1.0,
                      dp_noise_multiplier=4.0, dp_epsilon=1.6, aggregation="uniform"),
}


def _settings(scenario: str) -> dict:
    return {"algorithm": "scripted-test", "heldout": "delta", "classes": CLASSES,
            "lr": 1e-3, "personalize_epochs": 0, **SCENARIOS[scenario],
            "options": {"scripted-test": {"scenario": scenario.split("-")[0]}}}


def _run_config(settings: dict, backbone: str, root, out) -> dict:  # noqa: ANN001
    config = {k.replace("_", "-"): v for k, v in settings.items()
              if k not in ("options", "classes")}
    config.update({"backbone": backbone, "data-root": str(root), "out": str(out),
                   "classes": ",".join(CLASSES),
                   "scripted-test.scenario": settings["options"]["scripted-test"]["scenario"]})
    return config


def _drive(driver: str, scenario: str, backbone: str, root, out) -> dict:  # noqa: ANN001
    """One run through ``driver``: its results.json (the held-out run's entry)."""
    settings = _settings(scenario)
    if driver == "in-process":
        cfg = RunConfig.build(backbone=backbone, data_root=str(root), **settings)
        run(cfg, out)
    else:
        from flwr.app import Context, RecordDict

        from fedclip.flower import secagg
        from fedclip.flower.client_app import build_client_app
        from fedclip.flower.server_app import main as server_main
        from tests.flower_grid import LocalGrid

        config = _run_config(settings, backbone, root, out)
        nodes = [{"partition-id": i, "num-partitions": 4} for i in range(4)]
        if driver == "flower":
            server_main(LocalGrid(build_client_app(), nodes, config), config)
        else:
            grid = LocalGrid(secagg.build_client_app(), nodes, config)
            context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                              run_config=config)
            secagg.run(grid, context, config)
    return json.loads((out / "results.json").read_text())["runs"][0]


def _rounds(result: dict, accuracies: bool = True) -> list[dict]:
    keys = ["round", "rejected", "epsilon", "evaluated"]
    out = []
    for r in result["history"]:
        row = {k: r.get(k) for k in keys}
        row["evaluated"] = r.get("val_accuracy") is not None
        row["train_loss"] = {c: round(v, 6) for c, v in (r.get("train_loss") or {}).items()}
        row["rejected"] = sorted(r.get("rejected") or {})
        if accuracies:
            row |= {k: r.get(k) for k in ("val_accuracy", "test_accuracy", "heldout_accuracy")}
        out.append(row)
    return out


DRIVERS = ["in-process", "flower", "secagg+"]


@pytest.mark.parametrize("scenario", ["honest", "reject", "dp-budget"])
def test_every_driver_gives_the_same_round_records(scenario, tiny_arch, data, tmp_path):
    results = {d: _drive(d, scenario, tiny_arch, data, tmp_path / d.replace("+", ""))
               for d in DRIVERS}
    reference = results["in-process"]
    noisy = scenario == "dp-budget"  # DP noise is secret: accuracies may differ
    expected = _rounds(reference, accuracies=not noisy)
    for driver, result in results.items():
        got = _rounds(result, accuracies=not noisy)
        if driver == "secagg+" and scenario == "reject":
            # SecAgg+ hides the individual updates: no distance rule can see alpha's
            # by name: its round 2 either averages alpha's far update (clipped to SecAgg+'s
            # range) or, when that mean sits at the edge of the range, refuses the round
            assert got[2]["rejected"] in ([], ["secure mean"])
            assert not got[1]["rejected"] and not got[3]["rejected"]
            assert [(r["round"], r["evaluated"]) for r in got] == \
                [(r["round"], r["evaluated"]) for r in expected]
            continue
        assert got == expected, driver
        assert result["best_round"] == reference["best_round"] or noisy, driver
        assert result["rounds"] == reference["rounds"], driver
    if scenario == "honest":
        sizes = sorted(c["train"] for c in reference["clients"])
        assert sizes[-1] > 2 * sizes[len(sizes) // 2]  # alpha's weight is capped: the cap binds
        evaluated = [r["evaluated"] for r in expected]
        assert evaluated == [True, False, True, True]  # round 0, eval_every=2, the last
        assert all(r["rejected"] == [] for r in expected)
        assert expected[1]["train_loss"].keys() == {"alpha", "beta", "gamma"}
        # the algorithm's round metrics, where the server sees each update (not SecAgg+)
        for driver in ("in-process", "flower"):
            assert [r.get("metrics") for r in results[driver]["history"]] == \
                [None, {"updates": 3.0}, {"updates": 3.0}, {"updates": 3.0}], driver
        assert all("metrics" not in r for r in results["secagg+"]["history"])
    if scenario == "reject":
        assert expected[2]["rejected"] == ["alpha"] and expected[1]["rejected"] == []
    if scenario == "dp-budget":
        assert reference["rounds"] < SCENARIOS[scenario]["rounds"]  # the budget ended it
        assert reference["privacy"]["epsilon"] <= 1.6 and reference["rounds"] == 2


def test_every_driver_refuses_a_non_finite_aggregate_the_same_way(tiny_arch, data, tmp_path):
    """The round is refused and recorded, the run stops with one line naming the round, the
    last good checkpoint is kept: in every runtime."""
    from safetensors import safe_open

    messages = {}
    for driver in DRIVERS:
        out = tmp_path / driver.replace("+", "")
        with pytest.raises(AggregateNotFinite) as info:
            _drive(driver, "nonfinite", tiny_arch, data, out)
        messages[driver] = str(info.value)
        assert "\n" not in messages[driver]
        assert not (out / "results.json").exists()
        lines = (out / "delta" / "history.jsonl").read_text().splitlines()
        refused = json.loads(lines[-1])
        assert refused["round"] == 2 and "aggregate" in refused["rejected"]
        with safe_open(str(out / "delta" / "checkpoint.safetensors"), "pt") as f:
            assert f.metadata()["round"] == "1"  # the last good round
    assert len(set(messages.values())) == 1, messages
    assert messages["in-process"].startswith("round 2: the aggregate is not finite")


def test_a_non_finite_aggregate_exits_2_on_the_command_line(tiny_arch, data, tmp_path, capsys):
    from fedclip.cli import main

    code = main(["run", "--data-root", str(data), "--backbone", tiny_arch, "--out",
                 str(tmp_path / "x"), "--heldout", "delta", "--algorithm", "scripted-test",
                 "--rounds", "3", "--set", "scripted-test.scenario=nonfinite",
                 "--set", "classes=['cat','dog','red_car']"])
    err = capsys.readouterr().err
    assert code == 2 and "round 2: the aggregate is not finite" in err
    assert "Traceback" not in err


def test_the_plan_is_one_rule_for_sampling_weights_and_evaluation():
    """Hand-computed: sizes 10, 30, 1000 -> cap 60; eval_every 3 with 7 rounds evaluates
    rounds 3, 6 and the last; clients_per_round=2 samples two, the same two for a seed."""
    from fedclip.algorithms import get_algorithm

    cfg = RunConfig.build(backbone="standin", heldout="d", classes=("x", "y"), rounds=7,
                          eval_every=3, clients_per_round=2)
    server = Server(get_algorithm(cfg), {"a": 10, "b": 30, "c": 1000})
    server.start(get_algorithm(cfg).init_global(4))
    plans = []
    while (plan := server.plan()) is not None:
        plans.append(plan)
        server.state.round = plan.round
    assert [p.round for p in plans if p.evaluated] == [3, 6, 7]
    assert all(len(p.clients) == 2 for p in plans) and plans[-1].last
    assert all(p.weight_cap == 60.0 for p in plans)
    assert all(w == min(n, 60.0) for p in plans for c, w in p.weights.items()
               for n in [{"a": 10, "b": 30, "c": 1000}[c]])
    again = Server(get_algorithm(cfg), {"a": 10, "b": 30, "c": 1000})
    again.start(get_algorithm(cfg).init_global(4))
    assert again.plan().clients == plans[0].clients


def test_every_client_diverging_stops_the_run(tiny_arch, data, tmp_path):
    from fedclip.core.server import DIVERGED

    cfg = RunConfig.build(backbone="standin", heldout="d", classes=("x", "y"))
    from fedclip.algorithms import get_algorithm

    server = Server(get_algorithm(cfg), {"a": 10, "b": 30})
    server.start(get_algorithm(cfg).init_global(4))
    plan = server.plan()
    with pytest.raises(TrainingError, match="diverged on every client .* round 1"):
        server.accept(plan, {}, rejected={"a": DIVERGED, "b": DIVERGED})


def test_echoing_clients_and_a_frozen_model_are_said_in_the_round_records():
    """Two clients that send the global parameters back: each round says they did not move
    it and that their updates are identical; after three such rounds, that the global model
    has stopped moving while clients report training."""
    from fedclip.algorithms import get_algorithm
    from fedclip.core.client import ClientUpdate

    cfg = RunConfig.build(backbone="standin", heldout="d", classes=("x", "y"), rounds=4,
                          norm_factor=0.0)
    algorithm = get_algorithm(cfg)
    server = Server(algorithm, {"a": 10, "b": 10})
    server.start(algorithm.init_global(4))
    records = []
    while (plan := server.plan()) is not None:
        echo = {k: v.clone() for k, v in algorithm.shared(server.state.params).items()}
        updates = {c: ClientUpdate(echo, {}, 10, 0.5) for c in plan.clients}
        records.append(server.complete(server.accept(plan, updates), None))
    assert any("did not move" in w for w in records[0].warnings)
    assert any("identical" in w for w in records[0].warnings) is False  # said once: echo
    assert not any("have not moved" in w for r in records[:2] for w in r.warnings)
    assert any("have not moved for 3 rounds" in w for w in records[2].warnings)


def test_the_result_states_one_clients_influence(tiny_arch, data, tmp_path):
    result = _drive("in-process", "honest", tiny_arch, data, tmp_path / "r")
    influence = result["influence"]
    assert influence["bound"] is None or influence["bound"] >= 1.0
    assert "tolerat" in influence["tolerance"]


def test_the_distance_rules_norm_is_the_float64_norm_within_rounding():
    """The distance rule's norm (float32, one pass) against DP's float64 norm: within 1e-5 on
    float32, float16 and integer tensors; 0 for an echo and equal for identical updates (the
    replay check compares only updates with equal distances)."""
    from fedclip.privacy import update_norm
    from fedclip.tensors import distance

    gen = torch.Generator().manual_seed(3)
    current = {"w": torch.randn(300, 200, generator=gen), "b": torch.randn(200, generator=gen),
               "n": torch.tensor([4, 7]), "h": torch.randn(64, generator=gen).half()}
    update = {"w": current["w"] + 1e-3 * torch.randn(300, 200, generator=gen),
              "b": current["b"] - 0.5, "n": torch.tensor([5, 9]),
              "h": current["h"] + torch.randn(64, generator=gen).half() * 0.01}
    exact = update_norm(update, current)
    assert distance(update, current) == pytest.approx(exact, rel=1e-5)
    assert exact > 7.0  # the integer tensor's (1, 2) and the bias's shift are counted
    assert distance(current, current) == 0.0
    copy = {k: v.clone() for k, v in update.items()}
    assert distance(copy, current) == distance(update, current)
    assert distance({"w": update["w"]}, current) == pytest.approx(
        update_norm({"w": update["w"]}, current), rel=1e-5)  # over the update's keys
    with pytest.raises(ValueError, match="shape"):  # a mismatch is never broadcast
        distance({"b": torch.zeros(1)}, current)


def test_finiteness_is_checked_by_sums_with_a_value_by_value_fallback():
    """``all_finite`` answers what ``isfinite`` on every value answers: large finite values
    whose sum overflows are finite; one NaN or inf anywhere (a complex one too) is not."""
    from fedclip.tensors import all_finite

    big = torch.full((4,), 3e38)  # its float32 sum overflows to inf; every value is finite
    assert all_finite({"a": big, "b": -big, "n": torch.tensor([1, 2])})
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.zeros(5, 5)
        w[3, 2] = bad
        assert not all_finite({"a": torch.ones(3), "w": w})
    z = torch.zeros(3, dtype=torch.complex64)
    z[1] = complex(0.0, float("inf"))
    assert not all_finite({"z": z})
    assert all_finite({}) and all_finite({"n": torch.tensor([7])})
