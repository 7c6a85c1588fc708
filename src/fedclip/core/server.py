"""What a server does with a round, in every runtime: the rules fixed before round 1 (how
many rounds, the privacy mechanism, whether the aggregator can apply) and the aggregation
step itself (robust rules, differential privacy), so that the in-process runner, the Flower
strategy and SecAgg+ share one implementation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from fedclip import privacy
from fedclip.aggregation import ROBUST, SELECTING, TooFewUpdates, flower_aggregate, min_updates
from fedclip.config import RunConfig
from fedclip.core.client import ClientUpdate, RoundConfig, client_weights, weight_cap
from fedclip.core.influence import influence_bound, stalled, suspicious, tolerance_note
from fedclip.core.records import RoundRecord, RunResult, safe_name
from fedclip.core.state import FederationState, selection_rule
from fedclip.errors import ConfigError, TrainingError
from fedclip.privacy import PrivacyPlan
from fedclip.sampling import sample_clients, sampled_per_round
from fedclip.tensors import Params, State, all_finite, distance

logger = logging.getLogger(__name__)
Evaluation = tuple[dict[str, float], dict[str, float], float | None]  # val, test, held-out
STALL_ROUNDS = 3  # rounds without movement, while clients train, before the server says so


class Aggregator(Protocol):
    """The hooks of an algorithm's server side (:class:`fedclip.algorithms.base.ServerSide`)
    that the server step needs."""

    @property
    def name(self) -> str:
        """The algorithm's registered name (for messages)."""

    @property
    def aggregates_mean(self) -> bool:
        """Whether its aggregate depends on the updates only through their mean."""

    @property
    def communicates(self) -> bool:
        """Whether anything is averaged by a server."""

    @property
    def sends_params(self) -> bool:
        """Whether its replies carry parameters (False: statistics in extras only)."""

    def sends_extras(self) -> bool:
        """Whether its replies carry per-client extras."""

    def planned_rounds(self, configured: int) -> int:
        """The rounds it trains when ``configured`` are asked for."""

    def shared(self, params: Params) -> Params:
        """The parameters that travel (everything but the personal ones)."""

    def update_bound(self, current: Params, num_examples: int, config: RoundConfig
                     ) -> float | None:
        """About the farthest an honest client moves the shared parameters in a round."""

    def aggregate(self, current: Params, updates: Sequence[ClientUpdate], server_state: State
                  ) -> tuple[Params, State]:
        """The next global parameters (and server state) from the round's updates."""

    def check_update(self, client: str, update: ClientUpdate, current: Params) -> str | None:
        """Why ``client``'s reply is not what that client must send, or None."""

    def as_global(self, current: Params, params: Params) -> Params:
        """A reply's parameters as the global parameters they would make alone."""

    def round_metrics(self, current: Params, new: Params, updates: Sequence[ClientUpdate]
                      ) -> dict[str, float]:
        """What it measured of the round's aggregate (recorded by name)."""


@dataclass(frozen=True)
class ServerRules:
    """A run's server-side rules, decided before round 1 from the config and the number of
    training clients (the same in every runtime)."""

    rounds: int  # the rounds this run trains: the configured ones, or fewer (DP budget)
    sampled: int  # clients sampled per round
    selection: str  # "mean" or "median" of the clients' val accuracies (the best round)
    privacy: PrivacyPlan | None = None

    def epsilon(self, server_round: int) -> float | None:
        """The privacy spent after ``server_round`` rounds (None: no DP)."""
        return None if self.privacy is None else self.privacy.epsilon(server_round)

    def extra(self, rounds_done: int) -> dict[str, Any]:
        """What results.json says of these rules: the selection rule, and with DP the
        mechanism and the epsilon spent by the rounds run."""
        out: dict[str, Any] = {"selection": f"{self.selection} of the clients' val accuracies"}
        if self.privacy is not None:
            out["privacy"] = {**self.privacy.to_json(),
                              "epsilon": self.privacy.epsilon(rounds_done)}
        return out


def server_rules(cfg: RunConfig, algorithm: Any, population: int) -> ServerRules:
    """The rules of a run of ``algorithm`` (its declarations and its server side) with
    ``population`` training clients; a one-line ConfigError when the aggregator or DP cannot
    apply (checked before anything is extracted or trained)."""
    sampled = sampled_per_round(cfg, population)
    rounds = algorithm.server.planned_rounds(cfg.rounds)
    if algorithm.communicates and not algorithm.sends_params and (
            cfg.aggregation in ROBUST or cfg.dp != "off"):
        what = f"aggregation={cfg.aggregation!r}" if cfg.dp == "off" else f"dp={cfg.dp!r}"
        raise ConfigError(
            f"algorithm {algorithm.name!r} sends statistics, not parameter updates, so "
            f"{what} does not apply to it; run it with aggregation=weighted (or "
            f"uniform) and dp=off (its own options say what privacy it offers)")
    why = getattr(algorithm, "not_a_mean", "")
    if algorithm.communicates and why and (cfg.aggregation in ROBUST or cfg.dp != "off"):
        if cfg.aggregation in ROBUST:
            raise ConfigError(
                f"aggregation={cfg.aggregation!r} does not apply to algorithm "
                f"{algorithm.name!r}: it {why}; use aggregation=weighted (or uniform)")
        raise ConfigError(
            f"dp={cfg.dp!r} does not apply to algorithm {algorithm.name!r}: it {why}, which "
            f"DP's clipped noisy mean cannot bound; run it with dp=off")
    if algorithm.communicates and cfg.aggregation in SELECTING:
        if algorithm.server.sends_extras():
            raise ConfigError(
                f"aggregation={cfg.aggregation!r} selects whole updates, but algorithm "
                f"{algorithm.name!r} also sends per-client extras (control variates) that "
                f"the selection would have to follow; use median or trimmed-mean with it")
        flower_aggregate()  # Flower's implementation: a one-line error now if it is missing
        need = min_updates(cfg.aggregation, cfg.byzantine)
        if sampled < need:
            raise ConfigError(
                f"aggregation={cfg.aggregation!r} with byzantine={cfg.byzantine} needs at least "
                f"{need} updates a round, but {sampled} clients train per round; lower "
                f"byzantine, or add clients (clients_per_domain, clients_per_round)")
        if cfg.aggregation == "multikrum" and cfg.multikrum_keep > sampled:
            raise ConfigError(f"multikrum_keep={cfg.multikrum_keep} is more than the {sampled} "
                              f"clients that train per round")
    plan = None
    if cfg.dp != "off" and algorithm.communicates:
        if not algorithm.aggregates_mean or algorithm.server.sends_extras():
            raise ConfigError(
                f"dp bounds what each client's shared parameters tell; algorithm "
                f"{algorithm.name!r} also sends per-client extras, which would leak: run it "
                f"without dp")
        plan = privacy.plan(cfg.dp, cfg.dp_clipping_norm, cfg.dp_noise_multiplier,
                            cfg.dp_epsilon, cfg.dp_delta, rounds, sampled, population)
    return ServerRules(plan.rounds if plan else rounds, sampled, selection_rule(cfg), plan)


def aggregate_round(algorithm: Aggregator, current: Params, updates: Sequence[ClientUpdate],
                    server_state: State, rules: ServerRules, seed: int, server_round: int,
                    noise: torch.Generator | None = None) -> tuple[Params, State]:
    """The next global parameters (and server state) from the round's accepted updates.

    Without DP: the algorithm's ``aggregate``. With DP: every update is clipped to the
    clipping norm (again, when clients clipped already: the bound must not rest on them),
    the clipped updates are summed, noised and divided by the clients sampled
    (:func:`fedclip.privacy.noisy_mean`); that one private mean is the round's update for the
    algorithm's ``aggregate`` (a server optimizer still takes its step on it). The noise comes
    from ``noise`` (tests inject one), by default :func:`fedclip.privacy.secret_generator`:
    nothing written or sent, ``seed`` and ``server_round`` included, regenerates it (both are
    kept for the callers; they no longer seed anything here)."""
    plan = rules.privacy
    if plan is None or not updates:
        return algorithm.aggregate(current, updates, server_state)
    shared = algorithm.shared(current)
    clipped = [privacy.clip_update(u.params, shared, plan.clipping_norm) for u in updates]
    mean = privacy.noisy_mean(shared, clipped, plan.sampled, plan.clipping_norm,
                              plan.noise_multiplier,
                              noise if noise is not None else privacy.secret_generator())
    loss = sum(u.loss for u in updates) / len(updates)
    one = ClientUpdate(mean, {}, sum(u.num_examples for u in updates), loss, weight=1.0)
    return algorithm.aggregate(current, [one], server_state)


def outliers(algorithm: Aggregator, current: Params, updates: Mapping[str, ClientUpdate],
             config: RoundConfig, norm_factor: float,
             distances: Mapping[str, float] | None = None) -> dict[str, str]:
    """Updates too far from the global parameters (client -> why), by two rules that no
    reply can widen (``norm_factor`` 0: off):

    * a ceiling, any round: ``norm_factor`` x the most an honest client moves
      (``Algorithm.update_bound``: K Adam steps of the round's lr over the shared parameters,
      K from the train size declared at discovery). It does not grow with the global
      parameters, so an attacker cannot raise it round after round. (For an algorithm without
      such a bound: ``norm_factor`` x the global parameters' norm.)
    * with three updates or more: ``norm_factor`` x the round's median distance, floored at
      the client's own bound / ``norm_factor`` (an honest update is never rejected because
      colluders echo the global parameters and pull the median to zero).

    An honest client stays under both (its Adam steps move it at most about its bound), so
    in-process runs, whose clients are honest, are unchanged by them; an attacker that stays
    under them still moves the mean, which is what the robust aggregators are for."""
    if norm_factor <= 0 or not updates:
        return {}

    dist = dict(distances) if distances is not None else {
        c: distance(u.params, current) for c, u in updates.items()}
    bound = {c: algorithm.update_bound(current, u.num_examples, config)
             for c, u in updates.items()}
    scale = max(privacy.tensor_norm(algorithm.shared(current)), 1.0)
    out = {}
    for c, d in dist.items():
        unit = bound[c]
        if unit is not None and d > norm_factor * unit:
            out[c] = (f"update moved {d:.3g} from the global parameters, over "
                      f"{norm_factor:g} x {unit:.3g}, the most its local steps move")
        elif unit is None and d > norm_factor * scale:
            out[c] = (f"update moved {d:.3g} from the global parameters, over "
                      f"{norm_factor:g} x their norm {scale:.3g}")
    if len(updates) >= 3:
        median = float(torch.tensor(list(dist.values())).median())
        for c, d in dist.items():
            floor = (bound[c] or 0.0) / norm_factor
            if c not in out and d > norm_factor * max(median, floor, 1e-12):
                out[c] = (f"update norm {d:.3g} is over {norm_factor:g} x the round's "
                          f"median {median:.3g}")
    return out


SECURE_AGGREGATIONS = ("weighted", "uniform")


def secure_sum_refusal(algorithm: Any) -> str | None:
    """Why a run cannot aggregate through a secure sum (SecAgg+: the server sees only the
    weighted mean), or None: per-client extras, client state and robust rules need the
    individual updates, and so does server-side DP's clipping."""
    cfg, name = algorithm.cfg, algorithm.name
    if not algorithm.runs_on_flower:
        return f"algorithm {name!r} does not run on Flower; run it in-process"
    if getattr(algorithm, "not_a_mean", ""):
        return (f"algorithm {name!r} {algorithm.not_a_mean}, which a secure sum cannot "
                f"compute; run it without SecAgg+")
    if not algorithm.aggregates_mean:
        return (f"algorithm {name!r} sends per-client extras with its update, which a secure "
                f"sum cannot carry; run it without SecAgg+")
    if algorithm.keeps_own_models:
        return (f"algorithm {name!r} keeps a model per client (personal parameters or "
                f"state), which SecAgg+'s legacy client cannot keep; run it without SecAgg+")
    if cfg.optimizer_state == "keep":
        return "optimizer_state=keep keeps client state; SecAgg+ runs with 'reset'"
    if cfg.aggregation not in SECURE_AGGREGATIONS:
        return (f"aggregation={cfg.aggregation!r} needs the individual updates, which SecAgg+ "
                f"hides; use {' or '.join(SECURE_AGGREGATIONS)}")
    if cfg.dp == "server":
        return ("dp=server clips the individual updates, which SecAgg+ hides; use dp=client "
                "(each client clips its own update, the server noises the secure sum)")
    return None


# --- the one server ------------------------------------------------------------------------
DIVERGED = "its training diverged (a non-finite loss or weights)"
RoundObserver = Callable[[FederationState, RoundRecord], None]


class AggregateNotFinite(TrainingError):
    """A round's aggregate has a non-finite value: the round is refused and recorded, and the
    run stops with the last good checkpoint kept (the same in every runtime)."""


@dataclass(frozen=True)
class RoundPlan:
    """What the server decided for one round before any client trains."""

    round: int
    clients: tuple[str, ...]  # the training clients sampled for it, sorted
    config: RoundConfig  # the hyperparameters every client trains with
    weights: Mapping[str, float]  # each sampled client's aggregation weight (capped)
    weight_cap: float | None  # the largest weight (SecAgg+ clients weigh themselves under it)
    evaluated: bool  # whether the round's parameters are evaluated
    last: bool  # whether it is the run's last round

    def extras(self, server: Server, client: str) -> dict[str, torch.Tensor]:
        """What travels down to ``client`` beside the global parameters."""
        return server.side.client_extras(server.state.server_state, client)


class Server:
    """Every decision a server makes about a held-out run, for every runtime.

    The drivers (the in-process runner, the Flower strategy, the SecAgg+ workflow) only move
    messages: they ask :meth:`plan` what a round is, hand the clients' updates to
    :meth:`accept` (after their own transport checks: shapes, dtypes, who answered), hand the
    round's evaluation to :meth:`complete`, and end with :meth:`finish`. Everything else
    (sampling, the round's configuration, weights and their cap, the distance rule, the
    extras' bounds, differential privacy, aggregation, the one policy for a non-finite
    aggregate, which rounds are evaluated, the best-round rule, checkpoints, callbacks, the
    DP budget, the result and the adapter files) is decided here, once.

    Parameters
    ----------
    algorithm
        The run's algorithm, told what the runtime knows (``Runtime``).
    sizes
        Every training client's train size, as declared (discovery, or the local data).
    run
        The held-out run's files (:class:`fedclip.core.run_folder.HeldoutRun`); None: none.
    callbacks
        :mod:`fedclip.callbacks` objects: every completed round and the result.
    observers
        Functions called with the state and each completed round (progress, tests).
    noise
        The generator of DP noise (None: a secret one, drawn from the OS's entropy).
    """

    def __init__(self, algorithm: Any, sizes: Mapping[str, int], run: Any = None, *,
                 callbacks: Sequence[Any] = (), observers: Sequence[RoundObserver] = (),
                 noise: torch.Generator | None = None, quantum: float = 1e-6) -> None:
        self.algorithm, self.cfg = algorithm, algorithm.cfg
        self.side = algorithm.server  # its server side: the hooks this server calls
        self.sizes = dict(sizes)
        self.run, self.callbacks, self.observers = run, list(callbacks), list(observers)
        # the held-out domain this server's rounds are reported under (cfg.heldout may say
        # "all": the run folder knows which one this is)
        self.heldout = run.heldout if run is not None else self.cfg.heldout
        self.noise, self.quantum = noise, quantum
        self.rules = server_rules(self.cfg, algorithm, len(self.sizes))
        self.weights = client_weights(self.sizes, self.cfg)
        self.cap = weight_cap(self.sizes, self.cfg) if self.cfg.aggregation in (
            "weighted", "multikrum") else None
        self.state = FederationState(0, None)
        self.pending: RoundRecord | None = None  # accepted, not yet completed
        self.log: list[str] = []  # warnings of the run, in order (drivers log them too)
        self.moved: list[float | None] = []  # how far each round moved the global model

    # --- start ----------------------------------------------------------------------------
    def start(self, init: Params | None, resumed: FederationState | None = None
              ) -> FederationState:
        """The state the run starts from: ``resumed`` (its parameters checked against
        ``init``, the algorithm's fresh ones), or round 0 with ``init`` (not yet evaluated:
        round 0 is completed like any other round, through :meth:`complete`)."""
        if resumed is not None:
            if self.run is not None:
                self.run.check_shapes(init)
            self.state = resumed
        else:
            server_state = self.side.init_server_state(init) if init is not None else {}
            self.state = FederationState(0, init, server_state=server_state)
        return self.state

    @property
    def started(self) -> bool:
        """Whether round 0 is recorded (a fresh run records it first)."""
        return bool(self.state.history)

    @property
    def trains(self) -> bool:
        """Whether rounds remain to train."""
        return self.algorithm.trains and self.state.round < self.rules.rounds

    def evaluated(self, server_round: int) -> bool:
        """The one rule of which rounds are evaluated: every ``eval_every``-th, round 0 and
        the run's last round (``rules.rounds``: fewer under a DP budget)."""
        return (server_round == 0 or server_round % self.cfg.eval_every == 0
                or server_round == self.rules.rounds)

    # --- a round --------------------------------------------------------------------------
    def plan(self) -> RoundPlan | None:
        """The next round (None: the run has trained every round it may)."""
        if not self.trains:
            return None
        rnd = self.state.round + 1
        chosen = tuple(sorted(sample_clients(sorted(self.sizes), self.cfg.clients_per_round,
                                             self.cfg.seed, rnd)))
        return RoundPlan(rnd, chosen, self.algorithm.round_config(rnd),
                         {c: self.weights[c] for c in chosen}, self.cap, self.evaluated(rnd),
                         rnd >= self.rules.rounds)

    def warn(self, message: str) -> None:
        """A warning of the run (logged; drivers may show it)."""
        self.log.append(message)
        logger.warning("%s", message)

    def accept(self, plan: RoundPlan, updates: Mapping[str, ClientUpdate], *,
               rejected: Mapping[str, str] | None = None,
               missing: Sequence[str] | None = None,
               sent: int = 0, received: int = 0, seconds: float = 0.0,
               node_seconds: dict[str, float] | None = None) -> RoundRecord:
        """The round's updates (``rejected``: what the driver's own checks refused) through
        the server's rules: the extras' bounds, the distance rule, the weights, DP and the
        algorithm's aggregate. Returns the round's record, to be completed with its
        evaluation (:meth:`complete`).

        A round whose every answer diverged stops the run (``TrainingError``); a round whose
        aggregate is not finite is recorded as refused and stops the run
        (:class:`AggregateNotFinite`); the last good checkpoint is kept either way."""
        algo, rnd = self.algorithm, plan.round
        rejected = dict(rejected or {})
        kept: dict[str, ClientUpdate] = {}
        for client, update in sorted(updates.items()):
            if client not in plan.weights:
                rejected[client] = "not a training client sampled for this round"
                continue
            why = self.side.check_update(client, update, self.state.params)
            if why is not None:
                rejected[client] = why
                continue
            if update.extras:
                why = self.side.check_extras(self.state.params, update,
                                             self.state.server_state, plan.config,
                                             self.quantum)
                if why is not None:
                    rejected[client] = why
                    continue
            kept[client] = update
        dist: dict[str, float] | None = None
        if algo.communicates:  # the distance rule (nothing is sent otherwise)
            # each update's distance from the global parameters, once for both rules below
            moved = {c: self.side.as_global(self.state.params, u.params)
                     for c, u in kept.items()} if algo.sends_params else {}
            dist = {c: distance(p, self.state.params)
                    for c, p in moved.items()} if algo.sends_params else None
            for client, why in outliers(self.side, self.state.params, kept, plan.config,
                                        self.cfg.norm_factor, dist).items():
                rejected[client] = why
                del kept[client]
        for client, why in sorted(rejected.items()):
            self.warn(f"round {rnd}: rejected the update of {client}: {why}")
        noticed = [f"round {rnd}: {w}" for w in suspicious(
            self.state.params, {c: moved[c] for c in kept},
            distances={c: dist[c] for c in kept})] if dist else []
        absent = sorted(set(plan.clients) - set(kept) - set(rejected) | set(missing or ()))
        if absent:
            self.warn(f"round {rnd}: no update from {', '.join(absent)}")
        record = RoundRecord(rnd, {c: u.loss for c, u in kept.items()}, seconds, sent,
                             received, missing=absent if missing is not None else None,
                             rejected=rejected or None,
                             epsilon=self.rules.epsilon(rnd), node_seconds=node_seconds)
        for warning in noticed:
            self.warn(warning)
        record.warnings = noticed or None
        if not kept and rejected and set(rejected.values()) == {DIVERGED}:
            raise TrainingError(
                f"training diverged on every client that answered in round {rnd} (lr "
                f"{plan.config.lr:g}); lower the learning rate. The last good checkpoint is "
                f"kept")
        if not algo.communicates:
            pass  # every parameter is personal: nothing to aggregate
        elif kept:
            ordered = [replace(u, weight=plan.weights[c]) for c, u in kept.items()]
            try:
                new, server_state = aggregate_round(self.side, self.state.params, ordered,
                                                    self.state.server_state, self.rules,
                                                    self.cfg.seed, rnd, noise=self.noise)
            except TooFewUpdates as exc:  # rejections left too few for the rule's guarantee
                self.warn(f"round {rnd}: the global parameters are unchanged: {exc}")
            else:
                record.metrics = self.side.round_metrics(self.state.params, new, ordered) or None
                self._commit(record, new, server_state)
        else:
            self.warn(f"round {rnd}: no valid update; the global parameters are unchanged")
        self.state.round = rnd
        self.pending = record
        return record

    def refuse(self, plan: RoundPlan, rejected: Mapping[str, str]) -> RoundRecord:
        """A round that produced no aggregate (SecAgg+: shares that do not reconstruct):
        recorded with why, the global parameters unchanged."""
        for client, why in sorted(rejected.items()):
            self.warn(f"round {plan.round}: {client}: {why}")
        record = RoundRecord(plan.round, rejected=dict(rejected) or None,
                             epsilon=self.rules.epsilon(plan.round))
        self.state.round = plan.round
        self.pending = record
        return record

    def accept_mean(self, plan: RoundPlan, mean: Params, answered: int,
                    losses: Mapping[str, float], *, diverged: int = 0, seconds: float = 0.0,
                    rejected: Mapping[str, str] | None = None, refused: str | None = None,
                    sent: int = 0, received: int = 0) -> RoundRecord:
        """SecAgg+: the round as one securely computed weighted mean of ``answered`` clients'
        parameters. With ``dp=client`` the clients clipped their own updates and the server
        noises the sum (:func:`fedclip.privacy.noisy_mean`); the algorithm's ``aggregate``
        takes its step on that one update."""
        if refused is not None:  # an implausible secure mean: no aggregate this round
            return self.refuse(plan, {**(rejected or {}), "secure mean": refused})
        rnd, plan_dp = plan.round, self.rules.privacy
        record = RoundRecord(rnd, dict(losses), seconds, sent, received,
                             rejected=dict(rejected or {}) or None,
                             epsilon=self.rules.epsilon(rnd))
        if plan_dp is not None and all_finite(mean):
            current = self.state.params
            total = {k: current[k] + (v - current[k]) * answered for k, v in mean.items()}
            mean = privacy.noisy_mean(current, [total], plan_dp.sampled, plan_dp.clipping_norm,
                                      plan_dp.noise_multiplier,
                                      self.noise if self.noise is not None
                                      else privacy.secret_generator())
        if answered == 0 and diverged:
            raise TrainingError(
                f"training diverged on every client that answered in round {rnd} (lr "
                f"{plan.config.lr:g}); lower the learning rate. The last good checkpoint is "
                f"kept")
        if answered == 0:
            self.warn(f"round {rnd}: no valid update; the global parameters are unchanged")
        else:
            one = ClientUpdate(mean, {}, 0, float("nan"))
            new, server_state = self.side.aggregate(self.state.params, [one],
                                                         self.state.server_state)
            self._commit(record, new, server_state)
        self.state.round = rnd
        self.pending = record
        return record

    def _commit(self, record: RoundRecord, new: Params, server_state: State) -> None:
        """The one policy for a non-finite aggregate: refused, recorded, the run stops. A
        global model that has stopped moving while clients report training is said."""
        if not all_finite(new):
            record.rejected = {**(record.rejected or {}),
                               "aggregate": "not finite; the global parameters are unchanged"}
            self.state.history.append(record)
            if self.run is not None:
                self.run.write_history(self.state)
            raise AggregateNotFinite(
                f"round {record.round}: the aggregate is not finite; lower the learning rate "
                f"(or the server's). The last good checkpoint is kept")
        self.moved.append(privacy.update_norm(self.algorithm.shared(new),
                                              self.algorithm.shared(self.state.params))
                          if record.train_loss else None)
        if stalled(self.moved, STALL_ROUNDS):
            warning = (f"round {record.round}: the global parameters have not moved for "
                       f"{STALL_ROUNDS} rounds in which clients reported training (echoing "
                       f"clients, a rule that keeps selecting them, or an lr of 0)")
            self.warn(warning)
            record.warnings = [*(record.warnings or []), warning]
        self.state.global_params, self.state.server_state = new, server_state

    def complete(self, record: RoundRecord, evaluation: Evaluation | None) -> RoundRecord:
        """A round's record with its evaluation (val, test, held-out; None: not evaluated):
        into the history, through the best-round rule, checkpointed when due, and to the
        callbacks. Round 0 is completed the same way (``RoundRecord(0)``)."""
        if evaluation is not None:
            record.set_evaluation(*evaluation)
        self.state.history.append(record)
        if record.evaluated:
            self.state.select(record, self.rules.selection)
        if self.run is not None:
            if record.round == 0:
                self.run.checkpoint(self.state)
            else:
                self.run.round_end(self.state, last=record.round >= self.rules.rounds)
        for callback in self.callbacks:
            callback.on_round_end(self.heldout, record)
        for observe in self.observers:
            observe(self.state, record)
        self.pending = None
        return record

    def budget_note(self) -> str | None:
        """A line saying the DP budget ends the run early (None: it does not)."""
        plan = self.rules.privacy
        if plan is None or not plan.stopped_by_budget:
            return None
        return (f"dp: the budget epsilon={plan.budget:g} (delta {plan.delta:g}) allows "
                f"{plan.rounds} of {self.cfg.rounds} rounds; the run stops after round "
                f"{plan.rounds}")

    def influence(self, state: FederationState) -> dict[str, Any]:
        """What results.json says of one client's influence: the most it can move the global
        model in a round relative to an honest client (None: unbounded), what the rules
        tolerate, and the warnings of rounds the server found suspicious."""
        if not self.algorithm.communicates or state.global_params is None:
            return {}
        shared = sum(v.numel() for v in self.algorithm.shared(state.global_params).values())
        bound = influence_bound(self.cfg, list(self.sizes.values()), shared)
        warned = [w for r in state.history for w in r.warnings or []]
        return {"influence": {"bound": bound if math.isfinite(bound) else None,
                              "tolerance": tolerance_note(self.cfg, len(self.sizes)),
                              **({"warnings": warned} if warned else {})}}

    # --- the end --------------------------------------------------------------------------
    def finish(self, zero: RoundRecord, *, personalized: Any, clients: Sequence[Any],
               heldout_images: int, runtime: str, dataset: str, classes: tuple[str, ...],
               logit_scale: float, dim: int, seconds: float, trainable_params: int,
               **extra: Any) -> RunResult:
        """The result (zero-shot, personalization, every round) into the run folder with the
        adapter files: the selected and the last global parameters, and each client's own
        model where the algorithm keeps one and the runtime holds it (in-process)."""
        state, algo = self.state, self.algorithm
        if self.run is None:
            raise RuntimeError("finish needs the run's files (Server(run=...))")
        result = self.run.result(
            state, zero, dataset=dataset, trainable_params=trainable_params, seconds=seconds,
            clients=clients, heldout_images=heldout_images, runtime=runtime,
            personalized=personalized, **extra, **self.rules.extra(state.round),
            **self.influence(state))
        adapters = [("adapter", state.best_params, state.best_round),
                    ("adapter-last", state.global_params, state.round)]
        if algo.keeps_own_models and state.best_params is not None:
            adapters += [(f"adapter-{safe_name(c)}", algo.client.eval_params(
                state.best_params, state.best_client_states.get(c, {})), state.best_round)
                for c in [info.name for info in clients]]
        if not algo.communicates:  # no global adapter at all
            adapters = adapters[2:]
        self.run.finish(result, adapters, classes, logit_scale, dim)
        for callback in self.callbacks:
            callback.on_run_end(self.heldout, result)
        return result
