"""The SecAgg+ ClientApp: one site as a legacy ``Client`` under ``secaggplus_mod``, trained and
scored through the same client entry as every runtime (:mod:`fedclip.core.client`)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

from fedclip.algorithms.base import Algorithm
from fedclip.allocator import keep_freed_memory
from fedclip.core.client import RoundConfig, client_job, evaluate, personalize, run_job, score
from fedclip.flower.codec import finite_number
from fedclip.flower.node import node_for
from fedclip.flower.settings import run_config_to_cfg
from fedclip.flower.site import Site
from fedclip.tensors import Params

OK = Status(Code.OK, "")
MAX_SAMPLED_CHARS = 1 << 20  # the sampled-clients list a round's config may carry


def wire(array: np.ndarray) -> np.ndarray:
    """An array as it travels through SecAgg+: a 0-d one (a model's logit scale) as one
    element (Flower's masking of a 0-d array unmasks to a wrong value)."""
    return array.reshape(1) if array.ndim == 0 else array


class AdapterClient(NumPyClient):
    """One site under SecAgg+: the algorithm's shared parameters as arrays in ``keys`` order,
    trained and scored through the same client entry as every runtime."""

    def __init__(self, site: Site, algorithm: Algorithm) -> None:
        self.site, self.algorithm = site, algorithm
        self.init = algorithm.init_global(site.class_text.shape[1]) or {}
        self.keys = list(self.init)

    def get_parameters(self, config):  # noqa: ANN001, ANN201
        """The initial parameters (the server asks one node; it holds no backbone)."""
        return [wire(self.init[k].cpu().numpy()) for k in self.keys]

    def _params(self, arrays: list[np.ndarray]) -> Params:
        device = self.site.class_text.device
        return {k: torch.from_numpy(np.asarray(a, dtype=np.float32).reshape(self.init[k].shape))
                .to(device) for k, a in zip(self.keys, arrays, strict=True)}

    def fit(self, parameters, config):  # noqa: ANN001, ANN201
        """One round (:func:`fedclip.core.client.run_job` with the server's ``RoundConfig``).
        The client weighs itself inside the secure sum: its train size capped at the server's
        ``weight-cap`` (``weighted``) or 1 (``uniform``); 0 for the held-out node, a client not
        sampled this round and one whose training diverged (its parameters unchanged)."""
        site = self.site
        sampled = str(config.get("sampled", ""))[:MAX_SAMPLED_CHARS]
        if site.data is None or (sampled and site.name not in json.loads(sampled)):
            return parameters, 0, {}
        round_config = RoundConfig.from_record(dict(config))
        client = self.algorithm.client
        job = client_job(client, site.name, site.data.train, self._params(parameters), {},
                         round_config, {}, site.class_text, site.logit_scale)
        update = run_job(client, job)
        if update is None:
            return parameters, 0, {"diverged": 1}
        weight = 1.0
        if self.algorithm.cfg.aggregation == "weighted":  # capped as in every runtime
            cap = finite_number(config.get("weight-cap"), 0)
            weight = float(update.num_examples) if cap is None else \
                min(float(update.num_examples), cap)
        return ([wire(update.params[k].cpu().numpy()) for k in self.keys], weight,
                {"train-loss": update.loss})

    def evaluate(self, parameters, config):  # noqa: ANN001, ANN201
        """Val/test (training nodes) or the held-out domain; zero-shot or personalization
        when the config asks."""
        site, algo = self.site, self.algorithm.client
        params = None if config.get("zeroshot", False) else self._params(parameters)
        args = (site.class_text, site.logit_scale)
        common = {"client": site.name, "logit-scale": float(site.logit_scale),
                  "dim": int(site.class_text.shape[1])}
        prefix = "zeroshot-" if params is None else ""
        epochs = int(config.get("personalize-epochs", 0))
        nothing = params is None and not self.algorithm.has_zero_shot  # NaN: none to score
        if site.data is None:
            assert site.heldout is not None  # a site is a training or the held-out one
            held = evaluate(algo, params, site.heldout, *args, site.heldout_mask) \
                if not nothing else None
            return 0.0, max(len(site.heldout), 1), {
                **common, f"{prefix}heldout-accuracy": held.accuracy if held else math.nan,
                "num-test": len(site.heldout)}
        if epochs > 0 and params is not None:
            acc, epoch = personalize(algo, params, site.data, *args, epochs)
            return 0.0, 1, {**common, "personalized-accuracy": acc, "personalized-epoch": epoch}
        val, test = score(algo, site.data, params, {}, *args) if not nothing else \
            (math.nan, math.nan)
        return 0.0, max(len(site.data.test), 1), {
            **common, f"{prefix}val-accuracy": val, f"{prefix}test-accuracy": test,
            "num-train": len(site.data.train), "num-val": len(site.data.val),
            "num-test": len(site.data.test)}


class ExactWeights(Client):
    """:class:`AdapterClient` as a Flower ``Client``: a fit's weight travels as the float it
    is (the capped train size, as every runtime weighs), where ``NumPyClient`` would demand an
    integer and so truncate the cap."""

    def __init__(self, inner: AdapterClient) -> None:
        self.inner = inner

    def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
        return GetParametersRes(OK, ndarrays_to_parameters(self.inner.get_parameters(
            ins.config)))

    def fit(self, ins: FitIns) -> FitRes:
        arrays, weight, metrics = self.inner.fit(parameters_to_ndarrays(ins.parameters),
                                                 ins.config)
        return FitRes(OK, ndarrays_to_parameters(arrays), weight, metrics)

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        loss, count, metrics = self.inner.evaluate(parameters_to_ndarrays(ins.parameters),
                                                   ins.config)
        return EvaluateRes(OK, loss, count, metrics)


def build_client_app(defaults: dict[str, Any] | None = None) -> ClientApp:
    """The SecAgg+ ClientApp (``secaggplus_mod`` around an :class:`AdapterClient`)."""
    def client_fn(context: Context):  # noqa: ANN202
        keep_freed_memory()  # a process fedclip owns (fedclip.allocator)
        cfg, _ = run_config_to_cfg({**(defaults or {}), **dict(context.run_config)})
        return ExactWeights(AdapterClient(*node_for(cfg, dict(context.node_config))))

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


client_app = build_client_app()
