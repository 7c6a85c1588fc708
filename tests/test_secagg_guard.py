"""SecAgg+ that no client can crash: malformed stage replies sent through the real workflow
(Flower's SecAggPlusWorkflow stages, the real secaggplus_mod on every node) drop that client or
refuse the round, and the run ends with results; and each stage's check on its own."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedclip.flower.secagg_guard import (
    implausible_mean,
    masked_vector_problem,
    setup_problem,
    share_keys_problem,
    unmask_problem,
)
from tests.test_flower import _federation, _max_diff


def _stage_of(reply: Message) -> str | None:
    if reply.has_error() or RECORD_KEY_CONFIGS not in reply.content.config_records:
        return None
    keys = set(reply.content.config_records[RECORD_KEY_CONFIGS])
    for key, stage in ((Key.PUBLIC_KEY_1, "setup"), (Key.DESTINATION_LIST, "share_keys"),
                       (Key.MASKED_PARAMETERS, "collect"), (Key.NODE_ID_LIST, "unmask")):
        if key in keys:
            return stage
    return None


def _tamper(stage: str, change, nodes=(1000,), times: int = 1):  # noqa: ANN001, ANN202
    """A misbehaving client: ``change`` rewrites its reply to ``stage``, the first ``times``
    times (round 1 of a run)."""
    done: dict[int, int] = {}

    def tamper(node, reply):  # noqa: ANN001, ANN202
        if node in nodes and _stage_of(reply) == stage and done.get(node, 0) < times:
            done[node] = done.get(node, 0) + 1
            change(reply)
        return reply

    return tamper


def _configs(reply: Message) -> ConfigRecord:
    return reply.content.config_records[RECORD_KEY_CONFIGS]


def _secure_run(tmp_path, toy_root, tiny_arch, tamper, name="secure", rounds=2):  # noqa: ANN001, ANN202
    from flwr.app import Context
    from safetensors.torch import load_file

    from fedclip.flower import secagg
    from tests.flower_grid import LocalGrid

    run_config, nodes = _federation(toy_root, tiny_arch, tmp_path, rounds=rounds,
                                    aggregation="uniform", **{"secagg-max-weight": 1.0})
    run_config = {**run_config, "out": str(tmp_path / name)}
    grid = LocalGrid(secagg.build_client_app(), nodes, run_config, tamper=tamper)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=run_config)
    result = secagg.run(grid, context, run_config)
    return result, load_file(tmp_path / name / "gamma" / "adapter-last.safetensors")


def _rejected(result, server_round):  # noqa: ANN001, ANN202
    return next(r for r in result.history if r.round == server_round).rejected or {}


# --- through the real workflow -----------------------------------------------------------------
def test_an_empty_share_keys_reply_drops_that_client(tiny_arch, toy_root, tmp_path):
    """Flower's workflow raised KeyError: 'secaggplus_configs' here; now the client is dropped
    (one of three: within the threshold), round 1 aggregates the others, round 2 all."""
    def empty(reply: Message) -> None:
        reply.content = RecordDict()

    result, adapter = _secure_run(tmp_path, toy_root, tiny_arch, _tamper("share_keys", empty))
    assert [r.round for r in result.history] == [0, 1, 2]
    rejected = _rejected(result, 1)
    assert list(rejected) == ["alpha"], rejected
    assert rejected["alpha"] == "share_keys: no SecAgg+ record in its share_keys reply"
    assert _rejected(result, 2) == {}
    assert result.history[1].train_loss and "alpha" not in result.history[1].train_loss
    assert all(np.isfinite(v.numpy()).all() for v in adapter.values())
    # round 1 is the one honest training client's update, round 2 both: it trained
    clean, plain = _secure_run(tmp_path, toy_root, tiny_arch, None, name="clean")
    assert _max_diff(adapter, plain) > 1e-5


def test_garbage_masked_vectors_drop_that_client(tiny_arch, toy_root, tmp_path):
    """Garbage bytes where the masked vector goes (np.load raised ValueError in Flower's
    stage): dropped after the shares went out, so its masks are removed as for a drop-out."""
    def garbage(reply: Message) -> None:
        cfg = _configs(reply)
        cfg[Key.MASKED_PARAMETERS] = [b"garbage bytes"] * len(cfg[Key.MASKED_PARAMETERS])

    result, adapter = _secure_run(tmp_path, toy_root, tiny_arch, _tamper("collect", garbage))
    rejected = _rejected(result, 1)
    assert list(rejected) == ["alpha"]
    assert rejected["alpha"] == ("collect_masked_vectors: a masked array of bytes that are "
                                 "not an .npy array")
    assert "secure mean" not in rejected  # the others' masks came off: a plausible mean
    assert all(np.isfinite(v.numpy()).all() and np.abs(v.numpy()).max() < 8
               for v in adapter.values())


def test_a_masked_vector_declaring_a_huge_shape_is_dropped_from_its_header(
        tiny_arch, toy_root, tmp_path):
    def huge(reply: Message) -> None:
        cfg = _configs(reply)
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<i8", "fortran_order": False,
                                                      "shape": (10**12,)})
        cfg[Key.MASKED_PARAMETERS] = [header.getvalue() + b"\0" * 8] * len(
            cfg[Key.MASKED_PARAMETERS])

    result, _ = _secure_run(tmp_path, toy_root, tiny_arch, _tamper("collect", huge),
                            rounds=1)
    assert "of shape (1000000000000,), not (1,)" in _rejected(result, 1)["alpha"]


def test_a_wrong_key_share_refuses_the_round_and_the_run_goes_on(tiny_arch, toy_root, tmp_path):
    """A share of the right form but wrong content: no check can see it; the reconstruction
    fails or unmasks garbage, and either way round 1 is refused with its reason and the
    global parameters stay; round 2 runs."""
    def flip(reply: Message) -> None:
        cfg = _configs(reply)
        shares = list(cfg[Key.SHARE_LIST])
        shares[0] = shares[0][:4] + bytes(b ^ 0x5A for b in shares[0][4:])
        cfg[Key.SHARE_LIST] = shares

    result, _ = _secure_run(tmp_path, toy_root, tiny_arch, _tamper("unmask", flip))
    rejected = _rejected(result, 1)
    assert "secure aggregation" in rejected or "secure mean" in rejected, rejected
    why = rejected.get("secure aggregation") or rejected["secure mean"]
    assert "share" in why and "\n" not in why
    assert _rejected(result, 2) == {}
    assert [r.round for r in result.history] == [0, 1, 2]


def test_every_client_failing_a_stage_refuses_the_round_in_one_line(tiny_arch, toy_root,
                                                                     tmp_path):
    def empty(reply: Message) -> None:
        reply.content = RecordDict()

    result, _ = _secure_run(tmp_path, toy_root, tiny_arch,
                            _tamper("setup", empty, nodes=(1000, 1001, 1002)), rounds=1)
    rejected = _rejected(result, 1)
    assert rejected["secure aggregation"].startswith(
        "too few nodes answered its setup stage for SecAgg+'s reconstruction threshold (2)")
    assert {"alpha", "beta"} <= set(rejected)
    assert result.to_json()["rounds"] == 1  # the run ended with its results


# --- each stage's check ----------------------------------------------------------------------
def _reply(values: dict) -> Message:
    """A message holding ``values`` as its SecAgg+ record (what a stage's check reads)."""
    from flwr.app import MessageType
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as a SuperLink
    return Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(values)}), dst_node_id=7,
                   message_type=MessageType.TRAIN)


def test_setup_check():
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

    pk1 = public_key_to_bytes(generate_key_pairs()[1])
    pk2 = public_key_to_bytes(generate_key_pairs()[1])
    assert setup_problem(_reply({Key.PUBLIC_KEY_1: pk1, Key.PUBLIC_KEY_2: pk2})) is None
    assert "the same" in setup_problem(_reply({Key.PUBLIC_KEY_1: pk1, Key.PUBLIC_KEY_2: pk1}))
    assert "does not parse" in setup_problem(_reply({Key.PUBLIC_KEY_1: pk1,
                                                     Key.PUBLIC_KEY_2: b"junk"}))
    assert "list of bytes" in setup_problem(_reply({Key.PUBLIC_KEY_1: pk1}))
    assert "4096 bytes" in setup_problem(_reply({Key.PUBLIC_KEY_1: pk1,
                                                 Key.PUBLIC_KEY_2: b"x" * 5000}))


def test_share_keys_check():
    ok = {Key.DESTINATION_LIST: [1, 2], Key.CIPHERTEXT_LIST: [b"a", b"b"]}
    assert share_keys_problem(_reply(ok), {1, 2}) is None
    assert "not the neighbours" in share_keys_problem(_reply(ok), {1, 3})
    assert "twice" in share_keys_problem(_reply({**ok, Key.DESTINATION_LIST: [1, 1]}), {1})
    assert "2 destinations for 1" in share_keys_problem(
        _reply({**ok, Key.CIPHERTEXT_LIST: [b"a"]}), {1, 2})
    assert "node ids" in share_keys_problem(_reply({**ok, Key.DESTINATION_LIST: ["1"]}), {1})


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def test_masked_vector_check():
    from flwr.common import FitRes, Status, ndarrays_to_parameters
    from flwr.common.typing import Code
    from flwr.compat.common import recorddict_compat as compat

    shapes = [(1,), (2, 3)]
    content = compat.fitres_to_recorddict(
        FitRes(Status(Code.OK, ""), ndarrays_to_parameters([]), 5, {}), keep_input=True)

    def reply(blobs: list[bytes]) -> Message:
        msg = _reply({})
        for name, record in content.config_records.items():
            msg.content.config_records[name] = record
        for name, record in content.metric_records.items():
            msg.content.metric_records[name] = record
        for name, record in content.array_records.items():
            msg.content.array_records[name] = record
        msg.content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(
            {Key.MASKED_PARAMETERS: blobs})
        return msg

    good = [_npy(np.array([3])), _npy(np.arange(6).reshape(2, 3))]
    assert masked_vector_problem(reply(good), shapes, 2**32) is None
    assert "not (2, 3)" in masked_vector_problem(
        reply([good[0], _npy(np.arange(6))]), shapes, 2**32)
    assert "float64, not integers" in masked_vector_problem(
        reply([good[0], _npy(np.zeros((2, 3)))]), shapes, 2**32)
    assert "outside [0, 4)" in masked_vector_problem(reply(good), shapes, 4)
    assert "do not match its header" in masked_vector_problem(
        reply([good[0], good[1][:-8]]), shapes, 2**32)
    assert "1 masked arrays, not 2" in masked_vector_problem(reply(good[:1]), shapes, 2**32)
    assert "not an .npy array" in masked_vector_problem(
        reply([b"garbage", good[1]]), shapes, 2**32)


def test_unmask_check():
    share = b"\1\0\0\0" + b"s" * 16
    ok = {Key.NODE_ID_LIST: [1, 2], Key.SHARE_LIST: [share, share]}
    assert unmask_problem(_reply(ok), {1, 2}) is None
    assert "asked about" in unmask_problem(_reply(ok), {1, 2, 3})
    assert "4 + 16k" in unmask_problem(_reply({**ok, Key.SHARE_LIST: [share, b"abc"]}),
                                       {1, 2})


@pytest.mark.parametrize(("values", "bad"), [
    ([np.full(3, 7.9), np.array([-8.0])], False),
    ([np.full(3, 1e4)], True),
    ([np.array([np.nan])], True),
])
def test_implausible_mean(values, bad):
    assert (implausible_mean(values, 8.0) is not None) == bad
