"""Algorithms, registered by name. Adding one is one new module here plus its import below."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedclip.errors import ConfigError

if TYPE_CHECKING:
    from fedclip.algorithms.base import Algorithm
    from fedclip.config import RunConfig

ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    ALGORITHMS[cls.name] = cls
    return cls


def get_algorithm(cfg: RunConfig) -> Algorithm:
    if cfg.algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {cfg.algorithm!r}; use one of "
                          f"{', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[cfg.algorithm](cfg)


from fedclip.algorithms import (  # noqa: E402, F401  (registration)
    fedclip,
    fedprox,
    full,
    local,
    zeroshot,
)
