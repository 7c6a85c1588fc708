"""What a server does with a round, in every runtime: the rules fixed before round 1 (how
many rounds, the privacy mechanism, whether the aggregator can apply) and the aggregation
step itself (robust rules, differential privacy), so that the in-process runner, the Flower
strategy and SecAgg+ share one implementation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedclip import privacy
from fedclip.aggregation import ROBUST, SELECTING, flower_aggregate, min_updates
from fedclip.config import RunConfig
from fedclip.core.client import ClientUpdate, RoundConfig
from fedclip.errors import ConfigError
from fedclip.privacy import PrivacyPlan
from fedclip.tensors import Params, State


class Aggregator(Protocol):
    """The hooks of :class:`fedclip.algorithms.base.Algorithm` the server step needs."""

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


def sampled_per_round(cfg: RunConfig, population: int) -> int:
    """How many clients train in a round (``clients_per_round``, 0: all)."""
    k = cfg.clients_per_round
    return population if k <= 0 or k >= population else k


def selection_rule(cfg: RunConfig) -> str:
    """How the best round is chosen: by the mean of the clients' val accuracies, or by their
    median, which one client cannot move outside the range of the others' values; ``selection``
    says which ('auto': the median with a robust aggregator, which assumes some clients lie)."""
    if cfg.selection != "auto":
        return cfg.selection
    return "median" if cfg.aggregation in ROBUST else "mean"


def server_rules(cfg: RunConfig, algorithm: Aggregator, population: int) -> ServerRules:
    """The rules of a run with ``population`` training clients; a one-line ConfigError when
    the aggregator or DP cannot apply (checked before anything is extracted or trained)."""
    sampled = sampled_per_round(cfg, population)
    rounds = algorithm.planned_rounds(cfg.rounds)
    if algorithm.communicates and not algorithm.sends_params and (
            cfg.aggregation in ROBUST or cfg.dp != "off"):
        what = f"aggregation={cfg.aggregation!r}" if cfg.dp == "off" else f"dp={cfg.dp!r}"
        raise ConfigError(
            f"algorithm {algorithm.name!r} sends statistics, not parameter updates, so "
            f"{what} does not apply to it; run it with aggregation=weighted (or "
            f"uniform) and dp=off (its own options say what privacy it offers)")
    if algorithm.communicates and cfg.aggregation in SELECTING:
        if algorithm.sends_extras():
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
        if not algorithm.aggregates_mean or algorithm.sends_extras():
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
             config: RoundConfig, norm_factor: float) -> dict[str, str]:
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

    dist = {c: privacy.update_norm(u.params, current) for c, u in updates.items()}
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
