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

import time
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, MessageType
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import EvaluateIns, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid, ServerApp

from fedclip.algorithms import get_algorithm
from fedclip.algorithms.base import Algorithm
from fedclip.errors import ConfigError
from fedclip.flower.codec import finite_number, require_one_heldout, run_config_to_cfg
from fedclip.flower.node import node_for
from fedclip.results import evaluation, is_better, round_record
from fedclip.runtime.client import evaluate, personalize
from fedclip.task import Site, run_classes

SECAGG_KEYS = {"secagg-max-weight": 10_000.0}


class AdapterClient(NumPyClient):
    """The adapter as a list of arrays, in ``keys`` order."""

    def __init__(self, site: Site, algorithm: Algorithm) -> None:
        self.site, self.algorithm = site, algorithm
        self.keys = list(algorithm.init_global(site.class_text.shape[1]) or {})

    def get_parameters(self, config):  # noqa: ANN001, ANN201
        """The seeded initial adapter (the server asks one node; it holds no backbone)."""
        init = self.algorithm.init_global(self.site.class_text.shape[1])
        return [init[k].numpy() for k in self.keys]

    def _params(self, arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
        device = self.site.class_text.device
        return {k: torch.from_numpy(np.asarray(a, dtype=np.float32)).to(device)
                for k, a in zip(self.keys, arrays, strict=True)}

    def fit(self, parameters, config):  # noqa: ANN001, ANN201
        if self.site.data is None:  # the held-out node: weight 0, adapter unchanged
            return parameters, 0, {}
        from fedclip.algorithms.base import ClientJob
        from fedclip.runtime.client import round_seed

        server_round = int(config["server-round"])
        start = self._params(parameters)
        job = ClientJob(self.site.name, self.site.data.train, start, start, {},
                        self.algorithm.round_config(server_round), {}, self.site.class_text,
                        self.site.logit_scale,
                        round_seed(self.algorithm.cfg.seed, server_round, self.site.name))
        update = self.algorithm.train_client(job)
        return ([update.params[k].cpu().numpy() for k in self.keys], update.num_examples,
                {"train-loss": update.loss})

    def evaluate(self, parameters, config):  # noqa: ANN001, ANN201
        site, algo = self.site, self.algorithm
        params = None if config.get("zeroshot", False) else self._params(parameters)
        args = (site.class_text, site.logit_scale)
        common = {"client": site.name, "logit-scale": float(site.logit_scale)}
        epochs = int(config.get("personalize-epochs", 0))
        if site.data is None:
            held = evaluate(algo, params, site.heldout, *args, site.heldout_mask)
            return 0.0, held.num_examples, {**common, "heldout-accuracy": held.accuracy}
        if epochs > 0:
            acc, epoch = personalize(algo, params, site.data, *args, epochs)
            return 0.0, 1, {**common, "personalized-accuracy": acc, "personalized-epoch": epoch}
        val = evaluate(algo, params, site.data.val, *args, site.data.class_mask)
        test = evaluate(algo, params, site.data.test, *args, site.data.class_mask)
        return test.loss, test.num_examples, {**common, "val-accuracy": val.accuracy,
                                              "test-accuracy": test.accuracy}


def build_client_app(defaults: dict[str, Any] | None = None) -> ClientApp:
    def client_fn(context: Context):  # noqa: ANN202
        values = {k: v for k, v in {**(defaults or {}), **dict(context.run_config)}.items()
                  if k not in SECAGG_KEYS}
        cfg, _ = run_config_to_cfg(values)
        return AdapterClient(*node_for(cfg, dict(context.node_config))).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


def build_server_app(defaults: dict[str, Any] | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run(grid, context, {**(defaults or {}), **dict(context.run_config)})

    return app


class RecordingFedAvg(LegacyFedAvg):
    """The legacy FedAvg that records each round's evaluation in fedclip's history format,
    by node id: a node's name and role are fixed by its first answer."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.history: list[dict] = []
        self.names: dict[int, tuple[str, str]] = {}
        self.logit_scale = float("nan")
        self.best_round, self.best_val = 0, -float("inf")
        self.best_params: list[np.ndarray] | None = None
        self.current: list[np.ndarray] | None = None
        self.initial: list[np.ndarray] = []
        self.started = time.perf_counter()

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        from flwr.common import parameters_to_ndarrays

        self.started = time.perf_counter()
        if server_round == 1:
            self.initial = parameters_to_ndarrays(parameters)
        return super().configure_fit(server_round, parameters, client_manager)

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        from flwr.common import parameters_to_ndarrays

        self.current = parameters_to_ndarrays(parameters)
        return super().configure_evaluate(server_round, parameters, client_manager)

    def record(self, server_round: int, replies: list[tuple[int, dict]], prefix: str = ""
               ) -> dict:
        val, test, heldout = {}, {}, None
        for node_id, metrics in replies:
            name, role = self.names.setdefault(node_id, (
                str(metrics.get("client")),
                "heldout" if f"{prefix}heldout-accuracy" in metrics else "train"))
            scale = finite_number(metrics.get("logit-scale"), 1e-6)
            self.logit_scale = scale if scale is not None else self.logit_scale
            if role == "heldout":
                heldout = finite_number(metrics.get(f"{prefix}heldout-accuracy"), 0.0, 1.0)
            else:
                v = finite_number(metrics.get(f"{prefix}val-accuracy"), 0.0, 1.0)
                t = finite_number(metrics.get(f"{prefix}test-accuracy"), 0.0, 1.0)
                if v is not None and t is not None:
                    val[name], test[name] = v, t
        return evaluation(val, test, heldout)

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: ANN001, ANN201
        record = {**round_record(server_round, {}, time.perf_counter() - self.started, 0, 0),
                  **self.record(server_round, [(p.node_id, r.metrics) for p, r in results])}
        self.history.append(record)
        if is_better(record, self.best_val):
            self.best_round, self.best_val = server_round, record["mean_val_accuracy"]
            self.best_params = self.current
        return super().aggregate_evaluate(server_round, results, failures)


def _evaluate_all(grid: Grid, arrays: list[np.ndarray], config: dict) -> list[tuple[int, dict]]:
    """One legacy evaluate exchange with every node (round 0, personalization)."""
    ins = EvaluateIns(ndarrays_to_parameters(arrays), config)
    messages = [Message(compat.evaluateins_to_recorddict(ins, True), dst_node_id=n,
                        message_type=MessageType.EVALUATE) for n in grid.get_node_ids()]
    replies = []
    for msg in grid.send_and_receive(messages):
        if msg.has_content():
            res = compat.recorddict_to_evaluateres(msg.content)
            replies.append((msg.metadata.src_node_id, dict(res.metrics)))
    return replies


def run(grid: Grid, context: Context, run_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Train with SecAgg+; write the adapters and results.json; return the final adapter."""
    from fedclip.flower.server_app import write_legacy_results

    max_weight = float(run_config.get("secagg-max-weight", SECAGG_KEYS["secagg-max-weight"]))
    cfg, flower = run_config_to_cfg({k: v for k, v in run_config.items()
                                     if k not in SECAGG_KEYS})
    require_one_heldout(cfg)
    if flower["log-to"]:
        raise ConfigError("log-to is not available with SecAgg+ (Flower's legacy strategy "
                          "API has no round hook here); its results.json holds every round")
    classes = run_classes(cfg)
    algorithm = get_algorithm(cfg)
    nodes = max(int(flower["min-nodes"]), len(list(grid.get_node_ids())))
    strategy = RecordingFedAvg(
        fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=nodes,
        min_evaluate_clients=nodes, min_available_clients=nodes,
        on_fit_config_fn=lambda server_round: {"server-round": server_round})
    start = time.perf_counter()
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.rounds),
                           strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=nodes, reconstruction_threshold=max(2, nodes - 1), max_weight=max_weight))
    workflow(grid, legacy)
    initial = strategy.initial
    # round 0 (the initial adapter), evaluated now that the nodes are known; it competes
    # for the best round like any other (the one rule, applied in round order)
    record0 = {**round_record(0, {}, 0.0, 0, 0),
               **strategy.record(0, _evaluate_all(grid, initial, {}))}
    strategy.history.insert(0, record0)
    if not strategy.best_val > record0["mean_val_accuracy"]:
        strategy.best_round, strategy.best_params = 0, initial
    keys = list(algorithm.init_global(initial[0].shape[0]) or {})
    final_arrays = legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()

    def as_params(arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.asarray(a, dtype=np.float32)).clone()
                for k, a in zip(keys, arrays, strict=True)}

    final = as_params(final_arrays)
    zero = strategy.record(0, _evaluate_all(grid, initial, {"zeroshot": True}))
    best = as_params(strategy.best_params) if strategy.best_params is not None else None
    personalized = None
    if strategy.best_params is not None and cfg.personalize_epochs > 0:
        replies = _evaluate_all(grid, strategy.best_params,
                                {"personalize-epochs": cfg.personalize_epochs})
        per = {strategy.names.get(n, (str(m.get("client")), ""))[0]:
               finite_number(m.get("personalized-accuracy"), 0.0, 1.0)
               for n, m in replies if "personalized-accuracy" in m}
        from fedclip.results import nanmean

        personalized = {"mean": nanmean(per.values()), "per_client": dict(sorted(per.items()))}
    write_legacy_results(cfg, flower, strategy, zero, personalized, classes, final, best,
                         time.perf_counter() - start)
    return final


client_app = build_client_app()
server_app = build_server_app()
