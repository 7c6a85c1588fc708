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

import time
from collections.abc import Sequence
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedclip.algorithms import get_algorithm
from fedclip.algorithms.base import Algorithm, Runtime
from fedclip.allocator import keep_freed_memory
from fedclip.callbacks import Callback, close, loggers_from_specs
from fedclip.config import FlowerSettings, RunConfig
from fedclip.core.client import steps_per_round
from fedclip.core.records import ClientInfo, RoundRecord, RunResult
from fedclip.core.run_folder import RunFolder
from fedclip.core.server import Server
from fedclip.core.state import FederationState
from fedclip.errors import ConfigError
from fedclip.flower.codec import encode, fp16_rounds_away
from fedclip.flower.discovery import dataset_name, discover, planned_domains
from fedclip.flower.grid import PollingGrid
from fedclip.flower.logs import one_line_refusals
from fedclip.flower.settings import require_one_heldout, run_config_to_cfg
from fedclip.flower.strategy import QUANTUM, FedClipStrategy
from fedclip.task import prompts, run_classes


def build_server_app(defaults: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp; ``defaults`` sit under the run config (``run_simulation`` passes none)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        one_line_refusals()
        keep_freed_memory()  # a process fedclip owns (fedclip.allocator)
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
        raise ConfigError(f"algorithm {cfg.algorithm!r} does not run on Flower (it sends "
                          f"nothing to a server); run it in-process: fedclip run --algorithm "
                          f"{cfg.algorithm}")
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
    if flower.transfer == "fp16":  # only where half precision would change the result
        steps = max(steps_per_round(cfg, i.num_train, cfg.local_epochs) for i in train)
        why = fp16_rounds_away(algorithm.shared(init), steps * algorithm.round_config(1).lr)
        if why is not None:
            raise ConfigError(why)
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
        trainable_params=algorithm.trainable_parameters(state.params),
        skipped={n.domain: list(n.skipped) for n in nodes.values() if n.skipped},
        transfer=flower.transfer,
        missing_clients=sorted({c for r in state.history for c in r.missing or []}),
        discovery_seconds=discovery)
    # an `out` relative to the SuperLink's working directory (a managed local SuperLink's is
    # wherever it was first started): say where the results are
    log(INFO, "results: %s", Path(flower.out).resolve() / "results.json")
    return result


app = build_server_app()
