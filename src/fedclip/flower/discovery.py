"""Who the nodes of a Flower run are: discovery, each node's identity bound to its Flower node
id, and the checks of the federation as a whole (before any round)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedclip.config import RunConfig
from fedclip.data.specs import SPECS, detect_spec
from fedclip.errors import ConfigError
from fedclip.flower.codec import decode, finite_number, well_formed

MAX_INIT_BYTES = 1 << 30  # initial parameters a node may send at discovery
MAX_SKIPPED_LISTED = 10_000  # unreadable files a node's identity keeps (the first ones)
MAX_SKIPPED_CHARS = 16 << 20  # the longest skipped-file list (JSON) a node may send


@dataclass(frozen=True)
class NodeInfo:
    """A node as discovered: who it said it was, bound to its Flower node id."""

    node_id: int
    client: str
    role: str  # "train" or "heldout"
    domain: str
    index: int
    num_train: int
    num_val: int
    num_test: int
    images: int
    dim: int
    logit_scale: float
    skipped: tuple[str, ...] = ()



def planned_domains(cfg: RunConfig) -> list[str] | None:
    """The training domains a run expects, when its dataset spec names them."""
    spec = SPECS.get(cfg.dataset) if cfg.dataset not in ("auto", "custom") else (
        detect_spec([cfg.heldout]) if cfg.dataset == "auto" and cfg.classes is None else None)
    return [d for d in spec.domains if d != cfg.heldout] if spec else None


def node_info(node_id: int, content: RecordDict) -> tuple[NodeInfo, str]:
    """A discovery reply as (the node's identity, its task fingerprint); KeyError, ValueError
    or TypeError for anything missing, malformed or out of bounds (names of at most 256
    characters, at most ``MAX_SKIPPED_LISTED`` skipped files listed)."""
    info, metrics = content["node"], content["metrics"]
    names: dict[str, str] = {}
    for key in ("client", "role", "domain", "task"):
        value = info[key]
        if not isinstance(value, str) or not 0 < len(value) <= 256:
            raise ValueError(f"{key} missing or not a short string")
        names[key] = value
    numbers = {k: finite_number(metrics.get(k), 0) for k in
               ("client-index", "num-train", "num-val", "num-test", "images", "dim")}
    scale = finite_number(metrics.get("logit-scale"), 1e-6)
    ints = {k: int(v) for k, v in numbers.items() if v is not None and v == int(v)}
    bad = [k for k in numbers if k not in ints]
    if bad or scale is None:
        raise ValueError(f"invalid {', '.join(bad) or 'logit-scale'}")
    listed = str(info.get("skipped", "[]"))
    if len(listed) > MAX_SKIPPED_CHARS:
        raise ValueError(f"its skipped-file list is over {MAX_SKIPPED_CHARS} characters")
    skipped = json.loads(listed)
    if not isinstance(skipped, list) or not all(isinstance(f, str) for f in skipped):
        raise TypeError("skipped must list file names")
    return NodeInfo(node_id, names["client"], names["role"], names["domain"],
                    ints["client-index"], ints["num-train"], ints["num-val"], ints["num-test"],
                    ints["images"], ints["dim"], float(scale),
                    tuple(f[:300] for f in skipped[:MAX_SKIPPED_LISTED])), names["task"]


def discover(grid: Grid, cfg: RunConfig, min_nodes: int, timeout: float,
             planned: list[str] | None = None, inits: dict[int, dict] | None = None
             ) -> dict[int, NodeInfo]:
    """Ask every connected node who it is, then check the federation as a whole.

    A node answers once it has its features, so the first run on a node includes its
    feature extraction: ``timeout`` must allow for that."""
    deadline = time.monotonic() + timeout
    needed = max(min_nodes, 2)
    if planned is not None:
        needed = max(needed, len(planned) * cfg.clients_per_domain + 1)
    while len(ids := list(grid.get_node_ids())) < needed:
        if time.monotonic() > deadline:
            raise ConfigError(f"only {len(ids)} SuperNodes connected after {timeout:.0f} s; "
                              f"this run needs {needed}")
        time.sleep(1)
    ask = ConfigRecord({"send-init": inits is not None})
    messages = [Message(RecordDict({"config": ask}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in ids]
    nodes: dict[int, NodeInfo] = {}
    problems: list[str] = []
    tasks: dict[str, list[str]] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            reason = (reply.error.reason or "").strip()[-300:]
            problems.append(f"node {node_id} failed: {reason}")
            continue
        try:
            info, task = node_info(node_id, reply.content)
        except (KeyError, ValueError, TypeError) as exc:
            problems.append(f"node {node_id} sent a malformed identity "
                            f"({type(exc).__name__}: {exc})")
            continue
        nodes[node_id] = info
        if inits is not None and "init" in reply.content.array_records:
            record = reply.content.array_records["init"]
            why = well_formed(record, MAX_INIT_BYTES)
            if why is not None:
                problems.append(f"node {node_id} ({info.client}) sent malformed initial "
                                f"parameters: {why}")
                continue
            inits[node_id] = decode(record)
        tasks.setdefault(task, []).append(info.client)
    problems += check_federation(cfg, nodes, planned, len(tasks))
    if inits is not None:
        ref = next(iter(inits.values()), None)
        if ref is None or len(inits) != len(nodes) or any(
                set(p) != set(ref) or any(not torch.allclose(p[k], ref[k], atol=1e-5)
                                          for k in ref) for p in inits.values()):
            problems.append("nodes disagree on the initial parameters (computed from the class "
                            "prompts' features): check that every node runs the same backbone")
    if problems:
        raise ConfigError("the federation cannot run: " + "; ".join(problems))
    return nodes


def check_federation(cfg: RunConfig, nodes: dict[int, NodeInfo], planned: list[str] | None,
                     n_tasks: int = 1) -> list[str]:
    """Everything wrong with the discovered nodes as a federation for this run."""
    problems = []
    by_client: dict[str, list[int]] = {}
    for n, info in nodes.items():
        by_client.setdefault(info.client, []).append(n)
        expected_role = "heldout" if info.domain == cfg.heldout else "train"
        if info.role != expected_role:
            problems.append(f"node {n} ({info.client}) says role {info.role!r} but this run "
                            f"holds out {cfg.heldout!r}")
        if info.role == "train" and info.num_train <= 0:
            problems.append(f"node {n} ({info.client}) declares no training examples")
        if info.role == "train" and not 0 <= info.index < cfg.clients_per_domain:
            problems.append(f"node {n} claims client-index {info.index}, out of range "
                            f"0..{cfg.clients_per_domain - 1}")
    for client, ids in sorted(by_client.items()):
        if len(ids) > 1:
            problems.append(f"nodes {sorted(ids)} all claim client {client!r}")
    heldout = [i for i in nodes.values() if i.role == "heldout"]
    if not heldout:
        problems.append(f"no node holds the held-out domain {cfg.heldout!r}")
    if not any(i.role == "train" for i in nodes.values()):
        problems.append("no training node answered")
    if planned is not None:
        expected = {d if cfg.clients_per_domain == 1 else f"{d}#{k}" for d in planned
                    for k in range(cfg.clients_per_domain)}
        absent = sorted(expected - set(by_client))
        if absent:
            problems.append(f"planned training client(s) {absent} did not answer")
    if len({i.dim for i in nodes.values()}) > 1 or len(
            {round(i.logit_scale, 4) for i in nodes.values()}) > 1:
        dims = sorted({(i.client, i.dim) for i in nodes.values()})
        problems.append(f"nodes disagree on the backbone (feature size, logit scale): {dims}")
    if n_tasks > 1:
        problems.append("nodes disagree on the task (class list); give every node the same "
                        "run config")
    return problems


def dataset_name(cfg: RunConfig) -> str:
    """The dataset a Flower run names (its spec, or 'custom' when it lists its classes)."""
    spec = SPECS.get(cfg.dataset) or detect_spec([cfg.heldout])
    return spec.name if spec and cfg.classes is None else "custom"
