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

import torch
from flwr.app import ArrayRecord, Message

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
    shapes = algorithm.reply_shapes(current)
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
