"""The in-process driver: every client of a federation in this process, no Flower import.

It only moves values between the clients and the one server (:class:`fedclip.core.server.
Server`, which decides everything about a round): it asks the server for a round's plan,
trains the sampled clients through the one client entry (:func:`fedclip.core.client.run_jobs`;
their state kept in ``FederationState.client_states``), hands the updates to the server, and
scores every client and the held-out domain when the plan says the round is evaluated.

Under ``protocol=base2novel`` the federation holds the base classes alone (the clients' splits
and the held-out domain restricted to base-class images, labels renumbered among the base
classes, the algorithm built with the base prompts), and :class:`NovelClasses` what scores
the same parameters on the novel classes at the end (:meth:`Federation.evaluate_novel`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedclip.algorithms.base import Algorithm
from fedclip.core.client import (
    ClientData,
    ClientUpdate,
    Scoring,
    Split,
    client_job,
    evaluate_many,
    personalize,
    run_jobs,
)
from fedclip.core.records import BaseNovelScores, Personalized, RoundRecord, Scores, nanmean
from fedclip.core.server import DIVERGED, Evaluation, RoundObserver, RoundPlan, Server
from fedclip.core.state import FederationState
from fedclip.core.together import train_together
from fedclip.tensors import Params, State, tensor_bytes


def restrict(split: Split, classes: Sequence[int], n_classes: int) -> Split:
    """The images of ``classes`` alone, labelled by their position in ``classes``."""
    lookup = torch.full((n_classes,), -1, dtype=torch.long, device=split.y.device)
    lookup[torch.as_tensor(list(classes), dtype=torch.long, device=split.y.device)] = \
        torch.arange(len(classes), device=split.y.device)
    mapped = lookup[split.y]
    kept = mapped >= 0
    return Split(split.x[kept], mapped[kept])


def restrict_client(data: ClientData, classes: Sequence[int]) -> ClientData:
    """A client's splits with the images of ``classes`` alone (renumbered as :func:`restrict`
    does) and its domain's classes among them."""
    n = len(data.class_mask)
    index = torch.as_tensor(list(classes), dtype=torch.long, device=data.class_mask.device)
    return ClientData(data.name, restrict(data.train, classes, n),
                      restrict(data.val, classes, n), restrict(data.test, classes, n),
                      data.class_mask[index])


@dataclass(frozen=True)
class NovelClasses:
    """Base-to-novel: what scores a federation's parameters on the classes it never trained
    on: the algorithm built with the novel class prompts and text features (None: its
    parameters are per class, ``open_vocabulary = False``), the novel classes' normalised text
    features, and each client's test images and the held-out domain's images of the novel
    classes (labels among the novel classes) with the novel classes each domain has."""

    algorithm: Algorithm | None
    class_text: torch.Tensor
    tests: dict[str, tuple[Split, torch.Tensor]]  # client -> (novel test images, class mask)
    heldout: Split | None = None
    heldout_mask: torch.Tensor | None = None

    def to(self, device: str | torch.device) -> NovelClasses:
        """The same on ``device``."""
        return NovelClasses(self.algorithm, self.class_text.to(device),
                            {c: (s.to(device), m.to(device)) for c, (s, m) in self.tests.items()},
                            self.heldout.to(device) if self.heldout is not None else None,
                            self.heldout_mask.to(device) if self.heldout_mask is not None
                            else None)


class Federation:
    """The clients' tensors, the held-out split and the algorithm: how the clients of a
    held-out run train and are scored in one process (``novel``: under base2novel, what
    scores the novel classes)."""

    def __init__(self, algorithm: Algorithm, clients: list[ClientData], class_text: torch.Tensor,
                 logit_scale: float, heldout: Split | None = None,
                 heldout_mask: torch.Tensor | None = None,
                 novel: NovelClasses | None = None) -> None:
        self.device = class_text.device  # where the run happens: every tensor lives there
        self.algorithm = algorithm
        self.clients = [c.to(self.device) for c in clients]
        self.class_text = class_text  # normalised
        self.logit_scale = logit_scale
        self.heldout = heldout.to(self.device) if heldout is not None else None
        self.heldout_mask = heldout_mask.to(self.device) if heldout_mask is not None else None
        self.novel = novel.to(self.device) if novel is not None else None
        self.cfg = algorithm.cfg
        self.together = (self.cfg.train_clients_together and algorithm.batchable
                         and self.cfg.optimizer_state == "reset")
        self._trainable: int | None = None
        self._server: Server | None = None

    @property
    def dim(self) -> int:
        """The feature size."""
        return self.class_text.shape[1]

    def sizes(self) -> dict[str, int]:
        """Every client's train size (what the server weighs by)."""
        return {c.name: len(c.train) for c in self.clients}

    def trainable_parameters(self) -> int:
        """Parameters the algorithm trains (what a round sends, per client)."""
        if self._trainable is None:
            self._trainable = self.algorithm.trainable_parameters(
                self.algorithm.init_global(self.dim))
        return self._trainable

    def init(self) -> Params | None:
        """The algorithm's global parameters before round 1, on this federation's device."""
        params = self.algorithm.init_global(self.dim)
        return {k: v.to(self.device) for k, v in params.items()} if params else params

    # --- the clients ----------------------------------------------------------------------
    def train(self, plan: RoundPlan, server: Server
              ) -> tuple[dict[str, ClientUpdate], dict[str, str], int, int]:
        """The sampled clients' round: (updates, diverged ones, bytes sent, bytes received)."""
        algo, state = self.algorithm, server.state
        by_name = {c.name: c for c in self.clients}
        shared = algo.shared(state.params) if algo.communicates else {}
        jobs = [client_job(algo.client, name, by_name[name].train, state.params,
                           plan.extras(server, name), plan.config,
                           state.client_states.setdefault(name, {}), self.class_text,
                           self.logit_scale) for name in plan.clients]
        trained = run_jobs(algo.client, jobs, train_together if self.together else None)
        updates, diverged, sent, received = {}, {}, 0, 0
        for job, update in zip(jobs, trained, strict=True):
            if update is None:
                diverged[job.name] = DIVERGED
                continue
            updates[job.name] = update
            if algo.communicates:
                sent += tensor_bytes(shared) + tensor_bytes(job.extras)
                received += tensor_bytes(update.params) + tensor_bytes(update.extras)
        return updates, diverged, sent, received

    def evaluate(self, params: Params | None, states: dict[str, State] | None = None
                 ) -> Evaluation:
        """Accuracies of ``params`` on every client's val/test split (with each client's own
        state: personal parameters, a personal model) and on the held-out domain (the global
        parameters; the mean over the clients' models when every parameter is personal)."""
        algo = self.algorithm
        if params is None and not algo.has_zero_shot:  # nothing to score: NaN, not a guess
            nan = float("nan")
            held = nan if self.heldout is not None else None
            return {c.name: nan for c in self.clients}, {c.name: nan for c in self.clients}, held
        per, held = self._score(algo, params, states or {}, self.class_text,
                                {c.name: [(c.val, c.class_mask), (c.test, c.class_mask)]
                                 for c in self.clients}, self.heldout, self.heldout_mask)
        return ({name: v[0] for name, v in per.items()}, {name: v[1] for name, v in per.items()},
                held)

    def _score(self, algo: Algorithm, params: Params | None, states: dict[str, State],
               class_text: torch.Tensor, splits: dict[str, list[tuple[Split, torch.Tensor]]],
               heldout: Split | None, heldout_mask: torch.Tensor | None
               ) -> tuple[dict[str, list[float]], float | None]:
        """Each client's accuracy on each of its ``splits`` (with its own state) and the
        held-out accuracy, against ``class_text``, in one pass of the client entry."""
        client, args = algo.client, (class_text, self.logit_scale)
        own = {name: client.eval_params(params, states.get(name, {})) if params is not None
               else None for name in splits}
        items = [Scoring(own[name], split, mask) for name, parts in splits.items()
                 for split, mask in parts]
        if heldout is not None:  # every parameter personal: the mean over own models
            models = [params] if algo.communicates or params is None else list(own.values())
            items += [Scoring(p, heldout, heldout_mask) for p in models]
        scored = [r.accuracy for r in evaluate_many(client, items, *args)]  # one pass
        per, at = {}, 0
        for name, parts in splits.items():
            per[name], at = scored[at:at + len(parts)], at + len(parts)
        return per, (nanmean(scored[at:]) if heldout is not None else None)

    def evaluate_novel(self, params: Params | None, states: dict[str, State] | None = None
                       ) -> tuple[dict[str, float], float | None] | None:
        """Base-to-novel: the accuracy of ``params`` (None: the zero-shot classifier) on each
        client's novel-class test images and on the held-out domain's, among the novel
        classes, through the algorithm built with their prompts; None where it cannot score
        them (no novel classes here, or per-class parameters)."""
        novel = self.novel
        if novel is None:
            return None
        # no parameters: nothing per class, the run's own algorithm scores the novel prompts
        algo = novel.algorithm if params is not None else (novel.algorithm or self.algorithm)
        if algo is None or (params is None and not algo.has_zero_shot):
            return None
        per, held = self._score(algo, params, states or {}, novel.class_text,
                                {c: [part] for c, part in novel.tests.items()}, novel.heldout,
                                novel.heldout_mask)
        return {c: v[0] for c, v in per.items()}, held

    def base_novel(self, base: Scores, params: Params | None,
                   states: dict[str, State] | None = None) -> BaseNovelScores:
        """A model's base-to-novel scores: ``base`` its scores on the base classes (a round's
        record), and its novel accuracies (:meth:`evaluate_novel`; None: not applicable)."""
        novel = self.evaluate_novel(params, states)
        per, held = novel if novel is not None else ({}, None)
        return BaseNovelScores(base.personalization, nanmean(per.values()) if novel else None,
                               base.generalization, held, per)

    def zero_shot(self) -> RoundRecord:
        """Every split scored with no trained parameters (the zero-shot classifier)."""
        record = RoundRecord(0)
        record.set_evaluation(*self.evaluate(None))
        return record

    def personalize(self, params: Params, epochs: int) -> Personalized:
        """Each client fine-tunes its own copy of ``params`` (see
        :func:`fedclip.core.client.personalize`); ``params`` is never modified."""
        per_client, chosen = {}, {}
        for c in self.clients:
            per_client[c.name], chosen[c.name] = personalize(
                self.algorithm.client, params, c, self.class_text, self.logit_scale, epochs)
        return Personalized(per_client, chosen)

    # --- driving the server ---------------------------------------------------------------
    def server(self, run: object = None, *, callbacks: Sequence[object] = (),
               observers: Sequence[RoundObserver] = (),
               resumed: FederationState | None = None) -> Server:
        """The one server of this federation, started (``resumed``, or round 0 to record)."""
        self._server = Server(self.algorithm, self.sizes(), run, callbacks=callbacks,
                              observers=observers)
        self._server.start(self.init(), resumed.to(self.device) if resumed else None)
        return self._server

    def round_zero(self, server: Server) -> None:
        """Round 0 (a fresh run): the initial parameters, evaluated; it competes for
        selection like any round."""
        if not server.started:
            server.complete(RoundRecord(0), self.evaluate(server.state.global_params))

    def run_round(self, server: Server | FederationState | None = None) -> RoundRecord | None:
        """One round through ``server``: plan, train, accept, evaluate when due, complete
        (None: no round left)."""
        server = server if isinstance(server, Server) else self.current()
        plan = server.plan()
        if plan is None:
            return None
        start = time.perf_counter()
        updates, diverged, sent, received = self.train(plan, server)
        record = server.accept(plan, updates, rejected=diverged, sent=sent, received=received)
        record.seconds = time.perf_counter() - start  # train and aggregate
        state = server.state
        evaluation = self.evaluate(state.global_params, state.client_states) \
            if plan.evaluated else None
        record.round_seconds = time.perf_counter() - start  # train, aggregate, evaluate
        return server.complete(record, evaluation)

    def run(self, server: Server | None = None) -> FederationState:
        """Round 0 when due, then every round the server plans."""
        server = server or self.current()
        self.round_zero(server)
        while self.run_round(server) is not None:
            pass
        return server.state

    # conveniences for benchmarks and tests: a server without a run folder
    def current(self) -> Server:
        """The server this federation drives (a fresh one, without a run folder, if none)."""
        return self._server or self.server()

    def initial_state(self) -> FederationState:
        """A fresh server's state after round 0."""
        server = self.server()
        self.round_zero(server)
        return server.state

    @property
    def rules(self):  # noqa: ANN201
        """The server's rules (rounds, sampling, selection, DP)."""
        return self.current().rules
