"""Flower's FedAvg, extended through its hooks only (no copied round loop).

The server trusts no client:

* every node's identity (client name, role, train size) is fixed at discovery and bound to
  the node id Flower authenticated; nothing a reply says can change it;
* ``configure_train`` sends the algorithm's shared parameters, its extras and the round's
  hyperparameters (``Algorithm.round_config``) to the training nodes only;
* ``aggregate_train`` validates each reply as a whole (a training node, the expected arrays
  with the run's dtype, finite values, the algorithm's declared extras, ``num-examples``
  equal to the train size declared at discovery, a finite loss) and rejects an update whose
  distance from the global parameters is more than ``norm_factor`` times the median distance
  of the round's updates (with at least three updates). Rejected replies are logged and
  recorded, never raised. The rest are weighted by their **declared** train size and
  combined by the algorithm's own ``aggregate`` (the in-process runner's code);
* evaluation accepts val/test accuracies only from training nodes and the held-out accuracy
  only from the held-out node, each a number in [0, 1], and only from a node asked for it;
  it builds the round in the in-process history format and applies the one best-round rule.

**One message per node per round.** Round ``r``'s parameters are evaluated in round
``r + 1``: a node sampled to train evaluates the parameters it receives (its val and test
splits, with its own state, before training) inside its train message and sends the
accuracies with its update; the held-out node and the training nodes not sampled get an
evaluate message in the same exchange. Round ``r``'s record is completed then (the same
numbers, in the same round, as in-process) and checkpointed. Round 0 and the last round are
evaluated in their own exchange, as is personalization.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from logging import WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedclip.aggregation import TooFewUpdates
from fedclip.algorithms.base import Algorithm
from fedclip.callbacks import Callback, round_end
from fedclip.core.client import ClientUpdate, client_weights
from fedclip.core.records import Personalized, RoundRecord
from fedclip.core.server import ServerRules, aggregate_round, outliers, server_rules
from fedclip.core.state import FederationState
from fedclip.errors import TrainingError
from fedclip.flower.codec import check_arrays, decode, encode, finite_number, payload_bytes
from fedclip.sampling import sample_clients

DIVERGED = "its training diverged (a non-finite loss or weights)"
QUANTUM = {"fp32": 1e-6, "fp16": 2.0 ** -10}  # a transfer's relative rounding, with slack
Evaluation = tuple[dict[str, float], dict[str, float], float | None]  # val, test, held-out


@dataclass(frozen=True)
class NodeInfo:
    """A node as discovered: who it said it was, bound to its Flower node id."""

    node_id: int
    client: str
    role: str  # "train" or "heldout"
    domain: str
    index: int
    num_train: int
    num_val: int
    num_test: int
    images: int
    dim: int
    logit_scale: float
    skipped: tuple[str, ...] = ()


class FedClipStrategy(FedAvg):
    """FedAvg's round loop with fedclip's contract in its hooks (see the module docstring)."""

    def __init__(self, algorithm: Algorithm, nodes: dict[int, NodeInfo], state: FederationState,
                 *, transfer: str = "fp32", total_rounds: int = 0,
                 norm_factor: float | None = None, timeout: float = 600.0,
                 on_round: Callable[[FederationState, RoundRecord], None] | None = None,
                 callbacks: Sequence[Callback] = ()) -> None:
        self.train_ids = sorted((n for n, i in nodes.items() if i.role == "train"),
                                key=lambda n: nodes[n].client)
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0,
                         min_train_nodes=len(self.train_ids), min_evaluate_nodes=len(nodes),
                         min_available_nodes=len(nodes))
        self.algorithm, self.nodes, self.transfer = algorithm, nodes, transfer
        self.state = state  # global parameters, server state, history, best round
        self.offset = state.round  # rounds done before this start (resume)
        self.total_rounds = total_rounds
        self.norm_factor = algorithm.cfg.norm_factor if norm_factor is None else norm_factor
        self.on_round = on_round
        self.timeout = timeout  # bounds what a node may say its message took
        # weights from the sizes declared at discovery, capped (core.client.client_weights)
        self.weights = client_weights({nodes[n].client: nodes[n].num_train
                                       for n in self.train_ids}, algorithm.cfg)
        self.callbacks = list(callbacks)  # fedclip.callbacks: the same hooks as in-process
        # the same rules as in-process: rounds (a DP budget), DP, the best-round rule
        self.rules: ServerRules = server_rules(algorithm.cfg, algorithm, len(self.train_ids))
        if total_rounds:  # the last round (evaluated): fewer when a DP budget ends the run
            self.total_rounds = min(total_rounds, self.rules.rounds)
        self._pending: dict = {}
        self._expected: set[str] = set()
        self._started = 0.0
        self._unevaluated: RoundRecord | None = None  # trained, evaluated in the next round
        self._asked: set[int] = set()  # the nodes asked to evaluate it

    def server_round(self, flower_round: int) -> int:
        """fedclip's round of Flower's ``flower_round`` (a resumed run continues counting)."""
        return flower_round + self.offset

    def _online(self, node_ids: list[int], grid: Grid) -> list[int]:
        """The nodes still connected (a node that left is not waited for; it is recorded as
        missing)."""
        online = set(grid.get_node_ids())
        gone = [self.nodes[n].client for n in node_ids if n not in online]
        if gone:
            log(WARNING, "nodes no longer connected: %s", ", ".join(gone))
        return [n for n in node_ids if n in online]

    # --- training -------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._started = time.perf_counter()
        rnd = self.server_round(server_round)
        self.state.global_params = {**(self.state.global_params or {}), **decode(arrays)}
        shared = self.algorithm.shared(self.state.global_params)
        payload = encode(shared, self.transfer)
        round_config = {**dict(config), **self.algorithm.round_config(rnd).record()}
        messages, sent = [], 0
        by_name = {self.nodes[n].client: n for n in self.train_ids}
        chosen = sample_clients(list(by_name), self.algorithm.cfg.clients_per_round,
                                self.algorithm.cfg.seed, rnd)
        self._expected = set(chosen)
        training = self._online([by_name[c] for c in chosen], grid)
        if self._unevaluated is not None:  # the previous round, evaluated in this exchange
            previous = self._unevaluated.round
            round_config["evaluate-round"] = previous
            others = self._online([n for n in sorted(self.nodes) if n not in training], grid)
            self._asked = set(training) | set(others)
            evaluate = ConfigRecord({"server-round": previous})
            messages += [Message(RecordDict({"arrays": payload, "config": evaluate}),
                                 dst_node_id=n, message_type=MessageType.EVALUATE)
                         for n in others]
        for node in training:
            content = RecordDict({"arrays": payload, "config": ConfigRecord(round_config)})
            extras = self.algorithm.client_extras(self.state.server_state,
                                                  self.nodes[node].client)
            if extras:
                content["extras"] = encode(extras, self.transfer)
            sent += sum(payload_bytes(r) for r in content.array_records.values())
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        self._pending = {"round": rnd, "sent": sent}
        return messages

    def _check(self, msg: Message) -> tuple[str, ClientUpdate | None, str | None, int]:
        """(client, update or None, why rejected, bytes received) for one train reply."""
        info = self.nodes.get(msg.metadata.src_node_id)
        if info is None or info.role != "train" or info.client not in self._expected:
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
        shapes = self.algorithm.reply_shapes(self.state.params)
        params, why = check_arrays(content.array_records["arrays"], shapes, self.transfer)
        if params is None:
            return info.client, None, why, received
        declared = self.algorithm.reply_extras(self.state.params)
        extras: dict[str, torch.Tensor] = {}
        if declared or "extras" in content.array_records:
            got = content.array_records.get("extras", ArrayRecord())
            checked, why = check_arrays(got, declared, self.transfer, "extras")
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
        update = ClientUpdate(params, extras, info.num_train, loss, steps=int(steps))
        if extras:
            why = self.algorithm.check_extras(
                self.state.params, update, self.state.server_state,
                self.algorithm.round_config(self._pending["round"]), QUANTUM[self.transfer])
            if why is not None:
                return info.client, None, why, received
        return info.client, update, None, received

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self._unevaluated is not None:  # the previous round's record is complete now
            record, self._unevaluated = self._unevaluated, None
            self._evaluated(record, [m for m in replies
                                     if m.metadata.src_node_id in self._asked])
            self._finish(record)
        replies = [m for m in replies if m.metadata.message_type == MessageType.TRAIN]
        costs = self.node_seconds(replies)
        updates: dict[str, ClientUpdate] = {}
        rejected: dict[str, str] = {}
        received = 0
        answers: dict[str, int] = {}
        for msg in replies:
            client, update, why, size = self._check(msg)
            received += size
            answers[client] = answers.get(client, 0) + 1
            if update is None:
                rejected[client] = why or "rejected"
            else:
                updates[client] = update
        for client, count in answers.items():  # one reply per node and round, or none
            if count > 1 and client in self._expected:
                updates.pop(client, None)
                rejected[client] = f"answered {count} times in one round (twice or more): " \
                                   f"no reply of it counts"
        for client, why in outliers(self.algorithm, self.state.params, updates,
                                    self.algorithm.round_config(self._pending["round"]),
                                    self.norm_factor).items():
            rejected[client] = why
            del updates[client]
        for client, why in rejected.items():
            log(WARNING, "round %d: rejected the update of %s: %s", self._pending["round"],
                client, why)
        missing = sorted(self._expected - set(updates) - set(rejected))
        if missing:
            log(WARNING, "round %d: no update from %s", self._pending["round"],
                ", ".join(missing))
        self._pending["train"] = RoundRecord(
            self._pending["round"], {c: u.loss for c, u in updates.items()}, 0.0,
            self._pending["sent"], received, missing=missing, rejected=rejected,
            epsilon=self.rules.epsilon(self._pending["round"]), node_seconds=costs)
        if not updates:
            if rejected and set(rejected.values()) == {DIVERGED}:
                raise TrainingError(
                    f"training diverged on every client that answered in round "
                    f"{self._pending['round']} (lr "
                    f"{self.algorithm.round_config(self._pending['round']).lr:g}); lower the "
                    f"learning rate. The last good checkpoint is kept")
            log(WARNING, "round %d: no valid update; the global parameters are unchanged",
                self._pending["round"])
            return None, None
        ordered = [replace(u, weight=self.weights[c]) for c, u in sorted(updates.items())]
        rnd = self._pending["round"]
        try:
            self.state.global_params, self.state.server_state = aggregate_round(
                self.algorithm, self.state.params, ordered, self.state.server_state,
                self.rules, self.algorithm.cfg.seed, rnd)
        except TooFewUpdates as exc:  # rejections left too few for the rule's guarantee
            log(WARNING, "round %d: the global parameters are unchanged: %s", rnd, exc)
            return None, None
        self._pending["train"].seconds = time.perf_counter() - self._started
        shared = self.algorithm.shared(self.state.global_params)
        return ArrayRecord({k: v.contiguous() for k, v in shared.items()}), MetricRecord(
            {"train-loss": self._pending["train"].mean_train_loss, "num-updates": len(updates)})

    NODE_COSTS = {"start-seconds": "start", "site-seconds": "site",
                  "eval-seconds": "evaluation", "train-seconds": "training"}

    def node_seconds(self, replies: list[Message]) -> dict[str, float] | None:
        """Where the round's slowest training node says its message's time went (each part
        the maximum over nodes; values outside [0, round timeout] are ignored): what a
        deployment's round costs beyond the arithmetic, for the operator."""
        out: dict[str, float] = {}
        for msg in replies:
            if msg.has_error() or "metrics" not in msg.content.metric_records or \
                    msg.metadata.src_node_id not in self.nodes:
                continue
            metrics = msg.content.metric_records["metrics"]
            for key, name in self.NODE_COSTS.items():
                value = finite_number(metrics.get(key), 0.0, self.timeout)
                if value is not None:
                    out[name] = round(max(out.get(name, 0.0), value), 4)
        return out or None

    # --- evaluation -----------------------------------------------------------------------
    def evaluates(self, rnd: int) -> bool:
        """Whether round ``rnd`` is evaluated (``eval_every``, and the last round)."""
        return rnd % self.algorithm.cfg.eval_every == 0 or rnd == self.total_rounds

    def last(self, rnd: int) -> bool:
        """Whether ``rnd`` is the run's last round (evaluated in an exchange of its own)."""
        return rnd >= self.rules.rounds

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        rnd = self.server_round(server_round) if server_round > 0 else 0
        if server_round > 0 and not (self.evaluates(rnd) and self.last(rnd)):
            return []  # evaluated inside the next round's exchange (or not at all)
        if server_round > 0:
            self.state.global_params = {**(self.state.global_params or {}), **decode(arrays)}
        payload = encode(self.algorithm.shared(self.state.global_params), self.transfer) \
            if self.state.global_params else ArrayRecord()
        config["server-round"] = rnd
        targets = self._online(sorted(self.nodes), grid)
        return [Message(RecordDict({"arrays": payload, "config": ConfigRecord(dict(config))}),
                        dst_node_id=n, message_type=MessageType.EVALUATE) for n in targets]

    def metrics_of(self, replies: Iterable[Message], prefix: str = "") -> Evaluation:
        """Accuracies by role: val/test only from training nodes, held-out only from the
        held-out node; anything else, or a value outside [0, 1], is ignored and logged."""
        val, test, heldout = {}, {}, None
        for msg in replies:
            info = self.nodes.get(msg.metadata.src_node_id)
            if info is None or msg.has_error() or "metrics" not in msg.content.metric_records:
                continue
            metrics = msg.content.metric_records["metrics"]
            keys = ((f"{prefix}val-accuracy", f"{prefix}test-accuracy") if info.role == "train"
                    else (f"{prefix}heldout-accuracy",))
            values = [v for k in keys if (v := finite_number(metrics.get(k), 0.0, 1.0))
                      is not None]
            if len(values) != len(keys):
                log(WARNING, "ignored the evaluation of %s: %s must be numbers in [0, 1]",
                    info.client, ", ".join(keys))
                continue
            if info.role == "train":
                val[info.client], test[info.client] = values
            else:
                heldout = values[0]
        return val, test, heldout

    def _evaluated(self, record: RoundRecord, replies: list[Message]) -> None:
        """``record`` with the accuracies the nodes sent (and who did not answer)."""
        record.set_evaluation(*self.metrics_of(replies))
        answered = {self.nodes[m.metadata.src_node_id].client for m in replies
                    if m.metadata.src_node_id in self.nodes and not m.has_error()}
        record.eval_missing = sorted({i.client for i in self.nodes.values()} - answered)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        rnd = self.server_round(server_round) if server_round > 0 else 0
        replies = list(replies)
        record: RoundRecord = self._pending.pop("train", None) or RoundRecord(rnd)
        self._pending = {}
        if server_round > 0:
            record.round_seconds = time.perf_counter() - self._started
            self.state.round = rnd
        if server_round > 0 and self.evaluates(rnd) and not self.last(rnd):
            self._unevaluated = record  # completed by the next round's replies
            return None
        if server_round == 0 or self.evaluates(rnd):
            self._evaluated(record, replies)
        return self._finish(record)

    def _finish(self, record: RoundRecord) -> MetricRecord | None:
        """A complete round: history, the best-round rule, the run folder, callbacks."""
        self.state.history.append(record)
        if record.evaluated:
            self.state.select(record, self.rules.selection)
        if self.on_round is not None:
            self.on_round(self.state, record)
        round_end(self.callbacks, self.algorithm.cfg.heldout, record)
        if not record.evaluated:
            return None
        return MetricRecord({"mean-val-accuracy": record.mean_val_accuracy or 0.0,
                             "mean-test-accuracy": record.mean_test_accuracy or 0.0,
                             "heldout-accuracy": record.heldout_accuracy or 0.0})

    def evaluate_initial(self, grid: Grid, timeout: float, record: bool = True) -> RoundRecord:
        """Round 0: the initial parameters and zero-shot, on every node. Returns zero-shot
        (and records round 0 unless ``record`` is False: a resumed run has it)."""
        messages = self.configure_evaluate(0, ArrayRecord(), ConfigRecord({"zeroshot": True}),
                                           grid)
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        if record:
            self.aggregate_evaluate(0, replies)
        zero = RoundRecord(0)
        zero.set_evaluation(*self.metrics_of(replies, prefix="zeroshot-"))
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
        per_client, chosen = {}, {}
        for msg in grid.send_and_receive(messages, timeout=timeout):
            info = self.nodes.get(msg.metadata.src_node_id)
            if (info is None or info.role != "train" or msg.has_error()
                    or "metrics" not in msg.content.metric_records):
                continue  # an answer without its metrics counts as no answer
            metrics = msg.content.metric_records["metrics"]
            acc = finite_number(metrics.get("personalized-accuracy"), 0.0, 1.0)
            epoch = finite_number(metrics.get("personalized-epoch"), 0, epochs)
            if acc is not None and epoch is not None:
                per_client[info.client], chosen[info.client] = acc, int(epoch)
        return Personalized(per_client, chosen)
