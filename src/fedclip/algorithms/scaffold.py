"""SCAFFOLD (Karimireddy et al., 2020): control variates correct each client's drift.

Server state ``c`` (the global control variate) travels down with every round; each client
keeps its own ``c_i`` in its state and sends back ``delta c_i``. The local objective adds
``<c - c_i, w>``, whose gradient is the correction ``c - c_i`` of option II, so the same
optimizer (Adam, with the reference's L2) applies it. After K local steps with learning rate
``lr``: ``c_i+ = c_i - c + (x - y_i) / (K lr)``; the server moves ``c`` by
``|S|/N * mean(delta c_i)``. (With Adam the (x - y)/(K lr) estimate of the mean gradient is
an approximation; with SGD it is exact.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

import torch
from torch import nn

from fedclip.algorithms.base import (
    Algorithm,
    ClientJob,
    ClientSide,
    ClientUpdate,
    ServerSide,
    State,
)
from fedclip.algorithms.registry import register
from fedclip.core.client import RoundConfig, steps_per_round
from fedclip.tensors import Params

C, CI, DC = "c/", "ci/", "dc/"  # server variate (sent), client variate (kept), its change (sent)


class ScaffoldClient(ClientSide):
    """Scaffold's client side."""

    def local_loss(self, loss: torch.Tensor, module: nn.Module, job: ClientJob) -> torch.Tensor:
        named = dict(module.named_parameters())
        correction = sum(((job.extras[C + k] - job.state.get(CI + k, 0.0)) * named[k]).sum()
                         for k in named if C + k in job.extras)
        return loss + correction

    def train_client(self, job: ClientJob) -> ClientUpdate:
        update = super().train_client(job)
        scale = 1.0 / (max(update.steps, 1) * job.config.lr)
        deltas = {}
        for k, y in update.params.items():
            c_i = job.state.get(CI + k, torch.zeros_like(y))
            new = c_i - job.extras[C + k] + (job.params[k] - y) * scale
            deltas[DC + k], job.state[CI + k] = new - c_i, new
        return replace(update, extras=deltas)


class ScaffoldServer(ServerSide):
    """Scaffold's server side."""

    def init_server_state(self, global_params: Params) -> State:
        return {C + k: torch.zeros_like(v) for k, v in self.shared(global_params).items()}

    def client_extras(self, server_state: State, client: str) -> dict[str, torch.Tensor]:
        return {k: v for k, v in server_state.items() if k.startswith(C)}

    def reply_extras(self, global_params: Params) -> dict[str, torch.Size]:
        return {DC + k: v.shape for k, v in self.shared(global_params).items()}

    def check_extras(self, current: Params, update: ClientUpdate, server_state: State,
                     config: RoundConfig, quantum: float) -> str | None:
        """``dc_i = c_i+ - c_i = -c + (x - y_i) / (K lr)``: the client's own variate cancels,
        so the server bounds ``||dc_i + c||`` by what the (already accepted) parameters allow,
        ``||x - y_i|| / (K lr)``, with K counted from the declared train size (not from the
        reply) and slack for the transfer's rounding. A variate change of 3e38 is refused
        however its parameters look."""
        steps = steps_per_round(self.cfg, update.num_examples, config.local_epochs)
        if update.steps != steps:
            return f"reported {update.steps} local steps, its train size gives {steps}"

        def norm(tensors: Iterable[torch.Tensor]) -> float:
            return float(torch.sqrt(sum(((v.double() ** 2).sum() for v in tensors),
                                        torch.zeros((), dtype=torch.float64))))

        moved = norm(current[k] - y for k, y in update.params.items())
        rounding = quantum * (norm(update.params.values()) + norm(current[k] for k in
                                                                  update.params))
        drift = norm(update.extras[DC + k] + server_state[C + k] for k in update.params)
        change = norm(update.extras.values())
        variate = norm(server_state[C + k] for k in update.params)
        bound = (moved + rounding) / (max(steps, 1) * config.lr) * (1 + quantum) \
            + quantum * (change + variate) + 1e-6
        if drift > bound:
            return (f"control variate change of norm {change:.3g} is not what its parameters "
                    f"imply (off by {drift:.3g}, bound {bound:.3g})")
        return None

    def aggregate(self, current: Params, updates: Sequence[ClientUpdate], server_state: State
                  ) -> tuple[Params, State]:
        params, _ = super().aggregate(current, updates, server_state)
        total = max(self.num_clients, len(updates))
        state = {k: v + sum(u.extras[DC + k.removeprefix(C)] for u in updates) / total
                 for k, v in server_state.items()}
        return params, state


@register
class Scaffold(Algorithm):
    name = "scaffold"
    summary = "the adapter with SCAFFOLD control variates (server and client state)"
    aggregates_mean = False  # the control variates' changes travel per client
    Client = ScaffoldClient
    Server = ScaffoldServer
