"""SecAgg+ for fedclip: the server learns only the (weighted) mean of the adapters.

In Flower 1.42, ``SecAggPlusWorkflow`` and ``secaggplus_mod`` compose only with the legacy
workflow API (``DefaultWorkflow``, ``LegacyContext``, a ``NumPyClient``), not with the
message-API strategies, so this option takes that path, with its own pair of apps:

    [tool.flwr.app.components]
    serverapp = "fedclip.flower.secagg:server_app"
    clientapp = "fedclip.flower.secagg:client_app"

It runs on the same contract as every other runtime: the server sends each round's
``RoundConfig`` (``Algorithm.round_config``: the lr schedule, the options), clients train with
``Algorithm.train_client``, the algorithm's own ``aggregate`` runs on the securely computed
mean (FedAdam, FedYogi and FedAvgM take their server step on it), the one best-round rule
(``FederationState.select``) picks the round, and the run folder (``RunFolder``) writes the
results. What cannot travel through a secure sum is refused at start, in one line
(:func:`refusal`): per-client extras (SCAFFOLD's control variates), client state (Ditto's
personal adapter, personal parameters, ``optimizer_state=keep``) and robust aggregation
(median and trimmed mean need the individual updates). A resume is refused too (the legacy
workflow cannot start from a checkpoint).

The held-out node takes part in the secure sum with weight 0 (it returns the global adapter
unchanged), so it never influences the aggregate, and evaluates as usual. Costs: four extra
message rounds per training round, and quantization (``clipping-range`` 8,
``quantization-range`` 2^22, the weight ``num-examples / secagg-max-weight`` quantized too), so
the aggregate matches the plain runtime to about 1e-4. The weights are the clients' own
declarations (the server cannot see an individual update): a trust decision that the README's
security section states.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.common import (
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid, ServerApp

from fedclip.algorithms import get_algorithm
from fedclip.algorithms.base import Algorithm, Runtime
from fedclip.callbacks import close, loggers_from_specs
from fedclip.config import FlowerSettings
from fedclip.core.records import ClientInfo, RoundRecord, RunResult
from fedclip.core.run_folder import RunFolder
from fedclip.core.server import RoundPlan, Server, secure_sum_refusal
from fedclip.errors import ConfigError
from fedclip.flower.codec import finite_number
from fedclip.flower.discovery import dataset_name
from fedclip.flower.grid import PollingGrid
from fedclip.flower.replies import (
    Reply,
    evaluate_all,
    evaluation_of,
    identities,
    no_zero_shot,
    personalized_of,
)
from fedclip.flower.secagg_client import build_client_app, client_app, wire
from fedclip.flower.secagg_guard import GuardedSecAggPlusWorkflow, implausible_mean
from fedclip.flower.settings import require_one_heldout, run_config_to_cfg
from fedclip.task import prompts, run_classes
from fedclip.tensors import Params

# the documented component path (pyproject: clientapp = "fedclip.flower.secagg:client_app")
__all__ = ["build_client_app", "build_server_app", "client_app", "run", "server_app"]
# the bytes of one value in a masked vector (Flower 1.42 adds int64 masks to the quantized
# values); a round's record counts these payloads, not the key exchange's few hundred bytes
MASKED_BYTES = 8
SECAGG_CLIPPING_RANGE = 8.0  # SecAggPlusWorkflow's default clipping_range: values travel in it


def refusal(algorithm: Algorithm, flower: FlowerSettings) -> str | None:
    """Why this run cannot go through SecAgg+ (None: it can): the server's rule
    (:func:`fedclip.core.server.secure_sum_refusal`), and no resume on the legacy workflow."""
    if flower.resume:
        return ("resume=true is not available with SecAgg+ (Flower's legacy workflow cannot "
                "start from a checkpoint); start the run again into a new out")
    return secure_sum_refusal(algorithm)


def beyond_clipping_range(arrays: dict[str, np.ndarray]) -> str | None:
    """Why parameters cannot travel through SecAgg+'s secure sum (its clients clip every
    value to [-SECAGG_CLIPPING_RANGE, SECAGG_CLIPPING_RANGE] before masking, so a larger one
    would be averaged wrong, silently), or None. A whole backbone (a pixel method) can hold
    such values (a logit scale, a LayerNorm gain)."""
    over = {k: float(np.abs(a).max()) for k, a in arrays.items()
            if a.size and float(np.abs(a).max()) > SECAGG_CLIPPING_RANGE}
    if not over:
        return None
    name, value = max(over.items(), key=lambda kv: kv[1])
    return (f"{len(over)} parameter tensor(s) hold values beyond the secure sum's clipping "
            f"range {SECAGG_CLIPPING_RANGE:g} ({name}: {value:.3g}), which it would clip; run "
            f"this model without SecAgg+")


def build_server_app(defaults: dict[str, Any] | None = None) -> ServerApp:
    """The SecAgg+ ServerApp (:func:`run`)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run(grid, context, {**(defaults or {}), **dict(context.run_config)}, poll=True)

    return app


class SecureStrategy(LegacyFedAvg):
    """The legacy FedAvg's hooks, driving the one server (:class:`fedclip.core.server.Server`):
    the round's plan goes down as the fit config, the secure mean goes to
    :meth:`Server.accept_mean`, evaluations to :meth:`Server.complete`. A node's name and
    role are fixed by its first answer (the zero-shot exchange)."""

    def __init__(self, server: Server, nodes: dict[int, tuple[str, str]], grid: Grid,
                 timeout: float, **kwargs: Any) -> None:
        super().__init__(on_fit_config_fn=self.fit_config, **kwargs)
        self.server, self.algorithm = server, server.algorithm
        self.nodes, self.grid, self.timeout = nodes, grid, timeout
        self.drops: dict[str, str] = {}  # this round: client -> why the guard dropped it
        self.keys: list[str] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.plan: RoundPlan | None = None
        self.record: RoundRecord | None = None
        self.started = time.perf_counter()
        self.sent = 0  # this round: the parameters' bytes, once per instructed node

    def fit_config(self, server_round: int) -> dict[str, Any]:
        """The round's plan as the legacy fit config: the ``RoundConfig``, the clients
        sampled, and the weight cap (clients weigh themselves inside the secure sum)."""
        plan = self.plan
        assert plan is not None  # configure_fit planned the round
        return {**plan.config.record(), "sampled": json.dumps(list(plan.clients)),
                **({"weight-cap": plan.weight_cap} if plan.weight_cap is not None else {})}

    # --- parameters -----------------------------------------------------------------------
    def as_params(self, arrays: list[np.ndarray]) -> Params:
        """Legacy arrays back as named tensors (``keys`` order)."""
        return {k: torch.from_numpy(np.asarray(a, dtype=np.float32).reshape(self.shapes[k]))
                .clone() for k, a in zip(self.keys, arrays, strict=True)}

    def as_arrays(self, params: Params) -> list[np.ndarray]:
        """Named tensors as legacy arrays (``keys`` order)."""
        return [wire(params[k].detach().cpu().numpy()) for k in self.keys]

    def replies(self, answers: list[tuple[int, dict]]) -> list[Reply]:
        """Answers of known nodes, by the name and role each gave first."""
        return [(*self.nodes[n], m) for n, m in answers if n in self.nodes]

    def start(self, initial: list[np.ndarray]) -> None:
        """Round 0: the initial parameters (from a node), evaluated before round 1 trains."""
        dim = int(initial[0].shape[-1])
        shapes = {k: tuple(v.shape) for k, v in
                  self.algorithm.build_module(dim).state_dict().items()}
        if [tuple(a.shape) for a in initial] != [wire(np.zeros(s)).shape for s in shapes.values()]:
            raise ConfigError(f"the node's initial parameters do not fit algorithm "
                              f"{self.algorithm.name!r} (shapes {[a.shape for a in initial]})")
        self.keys, self.shapes = list(shapes), shapes
        if (why := beyond_clipping_range(dict(zip(self.keys, initial, strict=True)))) is not None:
            raise ConfigError(f"SecAgg+: {why}")
        self.server.start(self.as_params(initial))
        answers = evaluate_all(self.grid, initial, {}, self.timeout)
        self.server.complete(RoundRecord(0), evaluation_of(self.replies(answers)))

    # --- the legacy hooks -----------------------------------------------------------------
    def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        self.started, self.drops = time.perf_counter(), {}
        self.drops = {}
        if server_round == 1:
            self.start(parameters_to_ndarrays(parameters))
        self.plan = self.server.plan()
        if self.plan is None:
            return []
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self.sent = sum(len(t) for t in parameters.tensors) * len(instructions)
        return instructions

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, ANN201
        plan = self.plan
        if plan is None:
            return None, {}
        counted = [(p, r) for p, r in results if r.num_examples > 0]
        diverged = sum(1 for _, r in results if r.metrics.get("diverged") == 1)
        losses = {self.nodes.get(p.node_id, (str(p.node_id), ""))[0]: loss
                  for p, r in counted
                  if (loss := finite_number(r.metrics.get("train-loss"))) is not None}
        arrays = parameters_to_ndarrays(results[0][1].parameters) if results else []
        mean = self.as_params(arrays) if results else self.server.state.params
        wrong = implausible_mean(arrays, SECAGG_CLIPPING_RANGE) if results else None
        drops, self.drops = self.drops, {}
        # each answer's masked vector: int64 per value (Flower's masks), whatever it carried
        received = len(results) and sum(a.size for a in arrays) * MASKED_BYTES * len(counted)
        self.record = self.server.accept_mean(plan, mean, len(counted), losses,
                                              diverged=diverged, rejected=drops, refused=wrong,
                                              sent=self.sent, received=received)
        self.record.seconds = time.perf_counter() - self.started
        if not plan.evaluated:
            self.server.complete(self.record, None)
        return ndarrays_to_parameters(self.as_arrays(self.server.state.params)), {}

    def dropped(self, server_round: int, node_id: int, why: str) -> None:
        """The SecAgg+ guard dropped a node's reply this round (recorded as rejected)."""
        self.drops[self.nodes.get(node_id, (f"node {node_id}", ""))[0]] = why

    def refused(self, server_round: int, why: str) -> None:
        """The SecAgg+ guard ended a round without an aggregate: recorded, params unchanged."""
        plan = self.plan
        if plan is None:
            return
        drops, self.drops = self.drops, {}
        self.record = self.server.refuse(plan, {**drops, "secure aggregation": why})
        self.record.seconds = time.perf_counter() - self.started
        if not plan.evaluated:
            self.server.complete(self.record, None)

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        if self.plan is None or not self.plan.evaluated:
            return []
        return super().configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: ANN001, ANN201
        record = self.record
        if record is not None and self.plan is not None and self.plan.evaluated:
            record.round_seconds = time.perf_counter() - self.started
            self.server.complete(record, evaluation_of(self.replies(
                [(p.node_id, dict(r.metrics)) for p, r in results])))
        return super().aggregate_evaluate(server_round, results, failures)


def run(grid: Grid, context: Context, run_config: dict[str, Any], poll: bool = False
        ) -> RunResult:
    """Train with SecAgg+; the run folder writes the adapters and results.json (``poll``:
    as :func:`fedclip.flower.server_app.main`)."""
    cfg, flower = run_config_to_cfg(run_config)
    if poll:
        grid = PollingGrid(grid, flower.poll_interval)
    require_one_heldout(cfg)
    why = refusal(get_algorithm(cfg), flower)
    if why is not None:
        raise ConfigError(f"SecAgg+: {why}")
    classes = run_classes(cfg)
    folder = RunFolder(flower.out, cfg)
    callbacks = loggers_from_specs([flower.log_to], flower.out)
    try:
        with folder.claimed():
            folder.prepare([cfg.heldout], resume=False)
            folder.write_config()
            return _run(grid, context, flower, classes, folder, callbacks)
    finally:
        close(callbacks)


def _run(grid: Grid, context: Context, flower: FlowerSettings, classes: tuple[str, ...],
         folder: RunFolder, callbacks: list) -> RunResult:
    """A held-out run through SecAgg+, top to bottom: who the nodes are (the zero-shot
    exchange), the server, the workflow's rounds, personalization, the result."""
    cfg, timeout = folder.cfg, flower.round_timeout
    answers = evaluate_all(grid, [], {"zeroshot": True}, timeout)
    nodes, sizes = identities(answers)
    train = sorted(name for name, role in nodes.values() if role == "train")
    metrics = next((m for _, m in answers), {})
    logit_scale = finite_number(metrics.get("logit-scale"), 1e-6) or float("nan")
    dim = int(finite_number(metrics.get("dim"), 1) or 0)
    algorithm = get_algorithm(cfg, Runtime(prompts(cfg, classes), None, logit_scale,
                                           len(train)))
    server = Server(algorithm, {c: sizes[c].get("num-train", 0) for c in train},
                    folder.start(cfg.heldout, None), callbacks=callbacks)
    zero = RoundRecord(0)
    zero.set_evaluation(*(evaluation_of([(*nodes[n], m) for n, m in answers],
                                        prefix="zeroshot-") if algorithm.has_zero_shot
                          else no_zero_shot(train)))
    count = len(nodes)
    strategy = SecureStrategy(server, nodes, grid, timeout, fraction_fit=1.0,
                              fraction_evaluate=1.0, min_fit_clients=count,
                              min_evaluate_clients=count, min_available_clients=count)
    start = time.perf_counter()
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=server.rules.rounds),
                           strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=GuardedSecAggPlusWorkflow(  # a bad reply drops
        num_shares=count, reconstruction_threshold=max(2, count - 1),  # its client, or the
        on_drop=strategy.dropped, on_refuse=strategy.refused,  # round is refused in one line
        # uniform: every weight is 1, so a scale of 1 keeps them exact (at 10,000 a weight of
        # 1 is quantized to a few levels and the mean is off by percents)
        max_weight=1.0 if cfg.aggregation == "uniform" else flower.secagg_max_weight))
    workflow(grid, legacy)
    state = server.state
    if state.global_params is None:
        raise ConfigError("SecAgg+: no round completed (rounds=0, or no node answered); "
                          "nothing to write")
    personalized = None
    if state.best_params is not None and cfg.personalize_epochs > 0 and algorithm.personalizes:
        personalized = personalized_of(strategy.replies(evaluate_all(
            grid, strategy.as_arrays(state.best_params),
            {"personalize-epochs": cfg.personalize_epochs}, timeout)), cfg.personalize_epochs)
    held = next((sizes[n] for n, role in nodes.values() if role == "heldout"), {})
    return server.finish(
        zero, personalized=personalized,
        clients=[ClientInfo(c, *(sizes[c].get(f"num-{s}") for s in ("train", "val", "test")))
                 for c in train],
        heldout_images=held.get("num-test", 0), runtime="flower-secagg+",
        dataset=dataset_name(cfg), classes=classes, logit_scale=logit_scale, dim=dim,
        seconds=time.perf_counter() - start,
        trainable_params=algorithm.trainable_parameters(state.params), transfer="fp32")


server_app = build_server_app()
