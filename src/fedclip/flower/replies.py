"""Replies into records: a train reply through the transport's checks, and evaluation and
personalization replies, with one parser for both Flower paths (the message-API strategy and
the SecAgg+ legacy workflow).

A reply is judged by the role the server fixed for its node (never by what it says): val and
test accuracies count only from a training node, the held-out accuracy only from the
held-out node, each a finite number in [0, 1]; anything else is ignored (and logged).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MessageType
from flwr.common import EvaluateIns, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
from flwr.serverapp import Grid

from fedclip.core.client import ClientUpdate
from fedclip.core.records import Personalized
from fedclip.core.server import DIVERGED, Evaluation, RoundPlan
from fedclip.flower.codec import check_arrays, finite_number, payload_bytes
from fedclip.flower.discovery import NodeInfo
from fedclip.tensors import Params

log = logging.getLogger(__name__)
Reply = tuple[str, str, Mapping[str, Any]]  # (client, role, metrics), role fixed by the server


def evaluation_of(replies: Iterable[Reply], prefix: str = "") -> Evaluation:
    """(val, test, held-out) accuracies from evaluation replies (``prefix``: "zeroshot-" for
    the zero-shot scores sent in the same reply)."""
    val: dict[str, float] = {}
    test: dict[str, float] = {}
    heldout = None
    for client, role, metrics in replies:
        keys = ((f"{prefix}val-accuracy", f"{prefix}test-accuracy") if role == "train"
                else (f"{prefix}heldout-accuracy",))
        values = [v for k in keys if (v := finite_number(metrics.get(k), 0.0, 1.0)) is not None]
        if len(values) != len(keys):
            log.warning("ignored the evaluation of %s: %s must be numbers in [0, 1]", client,
                        ", ".join(keys))
            continue
        if role == "train":
            val[client], test[client] = values
        else:
            heldout = values[0]
    return val, test, heldout


def no_zero_shot(clients: Iterable[str]) -> Evaluation:
    """The zero-shot evaluation of an algorithm without a zero-shot classifier (its inputs
    never meet the class prompts: a CNN on pixels): NaN for every training client and the
    held-out domain, as in-process (nothing is asked of the nodes)."""
    nan = float("nan")
    return {c: nan for c in clients}, {c: nan for c in clients}, nan


def personalized_of(replies: Iterable[Reply], epochs: int) -> Personalized:
    """Each training node's personalized test accuracy and chosen epoch (in [0, epochs]); a
    reply without both counts as no answer."""
    per_client: dict[str, float] = {}
    chosen: dict[str, int] = {}
    for client, role, metrics in replies:
        acc = finite_number(metrics.get("personalized-accuracy"), 0.0, 1.0)
        epoch = finite_number(metrics.get("personalized-epoch"), 0, epochs)
        if role == "train" and acc is not None and epoch is not None:
            per_client[client], chosen[client] = acc, int(epoch)
    return Personalized(per_client, chosen)


def train_update(msg: Message, nodes: Mapping[int, NodeInfo], plan: RoundPlan, algorithm: Any,
                 current: Params, transfer: str
                 ) -> tuple[str, ClientUpdate | None, str | None, int]:
    """(client, update or None, why rejected, bytes received) for one train reply: what
    the transport can tell (who sent it, its arrays and numbers); the server's own rules
    come after (:meth:`Server.accept`)."""
    info = nodes.get(msg.metadata.src_node_id)
    if info is None or info.role != "train" or info.client not in plan.clients:
        who = info.client if info else f"unknown node {msg.metadata.src_node_id}"
        return who, None, "not a training node sampled for this round", 0
    if msg.has_error():
        return info.client, None, f"error reply: {msg.error.reason}", 0
    content = msg.content
    if "metrics" in content.metric_records and \
            content.metric_records["metrics"].get("diverged") == 1:
        return info.client, None, DIVERGED, 0
    if "arrays" not in content.array_records or "metrics" not in content.metric_records:
        return info.client, None, "malformed reply (no arrays or no metrics)", 0
    received = sum(payload_bytes(r) for r in content.array_records.values())
    shapes = algorithm.reply_shapes(current, info.client)
    params, why = check_arrays(content.array_records["arrays"], shapes, transfer)
    if params is None:
        return info.client, None, why, received
    declared = algorithm.reply_extras(current)
    extras: dict[str, torch.Tensor] = {}
    if declared or "extras" in content.array_records:
        got = content.array_records.get("extras", ArrayRecord())
        checked, why = check_arrays(got, declared, transfer, "extras")
        if checked is None:
            return info.client, None, why, received
        extras = checked
    metrics = content.metric_records["metrics"]
    count = finite_number(metrics.get("num-examples"))
    if count is None or count != info.num_train:
        return info.client, None, (f"num-examples {metrics.get('num-examples')!r} differs "
                                   f"from the train size {info.num_train} declared at "
                                   f"discovery"), received
    loss = finite_number(metrics.get("train-loss"))
    if loss is None:
        return info.client, None, "train-loss missing or not a finite number", received
    steps = finite_number(metrics.get("steps"), 0, 1e12) or 0
    return info.client, ClientUpdate(params, extras, info.num_train, loss,
                                     steps=int(steps)), None, received


def evaluate_all(grid: Grid, arrays: list[np.ndarray], config: dict, timeout: float
                 ) -> list[tuple[int, dict]]:
    """One legacy evaluate exchange with every node (round 0, zero-shot, personalization)."""
    ins = EvaluateIns(ndarrays_to_parameters(arrays), config)
    messages = [Message(compat.evaluateins_to_recorddict(ins, True), dst_node_id=n,
                        message_type=MessageType.EVALUATE) for n in grid.get_node_ids()]
    replies = []
    for msg in grid.send_and_receive(messages, timeout=timeout):
        if msg.has_content():
            res = compat.recorddict_to_evaluateres(msg.content)
            replies.append((msg.metadata.src_node_id, dict(res.metrics)))
    return replies


def identities(answers: list[tuple[int, dict]]) -> tuple[dict[int, tuple[str, str]],
                                                         dict[str, dict[str, int]]]:
    """Each node's (name, role) and split sizes, from its first (zero-shot) answer."""
    nodes: dict[int, tuple[str, str]] = {}
    sizes: dict[str, dict[str, int]] = {}
    for node_id, metrics in answers:
        name = str(metrics.get("client"))[:256]
        role = "heldout" if "zeroshot-heldout-accuracy" in metrics else "train"
        nodes[node_id] = (name, role)
        sizes[name] = {k: int(v) for k in ("num-train", "num-val", "num-test")
                       if (v := finite_number(metrics.get(k), 0)) is not None}
    return nodes, sizes


NODE_COSTS = {"start-seconds": "start", "site-seconds": "site", "eval-seconds": "evaluation",
              "train-seconds": "training"}


def node_seconds(replies: list[Message], nodes: Mapping[int, NodeInfo], timeout: float
                 ) -> dict[str, float] | None:
    """Where the round's slowest training node says its message's time went (each part the
    maximum over nodes; values outside [0, round timeout] are ignored): what a deployment's
    round costs beyond the arithmetic, for the operator."""
    out: dict[str, float] = {}
    for msg in replies:
        if msg.has_error() or "metrics" not in msg.content.metric_records or \
                msg.metadata.src_node_id not in nodes:
            continue
        metrics = msg.content.metric_records["metrics"]
        for key, name in NODE_COSTS.items():
            value = finite_number(metrics.get(key), 0.0, timeout)
            if value is not None:
                out[name] = round(max(out.get(name, 0.0), value), 4)
    return out or None
