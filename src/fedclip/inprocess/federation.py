"""The in-process federation: one round loop for every algorithm, no Flower import.

Each round the server asks the algorithm for the round's configuration and each client's
extras, every client trains from the global parameters (``Algorithm.train_client``; its state
kept in ``FederationState.client_states``), and the server aggregates
(``Algorithm.aggregate``, weighted by each client's train size). Then the global state is
evaluated on every client's val and test split and on the held-out domain. Callbacks observe
each round (progress, checkpoints); the loop itself neither prints nor writes files.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from fedclip.adapters import count_parameters
from fedclip.algorithms.base import Algorithm
from fedclip.core.client import (
    ClientData,
    ClientJob,
    Split,
    client_clip,
    client_weights,
    evaluate_module,
    load_module,
    personalize,
    round_seed,
)
from fedclip.core.records import Personalized, RoundRecord, nanmean
from fedclip.core.server import aggregate_round, outliers, server_rules
from fedclip.core.state import FederationState
from fedclip.core.together import train_together
from fedclip.errors import TrainingError
from fedclip.sampling import sample_clients
from fedclip.tensors import Params, State, all_finite, tensor_bytes

RoundCallback = Callable[[FederationState, RoundRecord], None]


class Federation:
    """The clients' tensors, the held-out split and the algorithm: rounds, evaluation and
    personalization, in one process."""

    def __init__(self, algorithm: Algorithm, clients: list[ClientData], class_text: torch.Tensor,
                 logit_scale: float, heldout: Split | None = None,
                 heldout_mask: torch.Tensor | None = None) -> None:
        self.device = class_text.device  # where the run happens: every tensor lives there
        self.algorithm = algorithm
        self.clients = [c.to(self.device) for c in clients]
        self.class_text = class_text  # normalised
        self.logit_scale = logit_scale
        self.heldout = heldout.to(self.device) if heldout is not None else None
        self.heldout_mask = heldout_mask.to(self.device) if heldout_mask is not None else None
        self.cfg = algorithm.cfg
        algorithm.num_clients = len(clients)
        algorithm.logit_scale = logit_scale
        self.together = (self.cfg.train_clients_together and algorithm.batchable
                         and self.cfg.optimizer_state == "reset")
        self._trainable: int | None = None
        self.weights = client_weights({c.name: len(c.train) for c in self.clients}, self.cfg)
        # rounds (a DP budget may end the run early), DP, the best-round rule: as on Flower
        self.rules = server_rules(self.cfg, algorithm, len(clients))

    @property
    def dim(self) -> int:
        """The feature size."""
        return self.class_text.shape[1]

    def trainable_parameters(self) -> int:
        """Parameters the algorithm trains (what a round sends, per client)."""
        if self._trainable is None:
            self._trainable = count_parameters(self.algorithm.init_global(self.dim))
        return self._trainable

    # --- evaluation -----------------------------------------------------------------------
    def evaluate(self, record: RoundRecord, params: Params | None,
                 states: dict[str, State] | None = None) -> RoundRecord:
        """Accuracies of ``params`` on every client's val/test split (with each client's own
        state: personal parameters, a personal model) and on the held-out domain (the global
        parameters; the mean over the clients' models when every parameter is personal), into
        ``record``."""
        algo, states = self.algorithm, states or {}
        if params is None and not algo.has_zero_shot:  # nothing to score: NaN, not a guess
            nan = float("nan")
            record.set_evaluation({c.name: nan for c in self.clients},
                                  {c.name: nan for c in self.clients},
                                  nan if self.heldout is not None else None)
            return record
        shared = load_module(algo, params, self.dim)  # built once, used by every plain client
        modules = {}
        for c in self.clients:
            own = algo.eval_params(params, states.get(c.name, {}))
            modules[c.name] = shared if own is params else load_module(algo, own, self.dim)
        args = (self.class_text, self.logit_scale)
        val = {c.name: evaluate_module(algo, modules[c.name], c.val, *args, c.class_mask).accuracy
               for c in self.clients}
        test = {c.name: evaluate_module(algo, modules[c.name], c.test, *args,
                                        c.class_mask).accuracy for c in self.clients}
        heldout = None
        if self.heldout is not None:
            models = [shared] if algo.communicates or params is None else list(modules.values())
            heldout = nanmean(evaluate_module(algo, m, self.heldout, *args,
                                              self.heldout_mask).accuracy for m in models)
        record.set_evaluation(val, test, heldout)
        return record

    def zero_shot(self) -> RoundRecord:
        """Every split scored with no trained parameters (the zero-shot classifier)."""
        return self.evaluate(RoundRecord(0), None)

    def personalize(self, params: Params, epochs: int) -> Personalized:
        """Each client fine-tunes its own copy of ``params`` (see
        :func:`fedclip.core.client.personalize`); ``params`` is never modified."""
        per_client, chosen = {}, {}
        for c in self.clients:
            per_client[c.name], chosen[c.name] = personalize(
                self.algorithm, params, c, self.class_text, self.logit_scale, epochs)
        return Personalized(per_client, chosen)

    # --- rounds ---------------------------------------------------------------------------
    def initial_state(self) -> FederationState:
        """Round 0: the initial parameters, evaluated (round 0 competes for selection)."""
        params = self.algorithm.init_global(self.dim)
        params = {k: v.to(self.device) for k, v in params.items()} if params else params
        server_state = self.algorithm.init_server_state(params) if params is not None else {}
        record = self.evaluate(RoundRecord(0), params)
        state = FederationState(0, params, server_state=server_state, history=[record])
        state.select(record, self.rules.selection)
        return state

    def client_job(self, state: FederationState, client: ClientData, server_round: int
                   ) -> ClientJob:
        """What ``client`` trains from in ``server_round``."""
        algo = self.algorithm
        own = state.client_states.setdefault(client.name, {})
        start = algo.with_personal(state.params, own)
        return ClientJob(client.name, client.train, start, start,
                         algo.client_extras(state.server_state, client.name),
                         algo.round_config(server_round), own, self.class_text,
                         self.logit_scale, round_seed(self.cfg.seed, server_round, client.name))

    def run_round(self, state: FederationState) -> RoundRecord:
        """One round: sample, train, aggregate, evaluate (when due); appended to history."""
        algo, server_round = self.algorithm, state.round + 1
        start = time.perf_counter()
        losses, sent, received = {}, 0, 0
        chosen = set(sample_clients([c.name for c in self.clients], self.cfg.clients_per_round,
                                    self.cfg.seed, server_round))
        clients = [c for c in self.clients if c.name in chosen]
        jobs = [self.client_job(state, c, server_round) for c in clients]
        if self.together:
            trained = train_together(algo, jobs)
        else:
            trained = [algo.train_client(job) for job in jobs]
        replies = {}
        for client, job, update in zip(clients, jobs, trained, strict=True):
            if algo.communicates:
                update = replace(update, params=client_clip(self.cfg, update.params,
                                                            algo.shared(job.params)))
            replies[client.name] = replace(update, weight=self.weights[client.name])
            losses[client.name] = update.loss
            if algo.communicates:
                sent += tensor_bytes(algo.shared(state.params)) + tensor_bytes(job.extras)
                received += tensor_bytes(update.params) + tensor_bytes(update.extras)
        rejected = {}
        if algo.communicates:  # the server's distance rule, as on Flower
            rejected = outliers(algo, state.params, replies, algo.round_config(server_round),
                                self.cfg.norm_factor)
        updates = [u for c, u in replies.items() if c not in rejected]
        if algo.communicates and updates:
            new, server_state = aggregate_round(algo, state.params, updates,
                                                state.server_state, self.rules, self.cfg.seed,
                                                server_round)
            if not all_finite(new):
                raise TrainingError(f"round {server_round}: the aggregate is not finite; lower "
                                    f"the learning rate (or the server's). The last good "
                                    f"checkpoint is kept")
            state.global_params, state.server_state = new, server_state
        state.round = server_round
        record = RoundRecord(server_round, losses, time.perf_counter() - start, sent, received,
                             rejected=rejected or None, epsilon=self.rules.epsilon(server_round))
        if server_round % self.cfg.eval_every == 0 or server_round == self.rules.rounds:
            self.evaluate(record, state.global_params, state.client_states)
            state.select(record, self.rules.selection)
        record.round_seconds = time.perf_counter() - start  # train, aggregate, evaluate
        state.history.append(record)
        return record

    def run(self, state: FederationState | None = None,
            callbacks: Sequence[RoundCallback] = ()) -> FederationState:
        """Train until ``cfg.rounds``, or the last round a DP budget allows (continuing
        ``state`` when given)."""
        state = state.to(self.device) if state is not None else self.initial_state()
        if not self.algorithm.trains:
            return state
        while state.round < self.rules.rounds:
            record = self.run_round(state)
            for callback in callbacks:
                callback(state, record)
        return state
