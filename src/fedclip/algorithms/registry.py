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

# The built-in algorithms by name, with their one-line summaries, known without importing any
# of them (importing them all takes seconds: torch, torchvision): what help texts list. A test
# keeps this table equal to the registered classes' ``name`` and ``summary``.
BUILTIN: dict[str, str] = {
    "clip-adapter": "CLIP-Adapter: residual bottleneck MLP on the image features, averaged",
    "ditto": "a personal adapter per client, regularized toward the averaged global one",
    "fedadam": "FedCLIP clients; the server steps Adam on the averaged delta",
    "fedavg-cnn": "a torchvision classifier on pixels (the paper's AlexNet FedAvg baseline)",
    "fedavg-full": "both CLIP encoders fine-tuned (the paper's FedAvg baseline)",
    "ffa-lora": "LoRA with A frozen at a seeded init, only B trained and sent (exact)",
    "fedavgm": "FedCLIP clients; server momentum on the averaged delta",
    "fedmaple": "MaPLe: deep text prompts coupled to vision prompts, frozen encoders, averaged",
    "fedclip": "the attention adapter; the server averages",
    "fedotp": "global prompt (averaged) + personal local prompt, patch tokens matched to them "
              "by unbalanced OT",
    "fedit": "LoRA on CLIP's encoders, A and B averaged separately (inexact)",
    "fedpft": "one round: per-class Gaussian mixtures of the features; server trains the head",
    "fedpgp": "a global prompt (averaged) plus a personal low-rank term (never sent)",
    "fedprox": "the adapter, with mu/2 ||w - w_global||^2 in the local loss",
    "fedprox-cnn": "the same with the proximal term (the paper's AlexNet FedProx baseline)",
    "fedprox-full": "the same, plus the proximal term",
    "fedtpg": "a prompt generator from the class names' embeddings, averaged (open-vocabulary)",
    "flora": "LoRA adapters stacked (exact, a rank per client), merged each round",
    "fedyogi": "FedCLIP clients; the server steps Yogi on the averaged delta",
    "linear-probe": "a linear (cosine) classifier on the features, zero-shot initialised",
    "local": "each client its own adapter, alone (the lower bound for collaboration)",
    "personal-transform": "a personal feature transform (rotation) per client, a shared "
                          "class head",
    "promptfl": "learned prompt context (CoOp) through the frozen text encoder, averaged",
    "promptfolio": "a global prompt (averaged) mixed with a personal local prompt (never sent)",
    "prototypes": "training-free: class prototypes (feature means) as a cache beside zero-shot",
    "scaffold": "the adapter with SCAFFOLD control variates (server and client state)",
    "trip": "prompt experts mixed per image by parameter-free token routing (clustering + "
            "matching), zero-shot KL",
    "trip-lite": "TRIP with ~1K values sent a round: 2 experts of 1 context token",
    "zeroshot": "nothing: the backbone's class-prompt classifier",
}


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


def listed() -> list[str]:
    """Every algorithm's name without importing one: the built-ins and the names of the
    ``fedclip.algorithms`` entry points (a plugin's entry point is named after its
    algorithm), sorted. :func:`names` imports them all and is the authority."""
    from importlib.metadata import entry_points

    plugins = {ep.name for ep in entry_points(group="fedclip.algorithms")}
    return sorted(set(BUILTIN) | plugins | set(ALGORITHMS))


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
