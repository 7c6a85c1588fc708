"""Checkpoints: one safetensors file per run, written atomically, with a checksum.

Tensors hold the global and best parameters, the server state and every client's state
(whatever the algorithm keeps: personal parameters, optimizer moments, control variates),
under generic prefixes, so a new algorithm needs no change here. The metadata holds the
round, the configuration that decides the numbers (so ``--resume`` names any setting that
differs) and a SHA-256 over tensors and metadata, checked on load. The round history lives
apart, in ``history.jsonl`` beside it (appended, never re-serialised whole), so a checkpoint's
size does not grow with the rounds.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from fedclip.config import RunConfig
from fedclip.core.records import RecordError, RoundRecord
from fedclip.core.state import FederationState
from fedclip.errors import ResumeError
from fedclip.io import (
    atomic_save_tensors,
    atomic_write_text,
    storage_error,
    storage_problem,
)
from fedclip.tensors import checksum

FLAT = ("global", "best", "server")  # prefix/<name>
PER_CLIENT = ("client", "bestclient")  # prefix/<client>/<name>
HISTORY = "history.jsonl"


def fingerprint_fields(cfg: RunConfig, heldout: str, data: str | None = None) -> dict[str, Any]:
    """What decides a run's numbers: the config (less bookkeeping and where the data is) and,
    in-process, a fingerprint of the data itself (file list, sizes, mtimes)."""
    fields = {k: v for k, v in cfg.fingerprint_fields().items() if k not in ("data_root",)}
    return json.loads(json.dumps({**fields, "heldout": heldout, "data": data}))


def config_fingerprint(cfg: RunConfig, heldout: str, data: str | None = None) -> str:
    """A short hash of :func:`fingerprint_fields`: equal iff a resume may continue."""
    blob = json.dumps(fingerprint_fields(cfg, heldout, data), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def state_tensors(state: FederationState) -> dict[str, torch.Tensor]:
    """Every tensor of ``state`` under its generic prefix."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, flat in zip(FLAT, (state.global_params, state.best_params, state.server_state),
                            strict=True):
        tensors.update({f"{prefix}/{k}": v for k, v in (flat or {}).items()})
    for prefix, per_client in zip(PER_CLIENT, (state.client_states, state.best_client_states),
                                  strict=True):
        for client, values in per_client.items():
            tensors.update({f"{prefix}/{client}/{k}": v for k, v in values.items()})
    return tensors


def _read_history(path: Path) -> list[RoundRecord]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(RoundRecord.from_json(json.loads(line)))
        except (ValueError, RecordError):  # a torn last line (killed while appending)
            break
    return records


def append_history(path: Path, history: list[RoundRecord]) -> None:
    """Append the records after the file's last round (the file holds rounds in order)."""
    done = _read_last_round(path)
    new = [r for r in history if r.round > done]
    if new:
        text = "".join(json.dumps(r.to_json()) + "\n" for r in new).encode("utf-8")
        with path.open("ab") as f:
            before = f.tell()
            try:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            except OSError as exc:  # a full disk: no torn line is left behind
                f.truncate(before)
                if storage_problem(exc):
                    raise storage_error(path, exc, len(text)) from None
                raise


def _read_last_round(path: Path) -> int:
    if not path.is_file() or path.stat().st_size == 0:
        return -1
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 65536))
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    for line in reversed(lines):
        try:
            return int(json.loads(line)["round"])
        except (ValueError, KeyError, TypeError):
            continue
    return -1


def save_checkpoint(path: Path, state: FederationState, fingerprint: str,
                    fields: dict[str, Any] | None = None) -> None:
    """Append the new history, then write ``state`` atomically with its checksum."""
    path.parent.mkdir(parents=True, exist_ok=True)
    append_history(path.with_name(HISTORY), state.history)  # first: never behind the file
    tensors = state_tensors(state)
    meta = {"format": "fedclip-checkpoint/2", "fingerprint": fingerprint,
            "round": str(state.round), "best_round": str(state.best_round),
            "best_val": repr(state.best_val), "clients": json.dumps(sorted(state.client_states)),
            "config": json.dumps(fields or {}, sort_keys=True)}
    meta["checksum"] = checksum(tensors, meta)
    atomic_save_tensors(path, tensors, meta)


def _differences(saved: dict, current: dict) -> str:
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in keys[:8])


def load_checkpoint(path: Path, fingerprint: str, fields: dict[str, Any] | None = None
                    ) -> FederationState:
    """The state saved at ``path``, refused (:class:`ResumeError`, naming what differs) when
    it was written by another configuration, is damaged, or its history does not match."""
    from safetensors import safe_open

    if not path.is_file():
        raise ResumeError(f"checkpoint {path} is not a regular file; delete it to start over")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:
        raise ResumeError(f"checkpoint {path} is unreadable ({exc}); delete it to start over"
                          ) from None
    if meta.get("fingerprint") != fingerprint:
        differ = _differences(json.loads(meta.get("config", "{}") or "{}"), fields or {})
        raise ResumeError(f"checkpoint {path} was written by a different configuration"
                          + (f": {differ}" if differ else "")
                          + "; resume with the same settings, or use another --out")
    if "checksum" in meta:
        saved = meta.pop("checksum")
        if checksum(tensors, meta) != saved:
            raise ResumeError(f"checkpoint {path} is damaged (checksum mismatch); delete it to "
                              f"start over, or restore it from a copy")
    try:
        last = int(meta["round"])
        history = ([RoundRecord.from_json(r) for r in json.loads(meta["history"])]
                   if "history" in meta else _read_history(path.with_name(HISTORY)))
        kept = [r for r in history if r.round <= last]
        if "history" not in meta and len(kept) != len(history):  # rounds after the checkpoint
            atomic_write_text(path.with_name(HISTORY), "".join(json.dumps(r.to_json()) + "\n"
                                                               for r in kept))
        if not kept or kept[-1].round != last:
            raise ValueError(f"history ends at round {kept[-1].round if kept else None}")

        def flat(prefix: str) -> dict[str, torch.Tensor]:
            return {k.split("/", 1)[1]: v for k, v in tensors.items()
                    if k.startswith(prefix + "/")}

        def per_client(prefix: str) -> dict[str, dict[str, torch.Tensor]]:
            out: dict[str, dict[str, torch.Tensor]] = {c: {} for c in
                                                       json.loads(meta.get("clients", "[]"))}
            for key, value in tensors.items():
                if key.startswith(prefix + "/"):
                    _, client, name = key.split("/", 2)
                    out.setdefault(client, {})[name] = value
            return out

        return FederationState(
            round=last, global_params=flat("global") or None,
            best_round=int(meta["best_round"]), best_val=float(meta["best_val"]),
            best_params=flat("best") or None, server_state=flat("server"),
            client_states=per_client("client"), best_client_states=per_client("bestclient"),
            history=kept)
    except (KeyError, ValueError, TypeError, RecordError) as exc:
        raise ResumeError(f"checkpoint {path} has damaged metadata or history ({exc}); "
                          f"delete it to start over") from None
