"""The ServerApp: discover the nodes, run the strategy, write the run folder.

The server never sees data or the backbone: nodes report who they are (a ``query`` message),
and the results are written in the same format as the in-process runner's.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedclip.algorithms import get_algorithm
from fedclip.errors import ConfigError
from fedclip.experiment import json_safe, save_adapter, summarize
from fedclip.flower.codec import encode, run_config_to_cfg
from fedclip.flower.strategy import FedClipStrategy
from fedclip.io import atomic_write_json


def discover(grid: Grid, min_nodes: int, timeout: float) -> dict[int, dict]:
    """Ask every connected node who it is (waits for ``min_nodes`` to connect).

    A node answers once it has its features, so the first run on a node includes its
    feature extraction: ``timeout`` must allow for that."""
    deadline = time.monotonic() + timeout
    while len(ids := list(grid.get_node_ids())) < max(min_nodes, 2):
        if time.monotonic() > deadline:
            raise ConfigError(f"only {len(ids)} SuperNodes connected after {timeout:.0f} s; "
                              f"this run needs {max(min_nodes, 2)}")
        time.sleep(1)
    messages = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in ids]
    nodes = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            log(WARNING, "node %d cannot take part: %s", reply.metadata.src_node_id,
                        reply.error.reason)
            continue
        info, metrics = reply.content["node"], reply.content["metrics"]
        nodes[reply.metadata.src_node_id] = {
            "client": str(info["client"]), "role": str(info["role"]),
            "domain": str(info["domain"]), "classes": tuple(info["classes"]),
            "num-train": int(metrics["num-examples"]), "dim": int(metrics["dim"]),
            "logit-scale": float(metrics["logit-scale"])}
    heldout = [n for n in nodes.values() if n["role"] == "heldout"]
    if not heldout or len(heldout) == len(nodes):
        answered = sorted(n["client"] for n in nodes.values())
        raise ConfigError(f"a run needs training nodes and one held-out node; {len(nodes)} of "
                          f"{len(ids)} nodes answered ({answered}); check each SuperNode's "
                          f"node-config domain and its log")
    return nodes


def build_server_app(defaults: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp; ``defaults`` sit under the run config (``run_simulation`` passes none)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        main(grid, {**(defaults or {}), **dict(context.run_config)})

    return app


def main(grid: Grid, run_config: dict[str, Any]) -> dict:
    cfg, flower = run_config_to_cfg(run_config)
    nodes = discover(grid, int(flower["min-nodes"]), float(flower["discover-timeout"]))
    first = next(iter(nodes.values()))
    algorithm = get_algorithm(cfg)
    init = algorithm.init_global(first["dim"])
    if init is None or not algorithm.communicates:
        raise ConfigError(f"algorithm {cfg.algorithm!r} sends nothing to a server; run it "
                          f"in-process (fedclip run)")

    def progress(record: dict) -> None:
        log(INFO, "round %d: mean val %.4f, held-out %.4f", record["round"],
                 record["mean_val_accuracy"], record["heldout_accuracy"] or float("nan"))

    strategy = FedClipStrategy(algorithm, nodes, flower["transfer"], on_round=progress)
    runner = with_privacy(strategy, flower)
    start = time.perf_counter()
    zero = strategy.evaluate_initial(grid, encode(init), float(flower["round-timeout"]))
    result = runner.start(grid, encode(init), num_rounds=cfg.rounds,
                          timeout=float(flower["round-timeout"]))
    seconds = time.perf_counter() - start
    final = {k: v.float() for k, v in result.arrays.to_torch_state_dict().items()}
    return write_results(cfg, flower, strategy, nodes, zero, final, seconds)


def with_privacy(strategy: FedClipStrategy, flower: dict[str, Any]):  # noqa: ANN201
    """Flower's central-DP wrapper (client-side fixed clipping) when dp-clipping-norm > 0."""
    clip = float(flower["dp-clipping-norm"])
    if clip <= 0:
        return strategy
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    return DifferentialPrivacyClientSideFixedClipping(
        strategy, noise_multiplier=float(flower["dp-noise-multiplier"]), clipping_norm=clip,
        num_sampled_clients=len(strategy.train_ids))


def write_results(cfg, flower, strategy, nodes, zero, final, seconds) -> dict:  # noqa: ANN001
    from fedclip import report

    out = Path(flower["out"])
    run_dir = out / cfg.heldout
    train_nodes = [nodes[n] for n in strategy.train_ids]
    heldout_node = next(n for n in nodes.values() if n["role"] == "heldout")
    missing = sorted({c for r in strategy.history for c in r.get("missing", [])})
    trained = [r for r in strategy.history if r["round"] > 0]
    result = summarize(
        cfg, strategy.history, strategy.best_round, strategy.history[-1]["round"],
        zero, heldout=cfg.heldout, dataset="flower", trainable_params=sum(
            v.numel() for v in final.values()),
        bytes_per_round=(sum(r.get("bytes", 0) for r in trained) // len(trained)
                         if trained else 0),
        seconds=seconds, clients=[{"name": n["client"], "train": n["num-train"]}
                                  for n in train_nodes],
        heldout_images=0, skipped={}, runtime="flower", transfer=flower["transfer"],
        missing_clients=missing)
    classes, scale = heldout_node["classes"], heldout_node["logit-scale"]
    save_adapter(run_dir / "adapter-last.safetensors", final, cfg, classes, scale,
                 result["rounds"])
    if strategy.best_params is not None:
        save_adapter(run_dir / "adapter.safetensors", strategy.best_params, cfg, classes, scale,
                     strategy.best_round)
    atomic_write_json(run_dir / "result.json", json_safe(result))
    report.write_run(out, cfg, [result])
    return result


app = build_server_app()
