"""Checkpoints: one safetensors file per run, written atomically.

Tensors hold the global and best parameters, the server state and every client's state
(whatever the algorithm keeps: personal parameters, optimizer moments, control variates),
under generic prefixes, so a new algorithm needs no change here. The metadata holds the
round, the history and a fingerprint of the config, so that ``--resume`` refuses a
checkpoint written by a different configuration instead of silently mixing two runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from fedclip.config import RunConfig
from fedclip.errors import ResumeError
from fedclip.io import atomic_save_tensors
from fedclip.runtime.state import FederationState

FLAT = ("global", "best", "server")  # prefix/<name>
PER_CLIENT = ("client", "bestclient")  # prefix/<client>/<name>


def config_fingerprint(cfg: RunConfig, heldout: str) -> str:
    blob = json.dumps({**cfg.fingerprint_fields(), "heldout": heldout}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def state_tensors(state: FederationState) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for prefix, flat in zip(FLAT, (state.global_params, state.best_params, state.server_state),
                            strict=True):
        tensors.update({f"{prefix}/{k}": v for k, v in (flat or {}).items()})
    for prefix, per_client in zip(PER_CLIENT, (state.client_states, state.best_client_states),
                                  strict=True):
        for client, values in per_client.items():
            tensors.update({f"{prefix}/{client}/{k}": v for k, v in values.items()})
    return tensors


def save_checkpoint(path: Path, state: FederationState, fingerprint: str) -> None:
    meta = {"fingerprint": fingerprint, "round": str(state.round),
            "best_round": str(state.best_round), "best_val": repr(state.best_val),
            "history": json.dumps(state.history),
            "clients": json.dumps(sorted(state.client_states))}
    atomic_save_tensors(path, state_tensors(state), meta)


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

    def flat(prefix: str) -> dict[str, torch.Tensor]:
        return {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(prefix + "/")}

    def per_client(prefix: str) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {c: {} for c in
                                                   json.loads(meta.get("clients", "[]"))}
        for key, value in tensors.items():
            if key.startswith(prefix + "/"):
                _, client, name = key.split("/", 2)
                out.setdefault(client, {})[name] = value
        return out

    return FederationState(
        round=int(meta["round"]), global_params=flat("global") or None,
        best_round=int(meta["best_round"]), best_val=float(meta["best_val"]),
        best_params=flat("best") or None, server_state=flat("server"),
        client_states=per_client("client"), best_client_states=per_client("bestclient"),
        history=json.loads(meta["history"]))
