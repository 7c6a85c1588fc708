"""Partial participation: which clients train in a round, the same in both runtimes.

``clients_per_round = k`` (0: all) samples k of the planned training clients each round,
without replacement, from a generator seeded by (seed, round) alone, over the clients'
names in sorted order: the in-process runner and the Flower server draw the same clients.
"""

from __future__ import annotations

import numpy as np

from fedclip.config import RunConfig


def sample_clients(names: list[str], k: int, seed: int, server_round: int) -> list[str]:
    ordered = sorted(names)
    if k <= 0 or k >= len(ordered):
        return ordered
    rng = np.random.default_rng([seed, server_round, 0x5A])
    return sorted(ordered[i] for i in rng.choice(len(ordered), size=k, replace=False))


def sampled_per_round(cfg: RunConfig, population: int) -> int:
    """How many clients train in a round (``clients_per_round``, 0: all)."""
    k = cfg.clients_per_round
    return population if k <= 0 or k >= population else k
