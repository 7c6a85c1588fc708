"""Adapter parameters <-> Flower records, and checks on what clients send back."""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedclip.adapters import Params
from fedclip.config import RunConfig

TRANSFER_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

# run-config keys that belong to the Flower layer, not to RunConfig (with their defaults)
FLOWER_KEYS: dict[str, Any] = {
    "transfer": "fp32",  # adapter weights on the wire: fp32 or fp16 (half the bytes)
    "round-timeout": 600.0,  # seconds to wait for replies before aggregating what came
    "min-nodes": 0,  # nodes to wait for before round 1 (0: those connected, at least 2)
    "discover-timeout": 900.0,  # seconds for nodes to answer who they are (first extraction)
    "out": "runs/flower",  # run folder on the SuperLink / simulation host
    "data-root": "",  # "" = the embedded sample; a node's own node-config overrides it
    "cache-dir": "",
    # central DP with client-side fixed clipping (Flower's wrapper + fixedclipping_mod):
    # off while dp-clipping-norm is 0
    "dp-clipping-norm": 0.0,
    "dp-noise-multiplier": 0.0,
}


def encode(params: Params, transfer: str = "fp32") -> ArrayRecord:
    dtype = TRANSFER_DTYPES[transfer]
    return ArrayRecord({k: v.detach().to(dtype).contiguous() for k, v in params.items()})


def decode(record: ArrayRecord) -> Params:
    return {k: v.float() for k, v in record.to_torch_state_dict().items()}


def check_update(update: Params, reference: Params) -> str | None:
    """Why a client's update must be rejected, or None when it is well-formed."""
    if set(update) != set(reference):
        return f"keys {sorted(set(update) ^ set(reference))} differ from the global adapter's"
    for key, value in update.items():
        if value.shape != reference[key].shape:
            return f"{key} has shape {tuple(value.shape)}, expected {tuple(reference[key].shape)}"
        if not torch.isfinite(value).all():
            return f"{key} contains NaN or inf"
    return None


def run_config_to_cfg(run_config: dict[str, Any], **overrides: Any) -> tuple[RunConfig, dict]:
    """Split Flower's run config into a validated RunConfig and the Flower-only options."""
    flower = dict(FLOWER_KEYS)
    values: dict[str, Any] = {}
    for key, value in run_config.items():
        if key in FLOWER_KEYS:
            flower[key] = value
        else:
            values[key.replace("-", "_")] = value
    if flower["data-root"]:
        values["data_root"] = flower["data-root"]
    if flower["cache-dir"]:
        values["cache_dir"] = flower["cache-dir"]
    values.update(overrides)
    if flower["transfer"] not in TRANSFER_DTYPES:
        from fedclip.errors import ConfigError

        raise ConfigError(f"transfer must be fp32 or fp16 (got {flower['transfer']!r})")
    return RunConfig.validated(values), flower


def config_record(**values: Any) -> ConfigRecord:
    return ConfigRecord(values)
