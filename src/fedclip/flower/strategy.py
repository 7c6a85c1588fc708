"""Flower's FedAvg, extended through its hooks only (no copied round loop).

* ``configure_train`` sends the global adapter to the training nodes only (the held-out node
  never trains); ``configure_evaluate`` to every node.
* ``aggregate_train`` rejects malformed updates (wrong keys or shapes, NaN or inf; logged and
  recorded), then averages the rest with the algorithm's own ``aggregate`` (the in-process
  runner's code, so both runtimes agree).
* ``aggregate_evaluate`` records the round in the in-process runner's history format and
  tracks the best round by mean validation accuracy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedclip.adapters import Params
from fedclip.algorithms.base import Algorithm
from fedclip.flower.codec import check_update, decode, encode
from fedclip.runtime.federation import nanmean


def payload_bytes(record: ArrayRecord) -> int:
    return sum(int(a.numpy().nbytes) for a in record.values())


def evaluation_record(replies: list[Message], prefix: str = "") -> dict:
    """Per-client val/test accuracy and held-out accuracy, as the in-process runner records."""
    val, test, heldout = {}, {}, None
    for msg in replies:
        name, metrics = msg.content["node"]["client"], msg.content["metrics"]
        if f"{prefix}heldout-accuracy" in metrics:
            heldout = float(metrics[f"{prefix}heldout-accuracy"])
        elif f"{prefix}val-accuracy" in metrics:
            val[name] = float(metrics[f"{prefix}val-accuracy"])
            test[name] = float(metrics[f"{prefix}test-accuracy"])
    val, test = dict(sorted(val.items())), dict(sorted(test.items()))
    return {"val_accuracy": val, "test_accuracy": test,
            "mean_val_accuracy": nanmean(val.values()),
            "mean_test_accuracy": nanmean(test.values()),
            "heldout_accuracy": heldout}


class FedClipStrategy(FedAvg):
    def __init__(self, algorithm: Algorithm, nodes: dict[int, dict], transfer: str = "fp32",
                 on_round: Callable[[dict], None] | None = None) -> None:
        self.train_ids = sorted((n for n, i in nodes.items() if i["role"] == "train"),
                                key=lambda n: nodes[n]["client"])
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0,
                         min_train_nodes=len(self.train_ids), min_evaluate_nodes=len(nodes),
                         min_available_nodes=len(nodes))
        self.algorithm, self.nodes, self.transfer = algorithm, nodes, transfer
        self.on_round = on_round
        self.history: list[dict] = []
        self.best_round, self.best_val = 0, -math.inf
        self.best_params: Params | None = None
        self._current: Params | None = None
        self._pending: dict = {}
        self._started = 0.0

    # --- training -------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._started = time.perf_counter()
        self._current = decode(arrays)
        config["server-round"] = server_round
        payload = encode(self._current, self.transfer)
        targets = self._online(self.train_ids, grid)
        self._pending = {"bytes_sent": payload_bytes(payload) * len(targets)}
        record = RecordDict({self.arrayrecord_key: payload, self.configrecord_key: config})
        return self._construct_messages(record, targets, MessageType.TRAIN)

    def _online(self, node_ids: list[int], grid: Grid) -> list[int]:
        """The nodes still connected (a node that left is not waited for; it is recorded as
        missing)."""
        online = set(grid.get_node_ids())
        gone = [self.nodes[n]["client"] for n in node_ids if n not in online]
        if gone:
            log(WARNING, "nodes no longer connected: %s", ", ".join(gone))
        return [n for n in node_ids if n in online]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _errors = self._check_and_log_replies(list(replies), is_train=True,
                                                     validate=False)
        updates: list[tuple[Params, int]] = []
        losses: dict[str, float] = {}
        rejected: dict[str, str] = {}
        received = 0
        for msg in sorted(valid, key=lambda m: str(m.content["node"]["client"])):
            name = str(msg.content["node"]["client"])
            try:
                record = msg.content[self.arrayrecord_key]
                received += payload_bytes(record)
                params = decode(record)
                count = int(msg.content["metrics"]["num-examples"])
                reason = check_update(params, self._current)
            except (KeyError, ValueError, TypeError, RuntimeError) as exc:
                reason = f"malformed reply ({type(exc).__name__}: {exc})"
            if reason is not None:
                log(WARNING, "round %d: rejected the update of %s: %s", server_round, name, reason)
                rejected[name] = reason
                continue
            updates.append((params, count))
            losses[name] = float(msg.content["metrics"]["train-loss"])
        expected = {self.nodes[n]["client"] for n in self.train_ids}
        missing = sorted(expected - set(losses) - set(rejected))
        if missing:
            log(WARNING, "round %d: no update from %s", server_round, ", ".join(missing))
        self._pending |= {"round": server_round, "train_loss": losses,
                          "mean_train_loss": nanmean(losses.values()), "missing": missing,
                          "rejected": rejected, "bytes_received": received}
        self._pending["bytes"] = self._pending["bytes_sent"] + received
        if not updates:
            log(WARNING, "round %d: no valid update; the global adapter is unchanged",
                        server_round)
            return None, None
        aggregated = self.algorithm.aggregate(updates)
        self._pending["seconds"] = time.perf_counter() - self._started
        return ArrayRecord(aggregated), MetricRecord({"train-loss": nanmean(losses.values()),
                                                      "num-updates": len(updates)})

    # --- evaluation -----------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self._current = decode(arrays) if len(arrays) else None
        payload = encode(self._current, self.transfer) if self._current else ArrayRecord()
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: payload, self.configrecord_key: config})
        targets = self._online(sorted(self.nodes), grid)
        self._pending["bytes_eval_sent"] = payload_bytes(payload) * len(targets)
        return self._construct_messages(record, targets, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        valid, _errors = self._check_and_log_replies(list(replies), is_train=False,
                                                     validate=False)
        record = {"round": server_round, "train_loss": {}, "seconds": 0.0, "bytes": 0,
                  **self._pending, **evaluation_record(valid)}
        if server_round > 0:  # train + evaluate, messages included
            record["round_seconds"] = time.perf_counter() - self._started
        self._pending = {}
        record["eval_missing"] = sorted(
            {i["client"] for i in self.nodes.values()}
            - {str(m.content["node"]["client"]) for m in valid})
        self.history.append(record)
        if server_round == 0 or self.best_round == 0 or (
                record["mean_val_accuracy"] > self.best_val):
            self.best_round, self.best_val = server_round, record["mean_val_accuracy"]
            self.best_params = self._current
        if self.on_round is not None:
            self.on_round(record)
        return MetricRecord({"mean-val-accuracy": record["mean_val_accuracy"],
                             "mean-test-accuracy": record["mean_test_accuracy"],
                             "heldout-accuracy": record["heldout_accuracy"] or 0.0})

    def evaluate_initial(self, grid: Grid, arrays: ArrayRecord, timeout: float) -> dict:
        """Round 0: the initial adapter and zero-shot, on every node. Returns zero-shot."""
        messages = self.configure_evaluate(0, arrays, ConfigRecord({"zeroshot": True}), grid)
        replies = [m for m in grid.send_and_receive(messages, timeout=timeout)
                   if not m.has_error()]
        self.aggregate_evaluate(0, replies)
        return evaluation_record(replies, prefix="zeroshot-")
