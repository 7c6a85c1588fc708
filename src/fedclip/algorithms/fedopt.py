"""Server optimizers on the averaged adapter delta (Reddi et al., 2021; Hsu et al., 2019):
FedAdam, FedYogi, FedAvgM, with the same update rules as Flower's strategies of those names.

Clients train as in FedCLIP; the server averages their adapters (``aggregation``), takes
``delta = average - current`` as a pseudo-gradient and steps its own optimizer, whose moments
are server state (checkpointed and resumed like any other state).

* FedAdam: ``m = b1 m + (1-b1) delta``; ``v = b2 v + (1-b2) delta^2``;
  ``x += lr * sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) * m / (sqrt(v) + tau)`` (Flower's form);
* FedYogi: ``v = v - (1-b2) delta^2 sign(v - delta^2)``; ``x += lr * m / (sqrt(v) + tau)``;
* FedAvgM: ``u = momentum u + (-delta)``; ``x -= lr u`` (``lr = 1``, ``momentum = 0``: FedAvg).

FedAdam reduces to FedAvg only in the limit ``server_lr = tau -> inf`` with ``betas = 0``
(``x + tau delta / (|delta| + tau)``); with ``tau -> 0`` it becomes sign descent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedclip.algorithms.base import Algorithm, ClientUpdate, ServerSide, State
from fedclip.algorithms.registry import register
from fedclip.tensors import Params

STEP = "t"


class AdaptiveOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    server_lr: float = Field(1e-2, gt=0, allow_inf_nan=False, description="Server step (eta).")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0, allow_inf_nan=False, description="Adaptivity (epsilon).")


class MomentumOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    server_lr: float = Field(1.0, gt=0, allow_inf_nan=False)
    momentum: float = Field(0.9, ge=0, lt=1)


class ServerOptimizerServer(ServerSide):
    """ServerOptimizer's server side."""

    def init_server_state(self, global_params: Params) -> State:
        zeros = {k: torch.zeros_like(v) for k, v in self.shared(global_params).items()}
        return {**{f"m/{k}": v for k, v in zeros.items()},
                **{f"v/{k}": v.clone() for k, v in zeros.items()}, STEP: torch.zeros(())}

    def aggregate(self, current: Params, updates: Sequence[ClientUpdate], server_state: State
                  ) -> tuple[Params, State]:
        average, _ = super().aggregate(current, updates, server_state)
        t = int(server_state[STEP]) + 1
        params, state = dict(current), {STEP: torch.tensor(float(t))}
        for k, avg in self.shared(average).items():
            params[k], state[f"m/{k}"], state[f"v/{k}"] = self.step(
                current[k], avg - current[k], server_state[f"m/{k}"], server_state[f"v/{k}"], t)
        return params, state


class ServerOptimizer(Algorithm):
    """Clients as FedCLIP; the server steps an optimizer on the averaged delta."""

    batchable = True
    Options: ClassVar[type[BaseModel]] = AdaptiveOptions  # FedAdam, FedYogi; FedAvgM: its own
    options: Any  # an instance of the subclass's Options
    Server = ServerOptimizerServer

    def step(self, x: torch.Tensor, delta: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
             t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One server step on ``x`` from the averaged delta; the new (x, m, v)."""
        raise NotImplementedError

    def first_moment(self, m: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The first moment after ``delta`` (beta1 average)."""
        return self.options.beta1 * m + (1 - self.options.beta1) * delta


@register
class FedAdam(ServerOptimizer):
    name = "fedadam"
    summary = "FedCLIP clients; the server steps Adam on the averaged delta"

    def step(self, x, delta, m, v, t):  # noqa: ANN001, ANN201
        o, m = self.options, self.first_moment(m, delta)
        v = o.beta2 * v + (1 - o.beta2) * delta**2
        eta = o.server_lr * (1 - o.beta2 ** (t + 1)) ** 0.5 / (1 - o.beta1 ** (t + 1))
        return x + eta * m / (v.sqrt() + o.tau), m, v


@register
class FedYogi(ServerOptimizer):
    name = "fedyogi"
    summary = "FedCLIP clients; the server steps Yogi on the averaged delta"

    def step(self, x, delta, m, v, t):  # noqa: ANN001, ANN201
        o, m = self.options, self.first_moment(m, delta)
        v = v - (1 - o.beta2) * delta**2 * torch.sign(v - delta**2)
        return x + o.server_lr * m / (v.sqrt() + o.tau), m, v


@register
class FedAvgM(ServerOptimizer):
    name = "fedavgm"
    summary = "FedCLIP clients; server momentum on the averaged delta"
    Options = MomentumOptions

    def step(self, x, delta, m, v, t):  # noqa: ANN001, ANN201
        o = self.options
        m = -delta if t == 1 else o.momentum * m - delta  # Flower: the first round seeds it
        return x - o.server_lr * m, m, v
