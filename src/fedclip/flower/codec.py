"""Parameters <-> Flower records, run config <-> RunConfig, and checks on what comes back."""

from __future__ import annotations

import math
from typing import Any

import torch
from flwr.app import ArrayRecord
from pydantic import ValidationError

from fedclip.config import FlowerSettings, RunConfig
from fedclip.errors import ConfigError
from fedclip.tensors import Params

TRANSFER_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

FLOWER_KEYS = FlowerSettings.keys()  # run-config keys of the Flower layer, with defaults


def encode(params: Params, transfer: str = "fp32") -> ArrayRecord:
    """Parameters as an ArrayRecord in the transfer dtype, on the CPU."""
    dtype = TRANSFER_DTYPES[transfer]
    return ArrayRecord({k: v.detach().to("cpu", dtype).contiguous() for k, v in params.items()})


def decode(record: ArrayRecord, device: str | torch.device = "cpu") -> Params:
    """An ArrayRecord back as fp32 tensors on ``device``."""
    return {k: v.to(device, torch.float32) for k, v in record.to_torch_state_dict().items()}


def payload_bytes(record: ArrayRecord) -> int:
    """The bytes of a record's arrays."""
    return sum(int(a.numpy().nbytes) for a in record.values())


def check_arrays(record: ArrayRecord, expected: dict[str, torch.Size], transfer: str,
                 what: str = "update") -> tuple[Params | None, str | None]:
    """Decode ``record`` if it holds exactly ``expected`` (names, shapes, the run's transfer
    dtype, finite values); else return why not."""
    try:
        arrays = record.to_torch_state_dict()
    except Exception as exc:  # a malformed record: never let it reach the aggregate
        return None, f"{what} is not decodable ({type(exc).__name__})"
    if set(arrays) != set(expected):
        return None, f"{what} keys {sorted(set(arrays) ^ set(expected))} differ from the expected"
    dtype = TRANSFER_DTYPES[transfer]
    for key, value in arrays.items():
        if tuple(value.shape) != tuple(expected[key]):
            return None, (f"{what} {key} has shape {tuple(value.shape)}, expected "
                          f"{tuple(expected[key])}")
        if value.dtype != dtype:
            return None, f"{what} {key} is {value.dtype}, this run transfers {transfer}"
        if not torch.isfinite(value).all():
            return None, f"{what} {key} contains NaN or inf"
    return {k: v.float() for k, v in arrays.items()}, None


def finite_number(value: Any, low: float = -math.inf, high: float = math.inf) -> float | None:
    """``value`` as a float when it is a real, finite number in [low, high]; else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and low <= value <= high else None


def require_one_heldout(cfg: RunConfig) -> None:
    """A Flower run trains one federation: one held-out domain, named."""
    if cfg.heldout == "all":
        raise ConfigError("on Flower, heldout must name one domain (one run per held-out "
                          "domain: flwr run . -c \"heldout='sketch'\", then the next); "
                          "heldout='all' is for fedclip run")


def run_config_to_cfg(run_config: dict[str, Any], **overrides: Any
                      ) -> tuple[RunConfig, FlowerSettings]:
    """Split Flower's run config into a validated RunConfig and the Flower-only options.

    ``NAME.KEY`` keys (Flower flattens a ``[tool.flwr.app.config.NAME]`` table to them) are
    algorithm options, as ``--set NAME.KEY=VALUE`` is on the command line."""
    flower: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for key, value in run_config.items():
        if key in FLOWER_KEYS:
            flower[key] = value
        elif "." in key:
            algo, _, name = key.partition(".")
            values[f"{algo}.{name.replace('-', '_')}"] = value
        else:
            values[key.replace("-", "_")] = value
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
    if isinstance(values.get("classes"), str):  # a run-config value is a string
        values["classes"] = tuple(c.strip() for c in values["classes"].split(",")
                                  if c.strip()) or None
    if isinstance(values.get("prompt_templates"), str):  # "|"-separated in a run config
        values["prompt_templates"] = tuple(t for t in values["prompt_templates"].split("|")
                                           if t.strip()) or None
    values.update(overrides)
    return RunConfig.validated(values), settings
