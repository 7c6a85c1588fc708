"""The Flower strategy's rules on hand-built replies (Flower's own test pattern): build the
``Message`` replies a round could bring, call ``aggregate_train``, compare with a result
computed by hand. Honest, lying, malformed and duplicated replies."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedclip.algorithms import get_algorithm
from fedclip.algorithms.base import Runtime
from fedclip.config import RunConfig
from fedclip.core.server import Server
from fedclip.flower.codec import encode
from fedclip.flower.discovery import NodeInfo
from fedclip.flower.strategy import FedClipStrategy

DIM = 4
TRAIN = {1: ("a", 10), 2: ("b", 30), 3: ("c", 20)}  # node id -> (client, declared train size)


@pytest.fixture(autouse=True)
def _as_a_superlink():
    """Messages are built as a SuperLink builds them (its run and task identity)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class Grid:
    """What ``configure_train`` asks of a grid: which nodes are connected."""

    def get_node_ids(self) -> list[int]:
        return [*TRAIN, 9]


def _strategy(aggregation: str = "weighted", norm_factor: float = 0.0, **settings
              ) -> FedClipStrategy:
    cfg = RunConfig.build(backbone="standin", heldout="d", classes=("x", "y"),
                          aggregation=aggregation, norm_factor=norm_factor, **settings)
    algorithm = get_algorithm(cfg, Runtime(num_clients=len(TRAIN)))
    nodes = {n: NodeInfo(n, c, "train", c, 0, size, 5, 5, size + 10, DIM, 100.0)
             for n, (c, size) in TRAIN.items()}
    nodes[9] = NodeInfo(9, "d", "heldout", "d", 0, 0, 0, 40, 40, DIM, 100.0)
    init = algorithm.init_global(DIM)
    assert init is not None
    server = Server(algorithm, {c: size for c, size in TRAIN.values()})
    server.start(init)
    strategy = FedClipStrategy(server, nodes)
    list(strategy.configure_train(1, encode(init), ConfigRecord(), Grid()))
    return strategy


def _params(strategy: FedClipStrategy, value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in strategy.state.params.items()}


def _reply(node: int, params: dict[str, torch.Tensor] | None, num_examples: float,
           loss: float = 0.5) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                          dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict({"metrics": MetricRecord({"num-examples": num_examples,
                                                   "train-loss": loss, "steps": 1})})
    if params is not None:
        content["arrays"] = encode(params)
    reply = Message(content, reply_to=instruction)
    return reply


def test_honest_replies_are_weighted_by_their_declared_sizes():
    s = _strategy()
    arrays, metrics = s.aggregate_train(1, [_reply(1, _params(s, 1.0), 10),
                                            _reply(2, _params(s, 2.0), 30),
                                            _reply(3, _params(s, 4.0), 20)])
    expected = (10 * 1.0 + 30 * 2.0 + 20 * 4.0) / 60  # by hand
    assert arrays is not None and metrics is not None
    for value in arrays.to_torch_state_dict().values():
        assert torch.allclose(value, torch.full_like(value, expected))
    assert metrics["num-updates"] == 3
    assert not s.pending.record.rejected


def test_uniform_ignores_the_sizes():
    s = _strategy("uniform")
    arrays, _ = s.aggregate_train(1, [_reply(1, _params(s, 1.0), 10),
                                      _reply(2, _params(s, 2.0), 30)])
    assert arrays is not None
    assert all(torch.allclose(v, torch.full_like(v, 1.5))
               for v in arrays.to_torch_state_dict().values())


@pytest.mark.parametrize(("make", "why"), [
    (lambda s: _reply(1, _params(s, 9.0), 10_000), "declared at discovery"),  # a lying size
    (lambda s: _reply(1, _params(s, 9.0), 10, loss=float("nan")), "train-loss"),
    (lambda s: _reply(1, None, 10), "no arrays"),
    (lambda s: _reply(1, {k: v[..., :1] for k, v in _params(s, 9.0).items()}, 10), "shape"),
    (lambda s: _reply(1, _params(s, float("inf")), 10), "NaN or inf"),
    (lambda s: _reply(9, _params(s, 9.0), 0), "not a training node"),  # the held-out node
    (lambda s: _reply(77, _params(s, 9.0), 10), "not a training node"),  # an unknown node
])
def test_a_bad_reply_is_rejected_and_the_rest_aggregate(make, why):
    s = _strategy()
    bad = make(s)
    arrays, _ = s.aggregate_train(1, [bad, _reply(2, _params(s, 2.0), 30),
                                      _reply(3, _params(s, 4.0), 20)])
    expected = (30 * 2.0 + 20 * 4.0) / 50  # the bad reply counts for nothing
    assert arrays is not None
    assert all(torch.allclose(v, torch.full_like(v, expected))
               for v in arrays.to_torch_state_dict().values())
    assert any(why in reason for reason in s.pending.record.rejected.values())


def test_an_error_reply_is_recorded_not_raised():
    s = _strategy()
    instruction = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    from flwr.app import Error

    error = Message(Error(code=0, reason="boom"), reply_to=instruction)
    arrays, _ = s.aggregate_train(1, [error, _reply(2, _params(s, 2.0), 30)])
    assert arrays is not None and "boom" in s.pending.record.rejected["a"]


def test_a_node_that_answers_twice_counts_for_nothing():
    """One reply per node per round: a node that sends two cannot choose which one counts,
    and the record says that neither did."""
    s = _strategy()
    arrays, _ = s.aggregate_train(1, [_reply(1, _params(s, 1.0), 10),
                                      _reply(1, _params(s, 100.0), 10),
                                      _reply(2, _params(s, 2.0), 30)])
    assert arrays is not None
    assert all(torch.allclose(v, torch.full_like(v, 2.0))
               for v in arrays.to_torch_state_dict().values())
    assert "twice" in s.pending.record.rejected["a"]
    assert set(s.pending.record.train_loss) == {"b"}


def test_no_valid_reply_leaves_the_global_parameters_unchanged():
    s = _strategy()
    before = {k: v.clone() for k, v in s.state.params.items()}
    arrays, metrics = s.aggregate_train(1, [_reply(1, None, 10)])
    assert arrays is None and metrics is None
    assert all(torch.equal(before[k], s.state.params[k]) for k in before)


def _moved(s: FedClipStrategy, node: int, fraction: float) -> dict[str, torch.Tensor]:
    """The global parameters moved by ``fraction`` x the most node's local steps move."""
    from fedclip.core.client import RoundConfig

    x = s.algorithm.shared(s.state.params)
    unit = s.algorithm.server.update_bound(x, TRAIN[node][1], s.algorithm.round_config(1))
    assert isinstance(unit, float) and isinstance(s.algorithm.round_config(1), RoundConfig)
    size = sum(v.numel() for v in x.values())
    return {k: v + fraction * unit / size ** 0.5 for k, v in x.items()}  # norm: fraction x unit


def test_the_distance_rule_rejects_a_far_update():
    s = _strategy(norm_factor=10.0)
    far = {k: v + 1e4 for k, v in s.state.params.items()}
    arrays, _ = s.aggregate_train(1, [_reply(1, far, 10), _reply(2, _moved(s, 2, 0.5), 30),
                                      _reply(3, _moved(s, 3, 0.8), 20)])
    assert arrays is not None and "the most its local steps move" in \
        s.pending.record.rejected["a"]
    assert set(s.pending.record.train_loss) == {"b", "c"}


def test_the_ceiling_does_not_grow_with_the_global_parameters():
    """With two clients a round there is no median; the ceiling is what K Adam steps of the
    round's lr move, so an attacker who grew the global parameters (here to a norm of 1e6)
    still cannot move them by 9x their norm, which the old rule (10 x the norm) allowed."""
    s = _strategy(norm_factor=10.0)
    s.state.global_params = {k: v * 1e6 for k, v in s.state.params.items()}
    flipped = {k: -8.0 * v for k, v in s.state.params.items()}  # 9 x the norm away
    s.aggregate_train(1, [_reply(1, flipped, 10), _reply(2, _moved(s, 2, 0.9), 30)])
    assert "the most its local steps move" in s.pending.record.rejected["a"]
    assert set(s.pending.record.train_loss) == {"b"}


def test_colluders_echoing_the_global_parameters_cannot_exclude_an_honest_update():
    """Two nodes send the global parameters back unchanged: the round's median distance is
    0, but the median rule is floored at the honest client's own bound, so its update counts."""
    s = _strategy(norm_factor=10.0)
    echo = dict(s.algorithm.shared(s.state.params))
    s.aggregate_train(1, [_reply(1, echo, 10), _reply(2, _moved(s, 2, 0.9), 30),
                          _reply(3, echo, 20)])
    assert not s.pending.record.rejected


def test_one_declared_size_cannot_own_the_average():
    """A node that declared 10^9 training examples at discovery weighs at most
    max_weight_ratio (2) x the median declared size; the aggregate is computed by hand."""
    global TRAIN
    saved, TRAIN = TRAIN, {1: ("a", 10**9), 2: ("b", 30), 3: ("c", 20)}
    try:
        s = _strategy()
        arrays, _ = s.aggregate_train(1, [_reply(1, _params(s, 9.0), 10**9),
                                          _reply(2, _params(s, 1.0), 30),
                                          _reply(3, _params(s, 1.0), 20)])
    finally:
        TRAIN = saved
    cap = 2 * 30  # 2 x the median of (10^9, 30, 20)
    expected = (cap * 9.0 + 30 * 1.0 + 20 * 1.0) / (cap + 50)
    assert arrays is not None
    assert all(torch.allclose(v, torch.full_like(v, expected))
               for v in arrays.to_torch_state_dict().values())


def test_an_array_record_with_extra_arrays_is_rejected():
    s = _strategy()
    params = {**_params(s, 1.0), "extra": torch.zeros(3)}
    reply = _reply(1, None, 10)
    reply.content["arrays"] = ArrayRecord({k: v.contiguous() for k, v in params.items()})
    s.aggregate_train(1, [reply, _reply(2, _params(s, 2.0), 30)])
    assert "keys" in s.pending.record.rejected["a"]


# --- what a reply's bytes may claim -----------------------------------------------------------
def _forged(strategy: FedClipStrategy, **fields) -> Message:
    """A reply whose first array declares ``fields`` (shape, dtype, stype, data) over its bytes."""
    from flwr.app import Array

    reply = _reply(1, _params(strategy, 1.0), 10)
    arrays = reply.content["arrays"]
    key = next(iter(arrays))
    real = arrays[key]
    values = {"dtype": real.dtype, "shape": tuple(real.shape), "stype": real.stype,
              "data": real.data, **fields}
    arrays[key] = Array(**values)
    return reply


@pytest.mark.parametrize(("fields", "why"), [
    ({"shape": (10**9,), "data": b"12345678"}, "has shape"),  # a billion elements over 8 bytes
    ({"data": b"\x93NUMPY" + b"\x00" * 10}, "bytes, not the"),  # too few bytes for its shape
    ({"data": b"\x00" * (1 << 20)}, "bytes, not the"),  # far more bytes than its shape needs
    ({"dtype": "object"}, "transfers fp32"),
    ({"stype": "pickle"}, "transfers fp32"),
])
def test_an_array_is_judged_by_its_declared_metadata_before_any_decoding(fields, why,
                                                                         monkeypatch):
    """A reply that declares a shape its bytes do not hold is rejected from its metadata:
    nothing is decoded (a decode would allocate the declared size, or fail deep inside)."""
    from flwr.app import Array

    s = _strategy()
    forged = _forged(s, **fields)

    def no_decoding(self):  # noqa: ANN001, ANN202
        raise AssertionError("decoded an array that was not checked")

    honest = [_reply(2, _params(s, 2.0), 30), _reply(3, _params(s, 4.0), 20)]
    monkeypatch.setattr(Array, "numpy", no_decoding)
    s._check(forged, s.pending.plan)  # rejected without decoding
    assert why in s._check(forged, s.pending.plan)[2]
    monkeypatch.undo()
    arrays, _ = s.aggregate_train(1, [forged, *honest])
    assert arrays is not None and why in s.pending.record.rejected["a"]
    assert s.pending.record.bytes_received < (1 << 20) + 10_000  # counted, not decoded


def test_a_discovery_reply_without_its_task_names_the_node():
    from fedclip.flower.discovery import node_info as _node_info

    content = RecordDict({"node": ConfigRecord({"client": "a", "role": "train", "domain": "a"}),
                          "metrics": MetricRecord({"client-index": 0, "num-train": 3,
                                                   "num-val": 1, "num-test": 1, "images": 5,
                                                   "dim": 4, "logit-scale": 100.0})})
    with pytest.raises(KeyError, match="task"):
        _node_info(1, content)
    content["node"]["task"] = "x" * 10_000  # bounded, not only present
    with pytest.raises(ValueError, match="task"):
        _node_info(1, content)


# --- SCAFFOLD's control variates are bounded like parameters ---------------------------------
def _scaffold() -> FedClipStrategy:
    return _strategy(norm_factor=10.0, algorithm="scaffold", batch_size=4)


def _scaffold_reply(s: FedClipStrategy, node: int, shift: float, steps: int,
                    scale_dc: float = 1.0) -> Message:
    """An honest SCAFFOLD reply computed by hand: y = x + shift, dc = -c + (x - y)/(K lr)."""
    x = s.state.params
    y = {k: v + shift for k, v in s.algorithm.shared(x).items()}
    lr = s.algorithm.round_config(1).lr
    dc = {f"dc/{k}": scale_dc * (-s.state.server_state[f"c/{k}"] + (x[k] - y[k]) / (steps * lr))
          for k in y}
    reply = _reply(node, y, TRAIN[node][1])
    reply.content["metrics"]["steps"] = steps
    reply.content["extras"] = encode(dc)
    return reply


def test_honest_control_variates_pass_and_a_huge_one_is_rejected():
    s = _scaffold()
    steps = {1: 3, 2: 8, 3: 5}  # ceil(size / batch 4) batches of one local epoch
    honest = [_scaffold_reply(s, n, 1e-4 * n, steps[n]) for n in (2, 3)]
    huge = _scaffold_reply(s, 1, 1e-4, steps[1], scale_dc=1e35)  # far past what it implies
    s.aggregate_train(1, [huge, *honest])
    record = s.pending.record
    assert set(record.train_loss) == {"b", "c"}
    assert "control variate" in record.rejected["a"]
    assert all(float(v.abs().max()) < 1e6 for v in s.state.server_state.values())


def test_a_reply_that_misreports_its_local_steps_is_rejected():
    s = _scaffold()
    s.aggregate_train(1, [_scaffold_reply(s, 1, 1e-4, 1), _scaffold_reply(s, 2, 1e-4, 8)])
    assert "local steps" in s.pending.record.rejected["a"]


def test_every_client_diverging_fails_the_round():
    from fedclip.errors import TrainingError

    s = _strategy()
    replies = []
    for node in (1, 2):
        reply = _reply(node, None, TRAIN[node][1])
        reply.content["metrics"] = MetricRecord({"diverged": 1})
        replies.append(reply)
    with pytest.raises(TrainingError, match="diverged on every client"):
        s.aggregate_train(1, replies)
    s = _strategy()  # one diverging client among honest ones: recorded, the rest aggregate
    arrays, _ = s.aggregate_train(1, [replies[0], _reply(2, _params(s, 2.0), 30)])
    assert arrays is not None and "diverged" in s.pending.record.rejected["a"]
