"""Flower's FedAvg, extended through its hooks only (no copied round loop), driving the one
server (:class:`fedclip.core.server.Server`), which decides everything about a round.

The hooks only move messages: ``configure_train`` sends the server's plan (the shared
parameters, each client's extras, the round's configuration) to the sampled training nodes;
``aggregate_train`` checks what the transport can (:func:`~fedclip.flower.replies.
train_update`: a node sampled for the round, the expected arrays and dtype, finite values,
``num-examples`` equal to the size declared at discovery) and hands the rest to
:meth:`Server.accept`; evaluation replies count only by the role fixed at discovery
(:mod:`fedclip.flower.replies`).

**One message per node per round.** Round ``r``'s parameters are evaluated in round
``r + 1``: a node sampled to train scores the parameters it receives before training and
sends the accuracies with its update; the held-out node and the unsampled ones get an
evaluate message in the same exchange. Round 0 and the last round are evaluated in their own
exchange, as is personalization.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedclip.core.client import ClientUpdate
from fedclip.core.records import Personalized, RoundRecord
from fedclip.core.server import RoundPlan, Server
from fedclip.flower.codec import encode, payload_bytes
from fedclip.flower.discovery import NodeInfo
from fedclip.flower.replies import (
    Reply,
    evaluation_of,
    no_zero_shot,
    node_seconds,
    personalized_of,
    train_update,
)

QUANTUM = {"fp32": 1e-6, "fp16": 2.0 ** -10}  # a transfer's relative rounding, with slack


@dataclass
class PendingRound:
    """A round between its configuration and its completion."""

    plan: RoundPlan
    started: float
    sent: int = 0
    record: RoundRecord | None = None  # the training part, once accepted
    asked: set[int] = field(default_factory=set)  # nodes asked to evaluate the previous round


class FedClipStrategy(FedAvg):
    """FedAvg's round loop, driving the one server (:class:`fedclip.core.server.Server`):
    the hooks only move messages; see the module docstring."""

    def __init__(self, server: Server, nodes: dict[int, NodeInfo], *, transfer: str = "fp32",
                 timeout: float = 600.0) -> None:
        self.train_ids = sorted((n for n, i in nodes.items() if i.role == "train"),
                                key=lambda n: nodes[n].client)
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0,
                         min_train_nodes=len(self.train_ids), min_evaluate_nodes=len(nodes),
                         min_available_nodes=len(nodes))
        self.server, self.algorithm = server, server.algorithm
        self.nodes, self.transfer, self.timeout = nodes, transfer, timeout
        self.by_client = {nodes[n].client: n for n in self.train_ids}
        self.pending: PendingRound | None = None
        self.unevaluated: RoundRecord | None = None  # trained, evaluated in the next exchange

    @property
    def state(self):  # noqa: ANN201
        """The server's state (global parameters, history, best round)."""
        return self.server.state

    def _online(self, node_ids: list[int], grid: Grid) -> list[int]:
        """The nodes still connected (a node that left is not waited for; it is recorded as
        missing)."""
        online = set(grid.get_node_ids())
        gone = [self.nodes[n].client for n in node_ids if n not in online]
        if gone:
            log(WARNING, "nodes no longer connected: %s", ", ".join(gone))
        return [n for n in node_ids if n in online]

    def _payload(self) -> ArrayRecord:
        return encode(self.algorithm.shared(self.state.params), self.transfer)

    # --- training -------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        plan = self.server.plan()
        if plan is None:
            return []
        pending = self.pending = PendingRound(plan, time.perf_counter())
        payload = self._payload()
        round_config = {**dict(config), **plan.config.record()}
        messages: list[Message] = []
        training = self._online([self.by_client[c] for c in plan.clients], grid)
        if self.unevaluated is not None:  # the previous round, evaluated in this exchange
            round_config["evaluate-round"] = self.unevaluated.round
            others = self._online([n for n in sorted(self.nodes) if n not in training], grid)
            pending.asked = set(training) | set(others)
            evaluate = ConfigRecord({"server-round": self.unevaluated.round})
            messages += [Message(RecordDict({"arrays": payload, "config": evaluate}),
                                 dst_node_id=n, message_type=MessageType.EVALUATE)
                         for n in others]
        for node in training:
            content = RecordDict({"arrays": payload, "config": ConfigRecord(round_config)})
            extras = plan.extras(self.server, self.nodes[node].client)
            if extras:
                content["extras"] = encode(extras, self.transfer)
            pending.sent += sum(payload_bytes(r) for r in content.array_records.values())
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        return messages

    def _check(self, msg: Message, plan: RoundPlan
               ) -> tuple[str, ClientUpdate | None, str | None, int]:
        """One train reply through the transport's checks (:func:`train_update`)."""
        return train_update(msg, self.nodes, plan, self.algorithm.server, self.state.params,
                            self.transfer)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        pending = self.pending
        assert pending is not None  # configure_train planned this round
        if self.unevaluated is not None:  # the previous round's record is complete now
            record, self.unevaluated = self.unevaluated, None
            self._complete(record, [m for m in replies if m.metadata.src_node_id in pending.asked])
        replies = [m for m in replies if m.metadata.message_type == MessageType.TRAIN]
        updates: dict[str, ClientUpdate] = {}
        rejected: dict[str, str] = {}
        received, answers = 0, dict[str, int]()
        for msg in replies:
            client, update, why, size = self._check(msg, pending.plan)
            received += size
            answers[client] = answers.get(client, 0) + 1
            if update is None:
                rejected[client] = why or "rejected"
            else:
                updates[client] = update
        for client, count in answers.items():  # one reply per node and round, or none
            if count > 1 and client in pending.plan.clients:
                updates.pop(client, None)
                rejected[client] = f"answered {count} times in one round (twice or more): " \
                                   f"no reply of it counts"
        pending.record = self.server.accept(
            pending.plan, updates, rejected=rejected, missing=[], sent=pending.sent,
            received=received,
            node_seconds=node_seconds(replies, self.nodes, self.timeout))
        pending.record.seconds = time.perf_counter() - pending.started
        if not pending.record.train_loss:  # no update counted: the parameters are unchanged
            return None, None
        return ArrayRecord({k: v.contiguous() for k, v in self.algorithm.shared(
            self.state.params).items()}), MetricRecord(
            {"train-loss": pending.record.mean_train_loss or 0.0, "num-updates": len(updates)})

    # --- evaluation -----------------------------------------------------------------------
    def _replies(self, replies: Iterable[Message]) -> list[Reply]:
        """Answers from known nodes with their metrics, by the role fixed at discovery."""
        out: list[Reply] = []
        for msg in replies:
            info = self.nodes.get(msg.metadata.src_node_id)
            if info is not None and not msg.has_error() and \
                    "metrics" in msg.content.metric_records:
                out.append((info.client, info.role, msg.content.metric_records["metrics"]))
        return out

    def _complete(self, record: RoundRecord, replies: list[Message] | None) -> None:
        """``record`` with its evaluation (None: not evaluated) through the server."""
        evaluation = None
        if replies is not None:
            evaluation = evaluation_of(self._replies(replies))
            answered = {self.nodes[m.metadata.src_node_id].client for m in replies
                        if m.metadata.src_node_id in self.nodes and not m.has_error()}
            record.eval_missing = sorted({i.client for i in self.nodes.values()} - answered)
        self.server.complete(record, evaluation)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        pending = self.pending
        if server_round > 0 and (pending is None or not pending.plan.last
                                 or not pending.plan.evaluated):
            return []  # evaluated inside the next round's exchange (or not at all)
        rnd = pending.plan.round if server_round > 0 and pending is not None else 0
        payload = self._payload() if self.state.global_params else ArrayRecord()
        config["server-round"] = rnd
        return [Message(RecordDict({"arrays": payload, "config": ConfigRecord(dict(config))}),
                        dst_node_id=n, message_type=MessageType.EVALUATE)
                for n in self._online(sorted(self.nodes), grid)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        pending, self.pending = self.pending, None
        if pending is None or pending.record is None:
            return None
        record, plan = pending.record, pending.plan
        record.round_seconds = time.perf_counter() - pending.started
        if plan.evaluated and not plan.last:
            self.unevaluated = record  # completed by the next round's replies
            return None
        self._complete(record, list(replies) if plan.evaluated else None)
        return None

    def evaluate_initial(self, grid: Grid, timeout: float) -> RoundRecord:
        """Round 0: the initial parameters and zero-shot, on every node, in one exchange.
        Records round 0 (a fresh run) and returns zero-shot."""
        zeroshot = self.algorithm.has_zero_shot
        messages = self.configure_evaluate(0, ArrayRecord(), ConfigRecord({"zeroshot": zeroshot}),
                                           grid)
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        if not self.server.started:
            self._complete(RoundRecord(0), replies)
        zero = RoundRecord(0)
        zero.set_evaluation(*(evaluation_of(self._replies(replies), prefix="zeroshot-")
                              if zeroshot else no_zero_shot(self.by_client)))
        return zero

    def personalize(self, grid: Grid, epochs: int, timeout: float) -> Personalized | None:
        """Each training node fine-tunes its own copy of the selected parameters (as
        in-process); the global parameters are untouched."""
        if epochs <= 0 or self.state.best_params is None or not self.algorithm.personalizes:
            return None
        payload = encode(self.algorithm.shared(self.state.best_params), self.transfer)
        config = ConfigRecord({"personalize-epochs": epochs})
        messages = [Message(RecordDict({"arrays": payload, "config": config}), dst_node_id=n,
                            message_type=MessageType.EVALUATE)
                    for n in self._online(self.train_ids, grid)]
        replies = self._replies(grid.send_and_receive(messages, timeout=timeout))
        return personalized_of(replies, epochs)
