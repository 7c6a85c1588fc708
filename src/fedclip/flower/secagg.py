"""SecAgg+ for fedclip: the server learns only the (weighted) sum of the adapters.

In Flower 1.42, ``SecAggPlusWorkflow`` and ``secaggplus_mod`` compose only with the legacy
workflow API (``DefaultWorkflow``, ``LegacyContext``, a ``NumPyClient``), not with the
message-API strategies, so this option takes that path, with its own pair of apps:

    [tool.flwr.app.components]
    serverapp = "fedclip.flower.secagg:server_app"
    clientapp = "fedclip.flower.secagg:client_app"

The client still calls the same core functions (``train_local``, ``evaluate``). The held-out
node takes part in the secure sum with weight 0 (it returns the global adapter unchanged), so
it never influences the aggregate, and evaluates as usual. Costs: four extra message rounds
per training round, and quantization (``clipping-range`` 8, ``quantization-range`` 2^22, the
weight ``num-examples / max-weight`` quantized too), so the aggregate matches plain FedAvg to
about 1e-4.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid, ServerApp

from fedclip.algorithms import get_algorithm
from fedclip.flower.codec import run_config_to_cfg
from fedclip.flower.node import Node, node_for
from fedclip.runtime.client import evaluate, round_seed, train_local

SECAGG_KEYS = {"secagg-max-weight": 10_000.0}


class AdapterClient(NumPyClient):
    """The adapter as a list of arrays, in ``keys`` order."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.keys = list(node.algorithm.init_global(node.class_text.shape[1]))

    def get_parameters(self, config):  # noqa: ANN001, ANN201
        """The seeded initial adapter (the server asks one node; it holds no backbone)."""
        init = self.node.algorithm.init_global(self.node.class_text.shape[1])
        return [init[k].numpy() for k in self.keys]

    def _params(self, arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.asarray(a, dtype=np.float32)).clone()
                for k, a in zip(self.keys, arrays, strict=True)}

    def fit(self, parameters, config):  # noqa: ANN001, ANN201
        if self.node.data is None:  # the held-out node: weight 0, adapter unchanged
            return parameters, 0, {}
        server_round = int(config["server-round"])
        result = train_local(
            self.node.algorithm, self._params(parameters), self.node.data.train,
            self.node.class_text, self.node.logit_scale,
            seed=round_seed(self.node.algorithm.cfg.seed, server_round, self.node.name))
        return ([result.params[k].numpy() for k in self.keys], result.num_examples,
                {"train-loss": result.loss})

    def evaluate(self, parameters, config):  # noqa: ANN001, ANN201
        node, params = self.node, self._params(parameters)
        if node.data is None:
            held = evaluate(node.algorithm, params, node.heldout, node.class_text,
                            node.logit_scale, node.heldout_mask)
            return 0.0, held.num_examples, {"heldout-accuracy": held.accuracy}
        test = evaluate(node.algorithm, params, node.data.test, node.class_text,
                        node.logit_scale, node.data.class_mask)
        return test.loss, test.num_examples, {"test-accuracy": test.accuracy}


def build_client_app(defaults: dict[str, Any] | None = None) -> ClientApp:
    def client_fn(context: Context):  # noqa: ANN202
        values = {k: v for k, v in {**(defaults or {}), **dict(context.run_config)}.items()
                  if k not in SECAGG_KEYS}
        cfg, _ = run_config_to_cfg(values)
        return AdapterClient(node_for(cfg, dict(context.node_config))).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


def build_server_app(defaults: dict[str, Any] | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run(grid, context, {**(defaults or {}), **dict(context.run_config)})

    return app


def run(grid: Grid, context: Context, run_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Train with SecAgg+; write and return the final adapter."""
    from fedclip.experiment import save_adapter

    max_weight = float(run_config.get("secagg-max-weight", SECAGG_KEYS["secagg-max-weight"]))
    cfg, flower = run_config_to_cfg({k: v for k, v in run_config.items()
                                     if k not in SECAGG_KEYS})
    nodes = max(int(flower["min-nodes"]), len(list(grid.get_node_ids())))
    strategy = LegacyFedAvg(
        fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=nodes,
        min_evaluate_clients=nodes, min_available_clients=nodes,
        on_fit_config_fn=lambda server_round: {"server-round": server_round})
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.rounds),
                           strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=nodes, reconstruction_threshold=max(2, nodes - 1), max_weight=max_weight))
    workflow(grid, legacy)
    final_arrays = legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
    keys = get_algorithm(cfg).build_module(final_arrays[0].shape[0]).state_dict().keys()
    final = {k: torch.from_numpy(np.asarray(a)) for k, a in zip(keys, final_arrays, strict=True)}
    save_adapter(Path(flower["out"]) / cfg.heldout / "adapter-last.safetensors", final, cfg,
                 (), 0.0, cfg.rounds)
    return final


client_app = build_client_app()
server_app = build_server_app()
