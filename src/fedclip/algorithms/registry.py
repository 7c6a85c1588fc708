"""The algorithm registry: algorithms by name.

Adding one is one new module in this package (it is found and imported automatically) or, from
outside the package, an entry point in the group ``fedclip.algorithms``. Each algorithm class
declares its hyperparameters as a small pydantic model (``Options``), set with
``--set NAME.KEY=VALUE`` or the Flower run-config key ``NAME.KEY``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from fedclip.errors import ConfigError

if TYPE_CHECKING:
    from fedclip.algorithms.base import Algorithm, Runtime
    from fedclip.config import RunConfig

ALGORITHMS: dict[str, type[Algorithm]] = {}
_LOADED = False


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make ``cls`` known by its ``name``, after checking that its declared
    capabilities agree (``Algorithm.contradiction``: a TypeError naming the rule)."""
    rule = cls.contradiction()
    if rule is not None:
        raise TypeError(f"algorithm {cls.name!r} ({cls.__module__}.{cls.__qualname__}) is "
                        f"not registered: {rule}")
    ALGORITHMS[cls.name] = cls
    return cls


def _load() -> None:
    """Import every module of this package, then the ``fedclip.algorithms`` entry points."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    package = __name__.rpartition(".")[0]
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if info.name not in ("base", "registry"):
            importlib.import_module(f"{package}.{info.name}")
    from importlib.metadata import entry_points

    for ep in entry_points(group="fedclip.algorithms"):
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must not break the built-in algorithms
            import logging

            logging.getLogger(__name__).warning("algorithm plugin %s failed to load: %s",
                                                ep.name, exc)


def names() -> list[str]:
    """Every registered algorithm's name, sorted (built-ins and plugins)."""
    _load()
    return sorted(ALGORITHMS)


def algorithm_class(name: str) -> type[Algorithm]:
    """The class registered as ``name`` (a one-line ConfigError listing the names if none)."""
    _load()
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}; use one of {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name]


def check_options(options: dict[str, dict[str, Any]]) -> None:
    """Every ``NAME.KEY`` must be a hyperparameter of algorithm ``NAME`` with a valid value."""
    for name, values in options.items():
        algorithm_class(name).parse_options(values)


def get_algorithm(cfg: RunConfig, runtime: Runtime | None = None) -> Algorithm:
    """The configured algorithm, after checking every ``NAME.KEY`` option of the run, told
    what the runtime knows (``runtime``: the class prompts and features, the logit scale,
    the number of clients; none while a run is only being validated)."""
    check_options(cfg.options)
    return algorithm_class(cfg.algorithm)(cfg, runtime)
