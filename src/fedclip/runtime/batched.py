"""Many clients' local rounds at once, on one device: stacked adapters and batched matmuls.

The sequential loop (``Algorithm.train_client`` per client) is the reference; this computes
the same thing for algorithms whose clients train FedCLIP's attention adapter with the task
loss plus an optional proximal term (``Algorithm.batchable``: FedCLIP, FedProx and the server
optimizers): every client draws the same batches from the same seeded generator, each step
runs one batched forward and backward for all clients that have a batch of that size, and
Adam (with the reference's L2 in the gradient) steps each client's slice of the stacked
parameters with its own step count. Results equal the sequential loop to float rounding
(tested to 1e-5). A round then costs a few large matmuls instead of K small loops, which is
what keeps a round's cost far below linear in the number of clients on a GPU.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from fedclip.algorithms.base import Algorithm, ClientJob, ClientUpdate
from fedclip.errors import TrainingError

KEYS = ("attention.0.weight", "attention.0.bias", "attention.2.weight", "attention.2.bias")


def schedules(algorithm: Algorithm, jobs: list[ClientJob]) -> list[list[torch.Tensor]]:
    """Each client's batches, in order, exactly as ``train_local`` draws them."""
    cfg = algorithm.cfg
    out = []
    for job in jobs:
        generator = torch.Generator().manual_seed(job.seed)
        batches = []
        for _ in range(job.config.local_epochs):
            order = torch.randperm(len(job.train), generator=generator)
            batches += [b for b in order.split(cfg.batch_size)
                        if not (len(b) < 2 and cfg.loss == "clip")]
        out.append(batches)
    return out


def _losses(algorithm: Algorithm, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
            text: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-client task losses [G] for batches ``x`` [G, b, d], labels ``y`` [G, b]."""
    w1, b1, w2, b2 = params
    hidden = torch.tanh(torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)))
    weights = torch.softmax(torch.baddbmm(b2.unsqueeze(1), hidden, w2.transpose(1, 2)), dim=-1)
    emb = F.normalize(weights * x, dim=-1)
    g, b = y.shape
    if algorithm.cfg.loss == "ce":
        logits = scale * emb @ text.T  # [G, b, C]
        return F.cross_entropy(logits.reshape(g * b, -1), y.reshape(-1),
                               reduction="none").view(g, b).mean(1)
    logits = scale * torch.bmm(emb, text[y].transpose(1, 2))  # [G, b, b]
    target = torch.arange(b, device=x.device).repeat(g)
    rows = F.cross_entropy(logits.reshape(g * b, b), target, reduction="none").view(g, b)
    cols = F.cross_entropy(logits.transpose(1, 2).reshape(g * b, b), target,
                           reduction="none").view(g, b)
    return (rows.mean(1) + cols.mean(1)) / 2


def train_together(algorithm: Algorithm, jobs: list[ClientJob]) -> list[ClientUpdate]:
    """The local rounds of ``jobs`` (one per client) at once; see the module docstring."""
    cfg = algorithm.cfg
    start = time.perf_counter()
    device = jobs[0].train.x.device
    k = len(jobs)
    stacked = [torch.stack([job.params[key] for job in jobs]).to(device).clone()
               .requires_grad_(True) for key in KEYS]
    reference = [torch.stack([job.global_params[key] for job in jobs]).to(device)
                 for key in KEYS]
    mus = torch.tensor([algorithm.proximal_weight(job) for job in jobs], device=device)
    lrs = torch.tensor([job.config.lr for job in jobs], device=device)
    exp_avg = [torch.zeros_like(p) for p in stacked]
    exp_avg_sq = [torch.zeros_like(p) for p in stacked]
    steps = torch.zeros(k, device=device)
    plans = schedules(algorithm, jobs)
    losses: list[list[float]] = [[] for _ in jobs]
    text, scale = jobs[0].class_text, jobs[0].logit_scale
    for t in range(max((len(p) for p in plans), default=0)):
        by_size: dict[int, list[int]] = {}
        for i, plan in enumerate(plans):
            if t < len(plan):
                by_size.setdefault(len(plan[t]), []).append(i)
        for idx_list in by_size.values():
            idx = torch.tensor(idx_list, device=device)
            batches = [plans[i][t].to(device) for i in idx_list]
            x = torch.stack([jobs[i].train.x[b] for i, b in zip(idx_list, batches, strict=True)])
            y = torch.stack([jobs[i].train.y[b] for i, b in zip(idx_list, batches, strict=True)])
            whole = len(idx_list) == k  # every client: no gather, no scatter
            sub = stacked if whole else [p[idx] for p in stacked]
            task = _losses(algorithm, sub, x, y, text, scale)
            prox = 0.5 * mus[idx] * sum(((p - r[idx]) ** 2).flatten(1).sum(1)
                                         for p, r in zip(sub, reference, strict=True))
            total = task + prox
            if not torch.isfinite(total).all():
                raise TrainingError(f"training diverged: a local loss became non-finite "
                                    f"(round {jobs[0].config.server_round}); lower the "
                                    f"learning rate. The last good checkpoint is kept")
            grads = torch.autograd.grad(total.sum(), sub)
            _adam_step(stacked, grads, exp_avg, exp_avg_sq, steps, None if whole else idx,
                       lrs if whole else lrs[idx], cfg)
            for i, value in zip(idx_list, task.detach().tolist(), strict=True):
                losses[i].append(value)
    seconds = time.perf_counter() - start
    updates = []
    for i, job in enumerate(jobs):
        params = {key: p[i].detach().clone() for key, p in zip(KEYS, stacked, strict=True)}
        mean = sum(losses[i]) / len(losses[i]) if losses[i] else float("nan")
        updates.append(ClientUpdate(params, {}, len(job.train), mean, seconds / k,
                                    len(losses[i])))
    return updates


@torch.no_grad()
def _adam_step(params: list[torch.Tensor], grads: tuple[torch.Tensor, ...],
               exp_avg: list[torch.Tensor], exp_avg_sq: list[torch.Tensor],
               steps: torch.Tensor, idx: torch.Tensor | None, lr: torch.Tensor,
               cfg) -> None:  # noqa: ANN001
    """torch.optim.Adam's update (L2 in the gradient) on the rows ``idx`` (None: all, in
    place) of each stacked parameter, each row with its own step count and learning rate."""
    rows_of = (lambda t: t) if idx is None else (lambda t: t[idx])  # noqa: E731
    if idx is None:
        steps += 1
    else:
        steps[idx] += 1
    step = rows_of(steps)
    bias1 = 1 - cfg.beta1 ** step
    bias2_sqrt = (1 - cfg.beta2 ** step).sqrt()
    for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq, strict=True):
        shape = (-1,) + (1,) * (p.dim() - 1)
        rows = rows_of(p.data)
        g = g + cfg.weight_decay * rows
        if idx is None:
            m.lerp_(g, 1 - cfg.beta1)
            v.mul_(cfg.beta2).addcmul_(g, g, value=1 - cfg.beta2)
            denom = v.sqrt().div_(bias2_sqrt.view(shape)).add_(cfg.eps)
            p.data.addcdiv_(m * (lr / bias1).view(shape), denom, value=-1.0)
            continue
        m_new = m[idx].lerp(g, 1 - cfg.beta1)
        v_new = v[idx] * cfg.beta2 + (1 - cfg.beta2) * g * g
        denom = v_new.sqrt() / bias2_sqrt.view(shape) + cfg.eps
        p.data[idx] = rows - (lr / bias1).view(shape) * m_new / denom
        m[idx], v[idx] = m_new, v_new
