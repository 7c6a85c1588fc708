"""A Flower run config as a RunConfig (its keys read as ``--set`` reads them:
:func:`fedclip.config.flat_settings`) and the Flower layer's own settings
(:class:`fedclip.config.FlowerSettings`)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from fedclip.config import FlowerSettings, RunConfig, flat_settings
from fedclip.errors import ConfigError

FLOWER_KEYS = FlowerSettings.keys()  # run-config keys of the Flower layer, with defaults


def require_one_heldout(cfg: RunConfig) -> None:
    """A Flower run trains one federation: one held-out domain, named, on every class."""
    if cfg.heldout == "all":
        raise ConfigError("on Flower, heldout must name one domain (one run per held-out "
                          "domain: flwr run . -c \"heldout='sketch'\", then the next); "
                          "heldout='all' is for fedclip run")
    if cfg.protocol == "base2novel":
        raise ConfigError("protocol=base2novel runs in-process (fedclip run, fedclip compare): "
                          "Flower's evaluation does not score the novel classes yet")


def run_config_to_cfg(run_config: dict[str, Any], **overrides: Any
                      ) -> tuple[RunConfig, FlowerSettings]:
    """Split Flower's run config into a validated RunConfig and the Flower-only options.

    ``NAME.KEY`` keys (Flower flattens a ``[tool.flwr.app.config.NAME]`` table to them) are
    algorithm options, as ``--set NAME.KEY=VALUE`` is on the command line."""
    flower = {k: v for k, v in run_config.items() if k in FLOWER_KEYS}
    values = flat_settings({k: v for k, v in run_config.items() if k not in FLOWER_KEYS})
    try:
        settings = FlowerSettings(**{k.replace("-", "_"): v for k, v in flower.items()})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}"
                             for e in exc.errors())
        raise ConfigError(f"invalid Flower setting ({problems})") from None
    if settings.data_root:
        values["data_root"] = settings.data_root
    if settings.cache_dir:
        values["cache_dir"] = settings.cache_dir
    values.update(overrides)
    return RunConfig.validated(values), settings
