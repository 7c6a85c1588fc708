"""Robust aggregation (Krum, Multi-Krum, Bulyan from Flower; median, trimmed mean) against
hand computations, in both runtimes, and the best-round rule against a lying val accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedclip.aggregation import TooFewUpdates, combine
from fedclip.algorithms import get_algorithm
from fedclip.config import RunConfig
from fedclip.core.records import RoundRecord
from fedclip.core.server import Server, selection_rule, server_rules
from fedclip.core.state import FederationState
from fedclip.errors import ConfigError
from fedclip.flower.codec import encode
from fedclip.flower.discovery import NodeInfo
from fedclip.flower.strategy import FedClipStrategy
from tests.test_federation import (
    adapter,
    flower_config,
    in_process,
    max_diff,
    own_sites,
    pacs_like,  # noqa: F401  (a fixture)
    server_main,
)


def _points(*values: float) -> list[dict[str, torch.Tensor]]:
    """One-coordinate "updates" (a second key checks that keys travel together)."""
    return [{"w": torch.tensor([float(v)]), "b": torch.tensor([2.0 * v])} for v in values]


# --- each rule by hand ----------------------------------------------------------------------
def test_krum_picks_the_update_with_the_closest_neighbours():
    # n=5, f=1 (at its bound 2f+3): each score sums the squared distances to the n-f-2 = 2
    # nearest others. 0: 1+9=10; 1: 1+4=5; 3: 4+2.25=6.25; 4.5: 2.25+12.25=14.5; 100: huge.
    out = combine(_points(0, 1, 3, 4.5, 100), [1] * 5, "krum", byzantine=1)
    assert out["w"].item() == 1.0 and out["b"].item() == 2.0


def test_krum_breaks_a_tie_by_client_order():
    # 1 and 2 both score 1+1 = 2 (n=5, f=1): the first in the (sorted) client order wins
    assert combine(_points(0, 1, 2, 3, 100), [1] * 5, "krum", byzantine=1)["w"].item() == 1.0


def test_multikrum_averages_the_best_scored_updates_by_their_weights():
    points, weights = _points(0, 1, 3, 4.5, 100), [1, 2, 1, 1, 1]
    # m=3: scores order 1 (5), 3 (6.25), 0 (10); weighted (0*1 + 1*2 + 3*1) / 4
    assert combine(points, weights, "multikrum", byzantine=1, keep=3)["w"].item() == 1.25
    # m = n - f = 4 by default: 4.5 (14.5) joins: (0 + 2 + 3 + 4.5) / 5
    assert combine(points, weights, "multikrum", byzantine=1)["w"].item() == \
        pytest.approx(1.9, abs=1e-6)


def test_bulyan_selects_by_krum_then_averages_the_values_nearest_the_median():
    # n=7, f=1 (at its bound 4f+3): Krum picks theta = n-2f = 5 updates one after another:
    # 2 (score 10, first of a tie with 3), then 3, 1, 4, 0; their median is 2 and the
    # beta = theta-2f = 3 values nearest it are 1, 2, 3: the mean is 2. The outlier never counts.
    out = combine(_points(0, 1, 2, 3, 4, 5, 100), [1] * 7, "bulyan", byzantine=1)
    assert out["w"].item() == 2.0 and out["b"].item() == 4.0


def test_multikrum_weighs_clients_by_their_capped_sizes_and_krum_does_not():
    from fedclip.core.client import client_weights

    sizes = {"a": 10, "b": 30, "c": 20, "d": 10**9}
    capped = client_weights(sizes, RunConfig.build(aggregation="multikrum"))
    assert capped == {"a": 10.0, "b": 30.0, "c": 20.0, "d": 50.0}  # 2 x the median 25
    assert set(client_weights(sizes, RunConfig.build(aggregation="krum")).values()) == {1.0}


@pytest.mark.parametrize(("mode", "n"), [("krum", 4), ("multikrum", 4), ("bulyan", 6)])
def test_fewer_updates_than_the_rule_assumes_are_refused(mode, n):
    with pytest.raises(TooFewUpdates, match="needs at least"):
        combine(_points(*range(n)), [1] * n, mode, byzantine=1)


def test_the_hand_written_median_and_trimmed_mean_equal_flowers():
    from flwr.server.strategy import aggregate as fl

    rng = np.random.default_rng(0)
    for n in (3, 4, 7):
        params = [{"w": torch.from_numpy(rng.normal(size=(5, 6)).astype(np.float32))}
                  for _ in range(n)]
        arrays = [([p["w"].numpy()], 1) for p in params]
        assert np.array_equal(combine(params, [1] * n, "median")["w"].numpy(),
                              fl.aggregate_median(arrays)[0].astype(np.float32))
        assert np.allclose(combine(params, [1] * n, "trimmed-mean", trim=0.25)["w"].numpy(),
                           fl.aggregate_trimmed_avg(arrays, 0.25)[0], rtol=0, atol=1e-7)


# --- on the Flower strategy: the same rules on replies, and one attacker -------------------
DIM = 4
N_TRAIN = 7


@pytest.fixture(autouse=True)
def _as_a_superlink():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class Grid:
    def get_node_ids(self) -> list[int]:
        return [*range(1, N_TRAIN + 1), 99]


def _strategy(aggregation: str, **settings) -> FedClipStrategy:
    cfg = RunConfig.build(backbone="standin", heldout="d", classes=("x", "y"),
                          aggregation=aggregation, **{"norm_factor": 10.0, **settings})
    algorithm = get_algorithm(cfg)
    nodes = {n: NodeInfo(n, f"c{n}", "train", f"c{n}", 0, 20, 5, 5, 30, DIM, 100.0)
             for n in range(1, N_TRAIN + 1)}
    nodes[99] = NodeInfo(99, "d", "heldout", "d", 0, 0, 0, 40, 40, DIM, 100.0)
    init = algorithm.init_global(DIM)
    assert init is not None
    server = Server(algorithm, {f"c{n}": 20 for n in range(1, N_TRAIN + 1)})
    server.start(init)
    strategy = FedClipStrategy(server, nodes)
    list(strategy.configure_train(1, encode(init), ConfigRecord(), Grid()))
    return strategy


def _reply(node: int, params: dict[str, torch.Tensor]) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                          dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": encode(params),
                          "metrics": MetricRecord({"num-examples": 20, "train-loss": 0.5,
                                                   "steps": 1})})
    return Message(content, reply_to=instruction)


def _norm(params: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in params.values())))


def _attack(aggregation: str, **settings) -> tuple[float, float, dict[str, str]]:
    """Six honest clients move about r along one direction (plus noise); one sends the
    honest direction flipped and x9, just under the distance rule (9 r < norm-factor 10 x the
    median r, and under the ceiling). Returns (how far the aggregate lands from the honest
    mean, the bound a robust rule keeps: the honest updates' own spread, rejections)."""
    s = _strategy(aggregation, **settings)
    init = s.state.params
    gen = torch.Generator().manual_seed(0)
    direction = {k: torch.randn(v.shape, generator=gen) for k, v in init.items()}
    scale = 1e-4 / _norm(direction)
    honest = [{k: direction[k] * scale + 1e-6 * torch.randn(v.shape, generator=gen)
               for k, v in init.items()} for _ in range(N_TRAIN - 1)]
    attacker = {k: -9 * direction[k] * scale for k in init}
    replies = [_reply(n + 1, {k: init[k] + d[k] for k in init})
               for n, d in enumerate([*honest, attacker])]
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is not None
    record = s.pending.record
    mean = {k: sum(d[k] for d in honest) / len(honest) for k in init}
    landed = _norm({k: s.state.params[k] - init[k] - mean[k] for k in init})
    # coordinate-wise: no honest-range rule can leave the box of the honest values
    spread = _norm({k: torch.stack([d[k] - mean[k] for d in honest]).abs().amax(0)
                    for k in init})
    return landed, spread, record.rejected or {}


def test_an_attacker_under_the_distance_rule_owns_the_weighted_mean_not_krum_or_bulyan():
    landed, spread, rejected = _attack("weighted")
    assert not rejected  # the distance rule lets it through...
    # ...and drags the mean farther from the honest one (about 10/7 r) than an honest step
    # (r = 1e-4) moves, 15x the honest updates' spread
    assert landed > 1e-4 and landed > 10 * spread
    for mode in ("krum", "multikrum", "bulyan"):
        landed, spread, rejected = _attack(mode, byzantine=1)
        assert not rejected
        assert landed <= spread + 1e-9, mode  # within the honest updates' own spread


def test_flower_krum_equals_the_hand_rule_on_replies():
    # the distance rule would reject 100 first: switch it off, Krum alone must drop it
    s = _strategy("krum", byzantine=1, norm_factor=0.0)
    init = s.state.params
    values = [0.0, 1.0, 3.0, 4.5, 100.0, 2.0, 2.5]
    updates = [{k: init[k] + v * 1e-4 for k in init} for v in values]
    s.aggregate_train(1, [_reply(n + 1, u) for n, u in enumerate(updates)])
    expected = combine(updates, [1.0] * len(updates), "krum", byzantine=1)
    assert max_diff(s.state.params, expected) == 0.0


def test_rules_that_cannot_apply_are_refused_before_a_round():
    scaffold = RunConfig.build(algorithm="scaffold", aggregation="krum")
    with pytest.raises(ConfigError, match="control variates"):
        server_rules(scaffold, get_algorithm(scaffold), 5)
    few = RunConfig.build(aggregation="bulyan", byzantine=1)
    with pytest.raises(ConfigError, match="needs at least 7 updates a round, but 3"):
        server_rules(few, get_algorithm(few), 3)
    sampled = RunConfig.build(aggregation="krum", byzantine=1, clients_per_round=4)
    with pytest.raises(ConfigError, match="needs at least 5"):
        server_rules(sampled, get_algorithm(sampled), 40)


def test_without_flower_installed_krum_is_refused_in_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "flwr.server.strategy", None)  # import fails
    cfg = RunConfig.build(aggregation="krum")
    with pytest.raises(ConfigError, match=r"install the flower extra \(pip install"):
        server_rules(cfg, get_algorithm(cfg), 3)


@pytest.mark.parametrize("mode", ["krum", "multikrum", "bulyan"])
def test_flower_equals_in_process_with_each_selecting_rule(tiny_arch, pacs_like, tmp_path,  # noqa: F811
                                                           mode):
    from fedclip.flower.client_app import build_client_app
    from tests.flower_grid import LocalGrid

    nodes = own_sites(pacs_like, tmp_path)
    run_config = flower_config(tiny_arch, tmp_path, aggregation=mode, rounds=2)
    flower = server_main(LocalGrid(build_client_app(), nodes, run_config), run_config)
    local = in_process(tiny_arch, pacs_like, tmp_path, aggregation=mode, rounds=2)
    assert max_diff(adapter(tmp_path / "flower/sketch/adapter-last.safetensors"),
                    adapter(tmp_path / "local/sketch/adapter-last.safetensors")) < 1e-5
    assert flower["best_round"] == local["best_round"]
    assert flower["selection"] == local["selection"] == "median of the clients' val accuracies"


# --- the best round against a lying val accuracy ---------------------------------------------
def _rounds(liar: bool) -> list[RoundRecord]:
    records = []
    for r in range(9):
        honest = 0.5 + 0.04 * r  # both honest clients improve every round
        lie = (1.0 if r == 1 else 0.0) if liar else honest
        record = RoundRecord(r)
        record.set_evaluation({"a": honest, "b": honest + 0.01, "liar": lie},
                              {"a": 0.5, "b": 0.5, "liar": 0.5}, None)
        records.append(record)
    return records


def _selected(records: list[RoundRecord], rule: str) -> int:
    state = FederationState(0, None)
    for record in records:
        state.select(record, rule)
    return state.best_round


def test_one_lying_node_moves_the_mean_rule_but_not_the_median_rule():
    assert _selected(_rounds(liar=False), "mean") == 8
    assert _selected(_rounds(liar=True), "mean") == 1  # the attack, on the mean
    assert _selected(_rounds(liar=True), "median") == 8
    # the guarantee: with one liar among three, each round's median lies between the two
    # honest values, so a round every honest node rates lower cannot win
    for record in _rounds(liar=True):
        honest = [record.val_accuracy["a"], record.val_accuracy["b"]]
        assert min(honest) <= record.val_score("median") <= max(honest)


def test_robust_aggregators_select_by_the_median():
    assert selection_rule(RunConfig.build(aggregation="weighted")) == "mean"
    for mode in ("median", "trimmed-mean", "krum", "multikrum", "bulyan"):
        assert selection_rule(RunConfig.build(aggregation=mode)) == "median"


def test_as_written_results_name_the_selection_rule(tiny_arch, pacs_like, tmp_path):  # noqa: F811
    result = in_process(tiny_arch, pacs_like, tmp_path, aggregation="median", rounds=1)
    assert result["selection"] == "median of the clients' val accuracies"
