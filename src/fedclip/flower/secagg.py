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

import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, MessageType
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import EvaluateIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid, ServerApp

from fedclip import privacy
from fedclip.algorithms import get_algorithm
from fedclip.algorithms.base import Algorithm
from fedclip.callbacks import Callback, close, loggers_from_specs, round_end, run_end
from fedclip.config import FlowerSettings, RunConfig
from fedclip.core.client import (
    ClientJob,
    ClientUpdate,
    RoundConfig,
    client_clip,
    evaluate,
    personalize,
    round_seed,
    weight_cap,
)
from fedclip.core.records import ClientInfo, Personalized, RoundRecord, RunResult
from fedclip.core.run_folder import RunFolder
from fedclip.core.server import server_rules
from fedclip.core.state import FederationState
from fedclip.errors import ConfigError
from fedclip.flower.codec import finite_number, require_one_heldout, run_config_to_cfg
from fedclip.flower.grid import PollingGrid
from fedclip.flower.node import node_for
from fedclip.flower.secagg_guard import GuardedSecAggPlusWorkflow, implausible_mean
from fedclip.flower.server_app import dataset_name
from fedclip.task import Site, prompts, run_classes
from fedclip.tensors import Params, all_finite

SECURE_AGGREGATIONS = ("weighted", "uniform")
SECAGG_CLIPPING_RANGE = 8.0  # SecAggPlusWorkflow's default clipping_range: values travel in it


def refusal(algorithm: Algorithm, flower: FlowerSettings) -> str | None:
    """Why this run cannot go through SecAgg+ (None: it can)."""
    cfg, name = algorithm.cfg, algorithm.name
    if not algorithm.runs_on_flower:
        return f"algorithm {name!r} does not run on Flower; run it in-process"
    if not algorithm.aggregates_mean:
        return (f"algorithm {name!r} sends per-client extras with its update, which a secure "
                f"sum cannot carry; run it without SecAgg+")
    if algorithm.keeps_own_models:
        return (f"algorithm {name!r} keeps a model per client (personal parameters or "
                f"state), which SecAgg+'s legacy client cannot keep; run it without SecAgg+")
    if cfg.optimizer_state == "keep":
        return "optimizer_state=keep keeps client state; SecAgg+ runs with 'reset'"
    if cfg.aggregation not in SECURE_AGGREGATIONS:
        return (f"aggregation={cfg.aggregation!r} needs the individual updates, which SecAgg+ "
                f"hides; use {' or '.join(SECURE_AGGREGATIONS)}")
    if cfg.dp == "server":
        return ("dp=server clips the individual updates, which SecAgg+ hides; use dp=client "
                "(each client clips its own update, the server noises the secure sum)")
    if flower.resume:
        return ("resume=true is not available with SecAgg+ (Flower's legacy workflow cannot "
                "start from a checkpoint); start the run again into a new out")
    return None


class AdapterClient(NumPyClient):
    """One site under SecAgg+: the algorithm's shared parameters as arrays in ``keys`` order."""

    def __init__(self, site: Site, algorithm: Algorithm) -> None:
        self.site, self.algorithm = site, algorithm
        self.init = algorithm.init_global(site.class_text.shape[1]) or {}
        self.keys = list(self.init)

    def get_parameters(self, config):  # noqa: ANN001, ANN201
        """The initial parameters (the server asks one node; it holds no backbone)."""
        return [self.init[k].cpu().numpy() for k in self.keys]

    def _params(self, arrays: list[np.ndarray]) -> Params:
        device = self.site.class_text.device
        return {k: torch.from_numpy(np.asarray(a, dtype=np.float32)).to(device)
                for k, a in zip(self.keys, arrays, strict=True)}

    def fit(self, parameters, config):  # noqa: ANN001, ANN201
        """One round (``Algorithm.train_client`` with the server's ``RoundConfig``); the
        weight is the train size (``weighted``) or 1 (``uniform``)."""
        if self.site.data is None:  # the held-out node: weight 0, adapter unchanged
            return parameters, 0, {}
        round_config = RoundConfig.from_record(dict(config))
        start = self._params(parameters)
        job = ClientJob(self.site.name, self.site.data.train, start, start, {}, round_config,
                        {}, self.site.class_text, self.site.logit_scale,
                        round_seed(self.algorithm.cfg.seed, round_config.server_round,
                                   self.site.name))
        update = self.algorithm.train_client(job)
        update = replace(update, params=client_clip(self.algorithm.cfg, update.params, start))
        weight = 1
        if self.algorithm.cfg.aggregation == "weighted":  # capped as in every runtime (a
            cap = finite_number(config.get("weight-cap"), 0)  # whole number: a legacy count)
            weight = update.num_examples if cap is None else min(update.num_examples, int(cap))
        return ([update.params[k].cpu().numpy() for k in self.keys], weight,
                {"train-loss": update.loss})

    def evaluate(self, parameters, config):  # noqa: ANN001, ANN201
        """Val/test (training nodes) or the held-out domain; zero-shot or personalization
        when the config asks."""
        site, algo = self.site, self.algorithm
        params = None if config.get("zeroshot", False) else self._params(parameters)
        args = (site.class_text, site.logit_scale)
        common = {"client": site.name, "logit-scale": float(site.logit_scale),
                  "dim": int(site.class_text.shape[1])}
        epochs = int(config.get("personalize-epochs", 0))
        if site.data is None:
            held = evaluate(algo, params, site.heldout, *args, site.heldout_mask)
            return 0.0, max(held.num_examples, 1), {**common, "heldout-accuracy": held.accuracy,
                                                    "num-test": held.num_examples}
        if epochs > 0 and params is not None:
            acc, epoch = personalize(algo, params, site.data, *args, epochs)
            return 0.0, 1, {**common, "personalized-accuracy": acc, "personalized-epoch": epoch}
        val = evaluate(algo, params, site.data.val, *args, site.data.class_mask)
        test = evaluate(algo, params, site.data.test, *args, site.data.class_mask)
        return test.loss, max(test.num_examples, 1), {
            **common, "val-accuracy": val.accuracy, "test-accuracy": test.accuracy,
            "num-train": len(site.data.train), "num-val": len(site.data.val),
            "num-test": len(site.data.test)}


def build_client_app(defaults: dict[str, Any] | None = None) -> ClientApp:
    """The SecAgg+ ClientApp (``secaggplus_mod`` around an :class:`AdapterClient`)."""
    def client_fn(context: Context):  # noqa: ANN202
        cfg, _ = run_config_to_cfg({**(defaults or {}), **dict(context.run_config)})
        return AdapterClient(*node_for(cfg, dict(context.node_config))).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


def build_server_app(defaults: dict[str, Any] | None = None) -> ServerApp:
    """The SecAgg+ ServerApp (:func:`run`)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run(grid, context, {**(defaults or {}), **dict(context.run_config)}, poll=True)

    return app


class SecureStrategy(LegacyFedAvg):
    """The legacy FedAvg whose hooks run fedclip's contract: the round's ``RoundConfig`` goes
    down, the algorithm's ``aggregate`` runs on the secure mean, and each evaluated round is
    recorded (by node id: a node's name and role are fixed by its first answer) and selected
    with ``FederationState.select``."""

    def __init__(self, algorithm: Algorithm, grid: Grid, callbacks: list[Callback],
                 timeout: float, noise: torch.Generator | None = None, **kwargs: Any) -> None:
        super().__init__(on_fit_config_fn=self.fit_config, **kwargs)
        self.noise = noise  # the DP noise's source (None: privacy.secret_generator, a fresh
        # secret each round; tests inject one)
        self.algorithm, self.grid, self.callbacks, self.timeout = (algorithm, grid, callbacks,
                                                                   timeout)
        self.state = FederationState(0, None)
        # the same rules as every runtime (rounds under a DP budget, DP, the best-round rule)
        self.rules = server_rules(algorithm.cfg, algorithm, algorithm.num_clients)
        self.keys: list[str] = []
        self.names: dict[int, tuple[str, str]] = {}  # node id -> (client, role)
        self.sizes: dict[str, dict[str, int]] = {}
        self.logit_scale, self.dim = float("nan"), 0
        self.started = time.perf_counter()
        self.drops: dict[str, str] = {}  # this round: client -> why the guard dropped it

    def dropped(self, server_round: int, node_id: int, why: str) -> None:
        """The SecAgg+ guard dropped a node's reply this round (recorded as rejected)."""
        self.drops[self.names.get(node_id, (f"node {node_id}", ""))[0]] = why

    def refused(self, server_round: int, why: str) -> None:
        """The SecAgg+ guard ended a round without an aggregate: recorded, params unchanged."""
        record = RoundRecord(server_round, epsilon=self.rules.epsilon(server_round),
                             rejected={**self.drops, "secure aggregation": why})
        self.drops = {}
        self.state.round = server_round
        record.seconds = time.perf_counter() - self.started
        self.state.history.append(record)

    def fit_config(self, server_round: int) -> dict[str, Any]:
        """The round's ``RoundConfig`` and the weight cap (``core.client.weight_cap`` of the
        train sizes the nodes reported at round 0): clients weigh themselves inside the secure
        sum, so the cap travels to them."""
        sizes = {k.removeprefix("train:"): v["num-train"] for k, v in self.sizes.items()
                 if k.startswith("train:") and "num-train" in v}
        cap = weight_cap(sizes, self.algorithm.cfg)
        return {**self.algorithm.round_config(server_round).record(),
                **({"weight-cap": cap} if cap is not None else {})}

    # --- parameters -----------------------------------------------------------------------
    def as_params(self, arrays: list[np.ndarray]) -> Params:
        """Legacy arrays back as named tensors (``keys`` order)."""
        return {k: torch.from_numpy(np.asarray(a, dtype=np.float32)).clone()
                for k, a in zip(self.keys, arrays, strict=True)}

    def as_arrays(self, params: Params) -> list[np.ndarray]:
        """Named tensors as legacy arrays (``keys`` order)."""
        return [params[k].detach().cpu().numpy() for k in self.keys]

    def start(self, initial: list[np.ndarray]) -> None:
        """Round 0: the initial parameters (from a node), evaluated before round 1 trains."""
        dim = int(initial[0].shape[-1])
        module = self.algorithm.build_module(dim)
        shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        if [tuple(a.shape) for a in initial] != list(shapes.values()):
            raise ConfigError(f"the node's initial parameters do not fit algorithm "
                              f"{self.algorithm.name!r} (shapes {[a.shape for a in initial]})")
        self.keys = list(shapes)
        params = self.as_params(initial)
        self.state = FederationState(0, params,
                                     server_state=self.algorithm.init_server_state(params))
        record = RoundRecord(0)
        record.set_evaluation(*self.record_metrics(evaluate_all(self.grid, initial, {},
                                                                self.timeout)))
        self.state.history.append(record)
        self.state.select(record, self.rules.selection)
        round_end(self.callbacks, self.algorithm.cfg.heldout, record)

    # --- the legacy hooks -----------------------------------------------------------------
    def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        self.started = time.perf_counter()
        self.drops = {}
        if server_round == 1:
            self.start(parameters_to_ndarrays(parameters))
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, ANN201
        if not results:
            return None, {}
        arrays = parameters_to_ndarrays(results[0][1].parameters)
        mean = self.as_params(arrays)
        wrong = implausible_mean(arrays, SECAGG_CLIPPING_RANGE)  # a wrong key share
        losses = {self.names.get(p.node_id, (str(p.node_id), ""))[0]: loss
                  for p, r in results if r.num_examples > 0
                  and (loss := finite_number(r.metrics.get("train-loss"))) is not None}
        record = RoundRecord(server_round, losses, epsilon=self.rules.epsilon(server_round))
        plan = self.rules.privacy
        if plan is not None and all_finite(mean) and not wrong:  # dp=client: noise the sum
            answered = sum(1 for _, r in results if r.num_examples > 0)
            shared = self.state.params
            total = {k: shared[k] + (v - shared[k]) * answered for k, v in mean.items()}
            mean = privacy.noisy_mean(shared, [total], plan.sampled, plan.clipping_norm,
                                      plan.noise_multiplier, self.noise if self.noise
                                      is not None else privacy.secret_generator())
        record.rejected, self.drops = dict(self.drops) or None, {}
        if not all_finite(mean) or wrong:
            record.rejected = {**(record.rejected or {}), "secure mean": wrong or
                               "not finite; the global parameters are unchanged"}
            new, server_state = self.state.params, self.state.server_state
        else:  # the secure mean as the round's one update: aggregate() takes its own step
            new, server_state = self.algorithm.aggregate(
                self.state.params, [ClientUpdate(mean, {}, 0, float("nan"))],
                self.state.server_state)
        self.state.global_params, self.state.server_state = new, server_state
        self.state.round = server_round
        record.seconds = time.perf_counter() - self.started
        self.state.history.append(record)
        return ndarrays_to_parameters(self.as_arrays(new)), {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        cfg = self.algorithm.cfg
        if server_round % cfg.eval_every and server_round != self.rules.rounds:
            return []
        return super().configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: ANN001, ANN201
        record = self.state.history[-1]
        record.set_evaluation(*self.record_metrics(
            [(p.node_id, dict(r.metrics)) for p, r in results]))
        record.round_seconds = time.perf_counter() - self.started
        self.state.select(record, self.rules.selection)
        round_end(self.callbacks, self.algorithm.cfg.heldout, record)
        return super().aggregate_evaluate(server_round, results, failures)

    # --- evaluation replies ---------------------------------------------------------------
    def record_metrics(self, replies: list[tuple[int, dict]], prefix: str = ""
                       ) -> tuple[dict[str, float], dict[str, float], float | None]:
        """(val, test, held-out) from evaluation replies, each value a number in [0, 1]."""
        val, test, heldout = {}, {}, None
        for node_id, metrics in replies:
            name, role = self.names.setdefault(node_id, (
                str(metrics.get("client")),
                "heldout" if "heldout-accuracy" in metrics else "train"))
            self._remember(name, role, metrics)
            if role == "heldout":
                heldout = finite_number(metrics.get(f"{prefix}heldout-accuracy"), 0.0, 1.0)
                continue
            v = finite_number(metrics.get(f"{prefix}val-accuracy"), 0.0, 1.0)
            t = finite_number(metrics.get(f"{prefix}test-accuracy"), 0.0, 1.0)
            if v is not None and t is not None:
                val[name], test[name] = v, t
        return val, test, heldout

    def _remember(self, name: str, role: str, metrics: dict) -> None:
        scale = finite_number(metrics.get("logit-scale"), 1e-6)
        self.logit_scale = scale if scale is not None else self.logit_scale
        self.dim = int(finite_number(metrics.get("dim"), 1) or self.dim)
        sizes = {k: int(v) for k in ("num-train", "num-val", "num-test")
                 if (v := finite_number(metrics.get(k), 0)) is not None}
        self.sizes.setdefault(f"{role}:{name}", sizes)


def evaluate_all(grid: Grid, arrays: list[np.ndarray], config: dict, timeout: float
                 ) -> list[tuple[int, dict]]:
    """One legacy evaluate exchange with every node (round 0, zero-shot, personalization)."""
    ins = EvaluateIns(ndarrays_to_parameters(arrays), config)
    messages = [Message(compat.evaluateins_to_recorddict(ins, True), dst_node_id=n,
                        message_type=MessageType.EVALUATE) for n in grid.get_node_ids()]
    replies = []
    for msg in grid.send_and_receive(messages, timeout=timeout):
        if msg.has_content():
            res = compat.recorddict_to_evaluateres(msg.content)
            replies.append((msg.metadata.src_node_id, dict(res.metrics)))
    return replies


def run(grid: Grid, context: Context, run_config: dict[str, Any], poll: bool = False
        ) -> RunResult:
    """Train with SecAgg+; the run folder writes the adapters and results.json (``poll``:
    as :func:`fedclip.flower.server_app.main`)."""
    cfg, flower = run_config_to_cfg(run_config)
    if poll:
        grid = PollingGrid(grid, flower.poll_interval)
    require_one_heldout(cfg)
    algorithm = get_algorithm(cfg)
    why = refusal(algorithm, flower)
    if why is not None:
        raise ConfigError(f"SecAgg+: {why}")
    classes = run_classes(cfg)
    algorithm.setup(prompts(cfg, classes))
    folder = RunFolder(flower.out, cfg)
    callbacks = loggers_from_specs([flower.log_to], flower.out)
    try:
        with folder.claimed():
            folder.prepare([cfg.heldout], resume=False)
            return _run(grid, context, cfg, flower, algorithm, classes, folder, callbacks)
    finally:
        close(callbacks)


def _run(grid: Grid, context: Context, cfg: RunConfig, flower: FlowerSettings,
         algorithm: Algorithm, classes: tuple[str, ...], folder: RunFolder,
         callbacks: list[Callback]) -> RunResult:
    nodes = max(flower.min_nodes, len(list(grid.get_node_ids())))
    algorithm.num_clients = nodes - 1
    strategy = SecureStrategy(algorithm, grid, callbacks, flower.round_timeout,
                              fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=nodes,
                              min_evaluate_clients=nodes, min_available_clients=nodes)
    folder.write_config()
    writer = folder.start(cfg.heldout, None)
    start = time.perf_counter()
    legacy = LegacyContext(context=context,
                           config=ServerConfig(num_rounds=strategy.rules.rounds),
                           strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=GuardedSecAggPlusWorkflow(  # a bad reply drops
        num_shares=nodes, reconstruction_threshold=max(2, nodes - 1),  # its client, or the
        on_drop=strategy.dropped, on_refuse=strategy.refused,  # round is refused in one line
        # uniform: every weight is 1, so a scale of 1 keeps them exact (at 10,000 a weight of
        # 1 is quantized to a few levels and the mean is off by percents)
        max_weight=1.0 if cfg.aggregation == "uniform" else flower.secagg_max_weight))
    workflow(grid, legacy)
    state = strategy.state
    if state.global_params is None:
        raise ConfigError("SecAgg+: no round completed (rounds=0, or no node answered); "
                          "nothing to write")
    zero = RoundRecord(0)
    zero.set_evaluation(*strategy.record_metrics(
        evaluate_all(grid, strategy.as_arrays(state.params), {"zeroshot": True},
                     flower.round_timeout)))
    personalized = None
    if state.best_params is not None and cfg.personalize_epochs > 0 and algorithm.personalizes:
        replies = evaluate_all(grid, strategy.as_arrays(state.best_params),
                               {"personalize-epochs": cfg.personalize_epochs},
                               flower.round_timeout)
        per, epochs = {}, {}
        for node_id, metrics in replies:
            name, role = strategy.names.get(node_id, ("", "heldout"))
            acc = finite_number(metrics.get("personalized-accuracy"), 0.0, 1.0)
            epoch = finite_number(metrics.get("personalized-epoch"), 0, cfg.personalize_epochs)
            if role == "train" and acc is not None and epoch is not None:
                per[name], epochs[name] = acc, int(epoch)
        personalized = Personalized(per, epochs)
    train = sorted(name for name, role in strategy.names.values() if role == "train")
    held = strategy.sizes.get(f"heldout:{cfg.heldout}", {})
    result = writer.result(
        state, zero, dataset=dataset_name(cfg),
        trainable_params=sum(v.numel() for v in state.params.values()),
        seconds=time.perf_counter() - start,
        clients=[ClientInfo(c, *(strategy.sizes.get(f"train:{c}", {}).get(f"num-{s}")
                                 for s in ("train", "val", "test"))) for c in train],
        heldout_images=held.get("num-test", 0), runtime="flower-secagg+",
        personalized=personalized, transfer="fp32", **strategy.rules.extra(state.round))
    writer.finish(result, [("adapter", state.best_params, state.best_round),
                           ("adapter-last", state.params, state.round)],
                  classes, strategy.logit_scale, strategy.dim)
    run_end(callbacks, cfg.heldout, result)
    return result


client_app = build_client_app()
server_app = build_server_app()
