"""Many clients' local rounds at once: one module, one optimizer step for all of them.

``train_local`` (one client after another) is the reference; this computes the same thing for
algorithms whose clients minimise the task loss plus an optional proximal term
(``Algorithm.batchable``: FedCLIP, FedProx and the server optimizers). Nothing is written
twice: each client's forward and backward are ``train_local``'s (the algorithm's own module,
called on the client's parameters through ``torch.func.functional_call``; its ``task_loss``;
the proximal term of :func:`fedclip.losses.proximal_term`), on the batches ``train_local``
draws. What clients trained together share is the optimizer: at each step one call of
torch's fused Adam (``torch.optim.adam.adam(fused=True)``, the run's betas, eps and weight
decay) updates every client that had a batch, in one pass over each tensor, where the
multi-tensor Adam of ``train_local`` makes about eight per client. A client whose schedule
has ended has no batch, so nothing moves it; the clients of one call have all taken the same
number of steps (the count Adam's bias correction needs).

On CUDA (``vectorised``) a step's clients of one batch size run one vectorised forward and
backward instead (``torch.func.vmap`` over their stacked parameters): a GPU is bound by
kernel launches there (0.24x of one after another on an H200, ``benchmarks/README.md``). Not
on a CPU: at these sizes a client's step is bound by reading and writing its own weights and
gradients, which vectorising does not share, and vmap's batched linear layers return every
weight gradient transposed, whose copy into the parameters' layout cost more than the step
(3.3 against 1.5 ms a client, measured in ``benchmarks/README.md``).

Results equal the sequential loop to float rounding, not bit for bit (tested to 1e-5): the
fused Adam rounds differently from the multi-tensor one (about 1e-7 after 20 steps); the
forwards and backwards are the same bits (vectorised: float rounding too).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch.func import functional_call, vmap
from torch.optim.adam import adam

from fedclip.core.client import (
    ClientJob,
    ClientUpdate,
    Model,
    batch_schedule,
    diverged,
    together_slots,
    working_module,
)
from fedclip.losses import proximal_term
from fedclip.tensors import all_finite


class Batchable(Model, Protocol):
    """A :class:`Model` whose local objective is the task loss + a proximal term."""

    def proximal_weight(self, job: ClientJob) -> float:
        """The weight of the proximal term for ``job`` (0: none)."""


def _calling(template: torch.nn.Module, params: dict[str, torch.Tensor]
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``template`` as a function of its input, with ``params`` for its parameters."""
    return lambda inp: functional_call(template, params, (inp,))


def train_together(algorithm: Batchable, jobs: Sequence[ClientJob],
                   vectorised: bool | None = None) -> list[ClientUpdate]:
    """The local rounds of ``jobs`` (one per client) at once; see the module docstring.
    ``vectorised`` (default: on CUDA only): each step's forwards and backwards as one
    ``vmap`` call per batch size, where the GPU is bound by kernel launches."""
    cfg = algorithm.cfg
    start = time.perf_counter()
    device = jobs[0].train.x.device
    template = working_module(algorithm, jobs[0].train.x.shape[1], device, jobs[0].params)
    template.train()
    names = [n for n, _ in template.named_parameters()]
    slots = together_slots(template, [job.params for job in jobs])
    leaves = [{n: slot[n][0] for n in names} for slot in slots]
    mus = [algorithm.proximal_weight(job) for job in jobs]
    text, scale = jobs[0].class_text, jobs[0].logit_scale
    plans = [batch_schedule(cfg, len(job.train), job.config.local_epochs, job.seed)
             for job in jobs]
    if vectorised is None:
        vectorised = device.type == "cuda"

    def task_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
                  ) -> torch.Tensor:
        module = _calling(template, params)
        emb = algorithm.embed(module, x)
        return algorithm.task_loss(emb, y, algorithm.class_text(module, text), scale)

    batched_loss = vmap(task_loss)
    losses: list[list[float]] = [[] for _ in jobs]
    for t in range(max((len(p) for p in plans), default=0)):
        stepped: dict[float, list[int]] = {}  # learning rate -> the clients that stepped
        if vectorised:
            by_size: dict[int, list[int]] = {}
            for i, plan in enumerate(plans):
                if t < len(plan):
                    by_size.setdefault(len(plan[t]), []).append(i)
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
                    stepped.setdefault(jobs[i].config.lr, []).append(i)
        for i, job in enumerate(jobs):
            if vectorised or t >= len(plans[i]):
                continue
            batch = plans[i][t].to(device)
            module = _calling(template, leaves[i])
            emb = algorithm.embed(module, job.train.x[batch])
            loss = algorithm.task_loss(emb, job.train.y[batch],
                                       algorithm.class_text(module, text), scale)
            total = loss + proximal_term(leaves[i], job.global_params, mus[i]) if mus[i] \
                else loss
            value = float(total.detach())
            if not math.isfinite(value):  # as train_local decides
                raise diverged(job.config, value)
            total.backward()
            losses[i].append(float(loss.detach()))
            stepped.setdefault(job.config.lr, []).append(i)
        with torch.no_grad():
            for lr, clients in stepped.items():
                held = [slots[i][n] for i in clients for n in names]
                grads = [leaves[i][n].grad for i in clients for n in names]
                adam([h[0] for h in held], grads,  # type: ignore[arg-type]
                     [h[1] for h in held], [h[2] for h in held], [],
                     [torch.tensor(float(t)) for _ in held], fused=True, amsgrad=False,
                     beta1=cfg.beta1, beta2=cfg.beta2, lr=lr, eps=cfg.eps,
                     weight_decay=cfg.weight_decay, maximize=False)
                for i in clients:
                    for n in names:
                        leaves[i][n].grad = None
    seconds = time.perf_counter() - start
    updates = []
    for i, job in enumerate(jobs):
        # the client's trained tensors handed out, not copied; its slot gets fresh room in
        # their place, which together_slots fills next time
        params = {}
        for n, v in leaves[i].items():
            params[n] = v.detach()
            v.data = torch.empty_like(v)
        if not all_finite(params):
            raise diverged(job.config)
        mean = sum(losses[i]) / len(losses[i]) if losses[i] else float("nan")
        updates.append(ClientUpdate(params, {}, len(job.train), mean, seconds / len(jobs),
                                    len(losses[i])))
    return updates
