"""Many clients' local rounds at once, on one device: the same module and the same optimizer.

``train_local`` (one client after another) is the reference; this computes the same thing for
algorithms whose clients minimise the task loss plus an optional proximal term
(``Algorithm.batchable``: FedCLIP, FedProx and the server optimizers). Nothing is written
twice: each client's forward is the algorithm's own module, called through
``torch.func.functional_call`` and vectorised over the clients with ``torch.func.vmap``; the
loss is the algorithm's ``task_loss``; each client's parameters are leaf tensors of one
``torch.optim.Adam`` (one parameter group per client, with its round's learning rate). Every
client draws its batches exactly as ``train_local`` does; a step runs one vectorised forward
and backward per batch size, and a client without a batch at that step has no gradient, so
Adam leaves it (and its step count) alone. Results equal the sequential loop to float
rounding (tested to 1e-5).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch.func import functional_call, vmap

from fedclip.core.client import (
    ClientJob,
    ClientUpdate,
    Model,
    adam,
    batch_schedule,
    diverged,
)
from fedclip.losses import proximal_term


class Batchable(Model, Protocol):
    """A :class:`Model` whose local objective is the task loss + a proximal term."""

    def proximal_weight(self, job: ClientJob) -> float:
        """The weight of the proximal term for ``job`` (0: none)."""


def train_together(algorithm: Batchable, jobs: Sequence[ClientJob]) -> list[ClientUpdate]:
    """The local rounds of ``jobs`` (one per client) at once; see the module docstring."""
    cfg = algorithm.cfg
    start = time.perf_counter()
    device = jobs[0].train.x.device
    template = algorithm.build_module(jobs[0].train.x.shape[1]).to(device)
    names = [n for n, _ in template.named_parameters()]
    leaves = [{n: job.params[n].detach().to(device).clone().requires_grad_(True) for n in names}
              for job in jobs]
    optimizer = adam(cfg, [{"params": list(p.values()), "lr": job.config.lr}
                           for p, job in zip(leaves, jobs, strict=True)])
    mus = [algorithm.proximal_weight(job) for job in jobs]
    text, scale = jobs[0].class_text, jobs[0].logit_scale

    def task_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
                  ) -> torch.Tensor:
        module: Callable[[torch.Tensor], torch.Tensor] = lambda inp: functional_call(  # noqa: E731
            template, params, (inp,))
        emb = algorithm.embed(module, x)
        return algorithm.task_loss(emb, y, algorithm.class_text(module, text), scale)

    batched_loss = vmap(task_loss)
    plans = [batch_schedule(cfg, len(job.train), job.config.local_epochs, job.seed)
             for job in jobs]
    losses: list[list[float]] = [[] for _ in jobs]
    for t in range(max((len(p) for p in plans), default=0)):
        by_size: dict[int, list[int]] = {}
        for i, plan in enumerate(plans):
            if t < len(plan):
                by_size.setdefault(len(plan[t]), []).append(i)
        optimizer.zero_grad(set_to_none=True)
        for group in by_size.values():
            batches = [plans[i][t].to(device) for i in group]
            x = torch.stack([jobs[i].train.x[b] for i, b in zip(group, batches, strict=True)])
            y = torch.stack([jobs[i].train.y[b] for i, b in zip(group, batches, strict=True)])
            params = {n: torch.stack([leaves[i][n] for i in group]) for n in names}
            task = batched_loss(params, x, y)
            prox = torch.stack([proximal_term(leaves[i], jobs[i].global_params, mus[i])
                                if mus[i] else task.new_zeros(()) for i in group])
            total = task + prox
            if not torch.isfinite(total).all():
                bad = next(float(v) for v in total if not torch.isfinite(v))
                raise diverged(jobs[group[0]].config, bad)
            total.sum().backward()
            for i, value in zip(group, task.detach().tolist(), strict=True):
                losses[i].append(value)
        optimizer.step()
    seconds = time.perf_counter() - start
    updates = []
    for i, job in enumerate(jobs):
        params = {n: v.detach().clone() for n, v in leaves[i].items()}
        if not all(torch.isfinite(v).all() for v in params.values()):
            raise diverged(job.config)
        mean = sum(losses[i]) / len(losses[i]) if losses[i] else float("nan")
        updates.append(ClientUpdate(params, {}, len(job.train), mean, seconds / len(jobs),
                                    len(losses[i])))
    return updates
