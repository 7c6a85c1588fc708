"""Checkpoints: one safetensors file per run, written atomically.

Tensors hold the global, best and optimizer states; the metadata holds the round, the
history and a fingerprint of the config, so that ``--resume`` refuses a checkpoint written
by a different configuration instead of silently mixing two runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from fedclip.config import RunConfig
from fedclip.errors import ResumeError
from fedclip.io import atomic_save_tensors
from fedclip.runtime.federation import FederationState


def config_fingerprint(cfg: RunConfig, heldout: str) -> str:
    blob = json.dumps({**cfg.fingerprint_fields(), "heldout": heldout}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flatten_optimizer(states: dict[str, dict]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, groups = {}, {}
    for client, sd in states.items():
        groups[client] = sd["param_groups"]
        for pid, slot in sd["state"].items():
            for name, value in slot.items():
                tensors[f"opt/{client}/{pid}/{name}"] = torch.as_tensor(value)
    return tensors, groups


def unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: dict) -> dict[str, dict]:
    states: dict[str, dict] = {c: {"state": {}, "param_groups": g} for c, g in groups.items()}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, client, pid, name = key.split("/", 3)
            states[client]["state"].setdefault(int(pid), {})[name] = value
    return states


def save_checkpoint(path: Path, state: FederationState, fingerprint: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for prefix, params in (("global", state.global_params), ("best", state.best_params)):
        for k, v in (params or {}).items():
            tensors[f"{prefix}/{k}"] = v
    for prefix, per_client in (("client", state.client_params),
                               ("bestclient", state.best_client_params)):
        for client, params in per_client.items():
            for k, v in params.items():
                tensors[f"{prefix}/{client}/{k}"] = v
    opt_tensors, groups = flatten_optimizer(state.optimizer_states)
    tensors.update(opt_tensors)
    meta = {"fingerprint": fingerprint, "round": str(state.round),
            "best_round": str(state.best_round), "best_val": repr(state.best_val),
            "history": json.dumps(state.history), "param_groups": json.dumps(groups)}
    atomic_save_tensors(path, tensors, meta)


def load_checkpoint(path: Path, fingerprint: str) -> FederationState:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:
        raise ResumeError(f"checkpoint {path} is unreadable ({exc}); delete it to start over"
                          ) from None
    if meta.get("fingerprint") != fingerprint:
        raise ResumeError(f"checkpoint {path} was written by a different configuration; "
                          f"resume with the same settings, or use another --out")

    def params(prefix: str) -> dict[str, torch.Tensor] | None:
        found = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(prefix + "/")}
        return found or None

    def per_client(prefix: str) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith(prefix + "/"):
                _, client, name = key.split("/", 2)
                out.setdefault(client, {})[name] = value
        return out

    return FederationState(
        round=int(meta["round"]), global_params=params("global"),
        best_round=int(meta["best_round"]), best_val=float(meta["best_val"]),
        best_params=params("best"),
        optimizer_states=unflatten_optimizer(tensors, json.loads(meta["param_groups"])),
        history=json.loads(meta["history"]),
        client_params=per_client("client"), best_client_params=per_client("bestclient"),
    )
