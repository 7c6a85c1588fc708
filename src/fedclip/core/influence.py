"""One client's influence on the global model, as the run's settings bound it: pure functions
that the server calls each round and that results.json states.

* :func:`influence_bound`: the most one client can move the round's aggregate, as a multiple
  of the most an honest client of median size moves it (the run's weights, aggregator,
  distance rule and DP clipping);
* :func:`tolerated` and :func:`tolerance_note`: how many bad updates per round the
  aggregator's setting tolerates with the run's clients, and the selection rule's tolerance;
* :func:`suspicious`: warnings for identical or zero-distance updates among a round's
  accepted ones (colluders echoing the global model freeze it under Krum or the median);
* :func:`stalled`: the global model has not moved for ``k`` rounds in which updates were
  accepted.

The model of an honest client is the distance rule's (``Algorithm.update_bound``): Adam moves
each of the P shared coordinates by about ``lr`` per step, so a client of ``n`` examples moves
at most about ``B(n) = K(n) lr sqrt(P)``, K its steps per round. lr and sqrt(P) cancel in the
ratios below; only DP's clipping norm is absolute (``shared_params`` gives P).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedclip.aggregation import ROBUST, SELECTING, min_updates
from fedclip.config import RunConfig
from fedclip.core.client import steps_per_round
from fedclip.core.state import selection_rule
from fedclip.sampling import sampled_per_round
from fedclip.tensors import Params, distance


def _per_round(cfg: RunConfig, population: int) -> int:
    """Updates a round aggregates."""
    return sampled_per_round(cfg, population)


def tolerated(cfg: RunConfig, n_clients: int) -> int:
    """How many bad updates per round the aggregator's setting tolerates with ``n_clients``
    training clients (``clients_per_round`` of them per round): the count under which no bad
    update can move a coordinate (median, trimmed mean) or the selection (Krum, Multi-Krum,
    Bulyan) outside what the honest updates do. 0 for the means (one client moves them
    arbitrarily far, up to the distance rule) and for a robust rule whose assumption the
    round's count does not meet."""
    n = _per_round(cfg, n_clients)
    mode = cfg.aggregation
    if mode not in ROBUST or n < 3:
        return 0
    if mode == "median":
        return (n - 1) // 2
    if mode == "trimmed-mean":
        return min(int(cfg.trim_fraction * n), (n - 1) // 2)
    if n < min_updates(mode, cfg.byzantine):
        return 0
    return cfg.byzantine  # krum, multikrum, bulyan: the f they assume


def tolerance_note(cfg: RunConfig, n_clients: int) -> str:
    """One line for results and logs: what the aggregator and the best-round rule tolerate."""

    n = _per_round(cfg, n_clients)
    f = tolerated(cfg, n_clients)
    rule = selection_rule(cfg)
    lying = (n_clients - 1) // 2 if rule == "median" and n_clients >= 3 else 0
    what: str = cfg.aggregation
    if cfg.aggregation == "trimmed-mean":
        what += f" (trim {cfg.trim_fraction:g}: {int(cfg.trim_fraction * n)} cut per end)"
    elif cfg.aggregation in SELECTING:
        what += f" (byzantine={cfg.byzantine})"
    return (f"{what} tolerates {f} bad update{'s' * (f != 1)} of {n} per round; the best "
            f"round by the {rule} val accuracy tolerates {lying} lying client"
            f"{'s' * (lying != 1)} of {n_clients}")


def influence_bound(cfg: RunConfig, sizes: Sequence[int], shared_params: int | None = None
                    ) -> float:
    """The most one client can move the global model in a round, relative to the most an
    honest client of median declared size moves it (1.0: no more than an honest client;
    ``inf``: unbounded), with the clients' declared train ``sizes``.

    * A rule that tolerates a bad update at this client count (:func:`tolerated` >= 1) keeps
      every coordinate (median, trimmed mean) or the selection (Krum family) within what the
      honest updates do: 1.0.
    * Otherwise the aggregate is a mean of every update (``weighted``, ``uniform``, and a
      robust rule that tolerates none here: trimmed mean cutting none, Bulyan or Multi-Krum
      with f = 0, the median of two). Client i weighs ``w_i`` (``weighted``: its size capped
      at ``max_weight_ratio`` x the median size; otherwise 1) and moves at most ``D_i``, the
      distance rule's limit: ``norm_factor`` x ``B_i`` and, with three updates or more,
      ``max(norm_factor x median distance, B_i)`` (the median distance at most ``B`` of the
      median client). The bound is ``max_i (w_i D_i) / (w_med B_med)``: ``inf`` with the
      rule off (``norm_factor`` 0) or with no DP clipping to stop it.
    * With DP every update is clipped to ``dp_clipping_norm`` C (and the mean is uniform):
      ``min(D_max, C) / min(B_med, C)``; without ``shared_params`` (P) the honest client is
      taken to reach C.
    """
    if not sizes:
        raise ValueError("influence_bound needs the clients' declared train sizes")
    if any(s < 0 for s in sizes):
        raise ValueError(f"train sizes must be >= 0, got {list(sizes)}")
    if tolerated(cfg, len(sizes)) >= 1:
        return 1.0
    median_size = float(np.median(sizes))
    n = _per_round(cfg, len(sizes))

    def steps(size: float) -> int:
        return max(steps_per_round(cfg, int(size), cfg.local_epochs), 1)

    honest = steps(median_size)  # B_med in units of lr sqrt(P)
    cap = cfg.max_weight_ratio * median_size if cfg.max_weight_ratio > 0 else math.inf
    weighted = cfg.aggregation in ("weighted", "multikrum") and cfg.dp == "off"
    w_med = min(median_size, cap) if weighted else 1.0
    if w_med <= 0:
        return math.inf
    worst = 0.0
    for size in sizes:
        b = steps(size)
        nf = cfg.norm_factor
        if cfg.dp != "off":
            reach = _dp_ratio(cfg, b, honest, nf, shared_params)
            worst = max(worst, reach)
            continue
        if nf <= 0:
            return math.inf
        d = nf * b
        if n >= 3:
            d = min(d, max(nf * honest, b))
        w = min(float(size), cap) if weighted else 1.0
        worst = max(worst, (w * d) / (w_med * honest))
    return worst


def _dp_ratio(cfg: RunConfig, b: float, honest: float, nf: float, shared_params: int | None
              ) -> float:
    """Under DP (uniform mean of updates clipped to C): min(D, C) / min(B_med, C)."""
    if shared_params is None:
        return 1.0  # the honest client taken to reach the clip, as the attacker does
    unit = cfg.lr * math.sqrt(shared_params)  # lr sqrt(P): B = steps x unit
    c = cfg.dp_clipping_norm
    d = nf * b * unit if nf > 0 else math.inf
    return min(d, c) / min(honest * unit, c)


def _digest(params: Params) -> str:
    h = hashlib.sha256()
    for key in sorted(params):
        t = params[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def suspicious(current: Params, updates: Mapping[str, Params], tolerance: float = 1e-7,
               distances: Mapping[str, float] | None = None) -> list[str]:
    """Warnings about a round's accepted updates (client -> its shared parameters, over the
    keys of ``current`` that it holds): an update within ``tolerance`` x ||current|| of the
    global parameters (it did not train, or echoes the model: colluders doing so freeze it
    under Krum or the median), and updates that are bit-for-bit identical (no two honest
    clients with their own data and batches send the same one). Empty: nothing to say.
    ``distances``: each update's :func:`fedclip.tensors.distance` from ``current`` when the
    caller has them (the server's distance rule does); identical updates have equal
    distances, so only updates that share one are compared tensor by tensor (an honest round
    compares none)."""
    from fedclip.privacy import tensor_norm

    out: list[str] = []
    if not updates:
        return out
    dist = dict(distances) if distances is not None else {
        c: distance(p, current) for c, p in updates.items()}
    scale = max(tensor_norm({k: current[k] for k in next(iter(updates.values()))}), 1.0)
    still = sorted(c for c in updates if dist[c] <= tolerance * scale)
    if still:
        out.append(f"{len(still)} accepted update{'s' * (len(still) != 1)} did not move the "
                   f"global parameters ({', '.join(still)}): clients that did not train, or "
                   f"that echo the global model")
    by_distance: dict[float, list[str]] = {}
    for client in updates:
        by_distance.setdefault(dist[client], []).append(client)
    groups: dict[str, list[str]] = {}
    for clients in by_distance.values():
        if len(clients) > 1:  # only updates that could be identical are hashed
            for client in clients:
                groups.setdefault(_digest(updates[client]), []).append(client)
    for clients in sorted(sorted(g) for g in groups.values() if len(g) > 1):
        if set(clients) <= set(still):
            continue  # already said: they all equal the global parameters
        out.append(f"clients {', '.join(clients)} sent identical updates: colluding, or "
                   f"one update replayed")
    return out


def stalled(history_norms: Sequence[float | None], k: int = 3, tolerance: float = 1e-9
            ) -> bool:
    """Whether the global model has not moved for the last ``k`` rounds in which clients'
    updates were accepted. ``history_norms`` holds, per round in order, how far the global
    parameters moved (L2, ``privacy.update_norm`` of the new against the old), or None for a
    round with no accepted update (skipped: nobody reported training); "not moved" is at most
    ``tolerance`` (an honest round moves them by about lr sqrt(P) or more)."""
    if k < 1:
        raise ValueError("stalled needs k >= 1 rounds")
    trained = [m for m in history_norms if m is not None]
    return len(trained) >= k and all(m <= tolerance for m in trained[-k:])
