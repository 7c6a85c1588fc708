"""The in-process federation: one round loop for every algorithm, no Flower import.

Each round every client trains from the global state (``Algorithm`` hooks decide the loss and
the aggregation), the server aggregates, and the global state is evaluated on every client's
val and test split and on the held-out domain. Callbacks observe each round (progress,
checkpoints); the loop itself neither prints nor writes files.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fedclip.adapters import Params, count_parameters
from fedclip.algorithms.base import Algorithm
from fedclip.runtime.client import (
    ClientData,
    Split,
    evaluate,
    evaluate_module,
    load_module,
    round_seed,
    train_local,
)

BYTES_PER_VALUE = 4  # fp32 on the wire
PERSONAL_ROUNDS = 10**6  # seeds of personalization epochs never collide with rounds


@dataclass
class FederationState:
    """Everything needed to continue a run exactly where it stopped."""

    round: int
    global_params: Params | None
    best_round: int = 0
    best_val: float = -math.inf
    best_params: Params | None = None
    optimizer_states: dict[str, dict] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    client_params: dict[str, Params] = field(default_factory=dict)  # algorithms that keep them
    best_client_params: dict[str, Params] = field(default_factory=dict)


RoundCallback = Callable[[FederationState, dict], None]


def nanmean(values: Iterable[float]) -> float:
    """Mean ignoring NaN (an empty split); NaN when nothing is left."""
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


class Federation:
    def __init__(self, algorithm: Algorithm, clients: list[ClientData], class_text: torch.Tensor,
                 logit_scale: float, heldout: Split | None = None,
                 heldout_mask: torch.Tensor | None = None) -> None:
        self.algorithm, self.clients = algorithm, clients
        self.class_text = F.normalize(class_text, dim=-1)
        self.logit_scale = logit_scale
        self.heldout, self.heldout_mask = heldout, heldout_mask
        self.cfg = algorithm.cfg
        self._trainable: int | None = None

    @property
    def dim(self) -> int:
        return self.class_text.shape[1]

    def trainable_parameters(self) -> int:
        if self._trainable is None:
            self._trainable = count_parameters(self.algorithm.init_global(self.dim))
        return self._trainable

    def bytes_per_round(self) -> int:
        """Down (global to each client) plus up (each client's update), fp32."""
        if not self.algorithm.trains or not self.algorithm.communicates:
            return 0
        return 2 * len(self.clients) * self.trainable_parameters() * BYTES_PER_VALUE

    # --- evaluation -----------------------------------------------------------------------
    def evaluate(self, params: Params | None, own: dict[str, Params] | None = None) -> dict:
        """Accuracies of ``params`` (or of each client's ``own`` adapter, when given; the
        held-out accuracy is then the mean over the clients' adapters)."""
        shared = load_module(self.algorithm, params, self.dim)  # built once, used for all
        modules = {c.name: load_module(self.algorithm, own[c.name], self.dim)
                   if own and c.name in own else shared for c in self.clients}
        args = (self.class_text, self.logit_scale)
        ev = self.algorithm
        val = {c.name: evaluate_module(ev, modules[c.name], c.val, *args, c.class_mask)
               for c in self.clients}
        test = {c.name: evaluate_module(ev, modules[c.name], c.test, *args, c.class_mask)
                for c in self.clients}
        heldout = None
        if self.heldout is not None:
            adapters = list(modules.values()) if own else [shared]
            heldout = nanmean([evaluate_module(ev, m, self.heldout, *args,
                                               self.heldout_mask).accuracy for m in adapters])
        return {
            "val_accuracy": {k: v.accuracy for k, v in val.items()},
            "test_accuracy": {k: v.accuracy for k, v in test.items()},
            "mean_val_accuracy": nanmean([v.accuracy for v in val.values()]),
            "mean_test_accuracy": nanmean([v.accuracy for v in test.values()]),
            "heldout_accuracy": heldout,
        }

    def personalize(self, params: Params, epochs: int) -> dict:
        """Each client fine-tunes its own copy of ``params`` on its train split, keeps the
        epoch (0 = the global adapter itself) with the best val accuracy, and is scored on its
        test split. ``params`` is never modified."""
        per_client, chosen = {}, {}
        for client in self.clients:
            args = (self.class_text, self.logit_scale)
            own = {k: v.clone() for k, v in params.items()}
            best_val = evaluate(self.algorithm, own, client.val, *args, client.class_mask)
            best, best_epoch = own, 0
            for epoch in range(1, epochs + 1):
                own = train_local(self.algorithm, own, client.train, *args,
                                  seed=round_seed(self.cfg.seed, PERSONAL_ROUNDS + epoch,
                                                  client.name)).params
                val = evaluate(self.algorithm, own, client.val, *args, client.class_mask)
                if val.accuracy > best_val.accuracy:
                    best, best_val, best_epoch = own, val, epoch
            per_client[client.name] = evaluate(self.algorithm, best, client.test, *args,
                                               client.class_mask).accuracy
            chosen[client.name] = best_epoch
        return {"mean": nanmean(list(per_client.values())), "per_client": per_client,
                "epochs": chosen}

    # --- rounds ---------------------------------------------------------------------------
    def initial_state(self) -> FederationState:
        params = self.algorithm.init_global(self.dim)
        record = {"round": 0, "train_loss": {}, "seconds": 0.0, "bytes": 0,
                  **self.evaluate(params)}
        return FederationState(0, params, 0, record["mean_val_accuracy"], params, {}, [record])

    def run_round(self, state: FederationState) -> dict:
        server_round = state.round + 1
        start = time.perf_counter()
        updates, losses = [], {}
        for client in self.clients:
            start_params = self.algorithm.start_params(state.global_params,
                                                       state.client_params.get(client.name))
            result = train_local(
                self.algorithm, start_params, client.train, self.class_text,
                self.logit_scale, seed=round_seed(self.cfg.seed, server_round, client.name),
                optimizer_state=state.optimizer_states.get(client.name))
            updates.append((result.params, result.num_examples))
            losses[client.name] = result.loss
            if result.optimizer_state is not None:
                state.optimizer_states[client.name] = result.optimizer_state
            if not self.algorithm.communicates:
                state.client_params[client.name] = result.params
        if self.algorithm.communicates:
            state.global_params = self.algorithm.aggregate(updates)
        state.round = server_round
        record = {"round": server_round, "train_loss": losses,
                  "mean_train_loss": nanmean(list(losses.values())),
                  "seconds": time.perf_counter() - start, "bytes": self.bytes_per_round()}
        if server_round % self.cfg.eval_every == 0 or server_round == self.cfg.rounds:
            record.update(self.evaluate(state.global_params, state.client_params))
            if state.best_round == 0 or record["mean_val_accuracy"] > state.best_val:
                state.best_round, state.best_val = server_round, record["mean_val_accuracy"]
                state.best_params = state.global_params
                state.best_client_params = dict(state.client_params)
        record["round_seconds"] = time.perf_counter() - start  # train, aggregate, evaluate
        state.history.append(record)
        return record

    def run(self, state: FederationState | None = None,
            callbacks: Sequence[RoundCallback] = ()) -> FederationState:
        """Train until ``cfg.rounds`` (continuing ``state`` when given)."""
        state = state or self.initial_state()
        if not self.algorithm.trains:
            return state
        while state.round < self.cfg.rounds:
            record = self.run_round(state)
            for callback in callbacks:
                callback(state, record)
        return state
