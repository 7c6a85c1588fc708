"""The ServerApp: discover and check the nodes, run the strategy, write the run folder.

The server never sees data or the backbone. It defines the task from the run config (the
same on every node), asks every node who it is (a ``query`` message), refuses a federation
that cannot be right (two nodes claiming one client, a planned client absent, a role that
contradicts the held-out domain, nodes that disagree on the task or the feature size), then
trains, checkpoints every ``checkpoint_every`` rounds (``resume=true`` continues), runs the
personalization step and writes the same results.json, tables, plots and adapter files as
the in-process runner.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedclip.algorithms import get_algorithm
from fedclip.algorithms.base import Algorithm, Runtime
from fedclip.callbacks import Callback, close, loggers_from_specs
from fedclip.config import FlowerSettings, RunConfig
from fedclip.core.records import ClientInfo, RoundRecord, RunResult
from fedclip.core.run_folder import RunFolder
from fedclip.core.server import Server
from fedclip.core.state import FederationState
from fedclip.data.specs import SPECS, detect_spec
from fedclip.errors import ConfigError
from fedclip.flower.codec import decode, encode, finite_number, well_formed
from fedclip.flower.grid import PollingGrid
from fedclip.flower.logs import one_line_refusals
from fedclip.flower.settings import require_one_heldout, run_config_to_cfg
from fedclip.flower.strategy import QUANTUM, FedClipStrategy, NodeInfo
from fedclip.task import prompts, run_classes

MAX_INIT_BYTES = 1 << 30  # initial parameters a node may send at discovery
MAX_SKIPPED_LISTED = 10_000  # unreadable files a node's identity keeps (the first ones)
MAX_SKIPPED_CHARS = 16 << 20  # the longest skipped-file list (JSON) a node may send


def planned_domains(cfg: RunConfig) -> list[str] | None:
    """The training domains a run expects, when its dataset spec names them."""
    spec = SPECS.get(cfg.dataset) if cfg.dataset not in ("auto", "custom") else (
        detect_spec([cfg.heldout]) if cfg.dataset == "auto" and cfg.classes is None else None)
    return [d for d in spec.domains if d != cfg.heldout] if spec else None


def _node_info(node_id: int, content: RecordDict) -> tuple[NodeInfo, str]:
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
            info, task = _node_info(node_id, reply.content)
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


def build_server_app(defaults: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp; ``defaults`` sit under the run config (``run_simulation`` passes none)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        one_line_refusals()
        main(grid, {**(defaults or {}), **dict(context.run_config)}, poll=True)

    return app


def main(grid: Grid, run_config: dict[str, Any], callbacks: Sequence[Callback] = (),
         poll: bool = False) -> RunResult:
    """One Flower run; ``callbacks`` (and the loggers the run config's ``log-to`` names) see
    every round and the result, as in-process (:mod:`fedclip.callbacks`). ``poll``: check
    for replies every ``poll-interval`` seconds (:class:`~fedclip.flower.grid.PollingGrid`;
    the ServerApp's entry point does)."""
    cfg, flower = run_config_to_cfg(run_config)
    if poll:
        grid = PollingGrid(grid, flower.poll_interval)
    require_one_heldout(cfg)  # before any node is asked anything: one line, no node errors
    algorithm = get_algorithm(cfg)
    if not algorithm.runs_on_flower:
        why = ("sends nothing to a server" if not algorithm.communicates
               else "trains the backbone on pixels")
        raise ConfigError(f"algorithm {cfg.algorithm!r} does not run on Flower (it {why}); "
                          f"run it in-process: fedclip run --algorithm {cfg.algorithm}")
    classes = run_classes(cfg)  # the task is the run's: fail before asking any node
    folder = RunFolder(flower.out, cfg)
    callbacks = [*callbacks, *loggers_from_specs([flower.log_to], flower.out)]
    try:
        with folder.claimed():
            resumed = folder.prepare([cfg.heldout], flower.resume)[cfg.heldout]
            return _main_run(grid, cfg, flower, algorithm, classes, folder, resumed, callbacks)
    finally:
        close(callbacks)


def _main_run(grid: Grid, cfg: RunConfig, flower: FlowerSettings, algorithm: Algorithm,
              classes: tuple[str, ...], folder: RunFolder, resumed: FederationState | None,
              callbacks: list[Callback]) -> RunResult:
    """A held-out run on Flower, top to bottom: discovery, the server, round 0, the rounds,
    personalization, the result (the server decides; the strategy moves the messages)."""
    timeout, began = flower.round_timeout, time.perf_counter()
    inits: dict[int, dict] | None = {} if algorithm.init_needs_text else None
    nodes = discover(grid, cfg, flower.min_nodes, flower.discover_timeout,
                     planned_domains(cfg), inits)
    discovery = time.perf_counter() - began
    log(INFO, "discovered %d nodes in %.1f s", len(nodes), discovery)
    first = next(iter(nodes.values()))
    train = sorted((i for i in nodes.values() if i.role == "train"), key=lambda i: i.client)
    algorithm = get_algorithm(cfg, Runtime(prompts(cfg, classes), None, first.logit_scale,
                                           len(train)))  # every node's scale (discovery)
    init = next(iter(inits.values())) if inits else algorithm.init_global(first.dim)
    if init is None:  # refused above (runs_on_flower); a plugin that breaks the contract
        raise ConfigError(f"algorithm {cfg.algorithm!r} has no global parameters to federate")
    folder.write_config()
    writer = folder.start(cfg.heldout, resumed)

    def progress(state: FederationState, record: RoundRecord) -> None:
        if record.evaluated:
            log(INFO, "round %d: mean val %.4f, held-out %.4f", record.round,
                record.mean_val_accuracy, record.heldout_accuracy or float("nan"))

    server = Server(algorithm, {i.client: i.num_train for i in train}, writer,
                    callbacks=callbacks, observers=[progress], quantum=QUANTUM[flower.transfer])
    state = server.start(init, resumed)
    if resumed is not None:
        log(INFO, "resuming after round %d", resumed.round)
    strategy = FedClipStrategy(server, nodes, transfer=flower.transfer, timeout=timeout)
    start = time.perf_counter()
    zero = strategy.evaluate_initial(grid, timeout)  # round 0 (a fresh run) and zero-shot
    if (note := server.budget_note()) is not None:
        log(INFO, "%s", note)
    if (remaining := server.rules.rounds - state.round) > 0 and algorithm.trains:
        strategy.start(grid, encode(algorithm.shared(state.params)), num_rounds=remaining,
                       timeout=timeout)
    heldout_node = next(n for n in nodes.values() if n.role == "heldout")
    result = server.finish(
        zero, personalized=strategy.personalize(grid, cfg.personalize_epochs, timeout),
        clients=[ClientInfo(n.client, n.num_train, n.num_val, n.num_test) for n in train],
        heldout_images=heldout_node.num_test, runtime="flower", dataset=dataset_name(cfg),
        classes=classes, logit_scale=heldout_node.logit_scale, dim=heldout_node.dim,
        seconds=time.perf_counter() - start,
        trainable_params=sum(v.numel() for v in state.params.values()),
        skipped={n.domain: list(n.skipped) for n in nodes.values() if n.skipped},
        transfer=flower.transfer,
        missing_clients=sorted({c for r in state.history for c in r.missing or []}),
        discovery_seconds=discovery)
    # an `out` relative to the SuperLink's working directory (a managed local SuperLink's is
    # wherever it was first started): say where the results are
    log(INFO, "results: %s", Path(flower.out).resolve() / "results.json")
    return result


def dataset_name(cfg: RunConfig) -> str:
    """The dataset a Flower run names (its spec, or 'custom' when it lists its classes)."""
    spec = SPECS.get(cfg.dataset) or detect_spec([cfg.heldout])
    return spec.name if spec and cfg.classes is None else "custom"


app = build_server_app()
