"""Entropic transport plans for the token methods (FedOTP, TRIP), batched on torch tensors.

Three solvers of ``min_T <T, C> - eps H(T)`` for a batch of cost matrices ``C`` [B, n, m]
(rows: the n sources, e.g. an image's patch tokens; columns: the m targets, e.g. a class's
prompts), with source marginal ``a`` [B, n] and target marginal ``b`` [B, m]:

* :func:`one_sided` (FedOTP's released code, its ``COT``): the target marginal is met
  exactly, the source one only as an upper bound, ``T 1 <= a``, ``T^T 1 = b``, by alternating
  scalings ``u = min(a / (K v), 1)``, ``v = b / (K^T u)`` with ``K = exp(-C / eps)``, until the
  mean change of ``v`` is under ``tol`` (at most ``iterations``). With ``sum b = gamma <= 1``
  only the ``gamma`` share of the source mass that transports best is moved; with
  ``sum b = sum a`` (gamma 1) the bound is met with equality and it is balanced Sinkhorn;
* :func:`balanced` (POT's batched solver, ``ot.batch.solve_batch``, log-domain Sinkhorn):
  both marginals exact;
* :func:`unbalanced` (POT's ``ot.unbalanced.sinkhorn_unbalanced``, stabilised, one problem
  at a time): both marginals relaxed by ``rho * KL``; ``rho = inf`` is :func:`balanced`.

Plans are computed without gradients (the methods differentiate the similarities weighted by
a fixed plan, as both papers' code does).
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def one_sided(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float,
              iterations: int, tol: float) -> torch.Tensor:
    """FedOTP's plan: ``T^T 1 = b`` exactly, ``T 1 <= a`` (see the module docstring)."""
    kernel = torch.exp(-cost / eps)
    u, v = torch.ones_like(a), torch.ones_like(b)
    for _ in range(iterations):
        previous = v
        u = torch.minimum(a / (kernel @ v.unsqueeze(-1)).squeeze(-1), torch.ones_like(a))
        v = b / (kernel.transpose(1, 2) @ u.unsqueeze(-1)).squeeze(-1)
        if float((v - previous).abs().mean()) < tol:
            break
    return u.unsqueeze(-1) * kernel * v.unsqueeze(-2)


@torch.no_grad()
def balanced(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float,
             iterations: int, tol: float) -> torch.Tensor:
    """Both marginals exact: POT's batched log-domain Sinkhorn."""
    from ot.batch import solve_batch

    return solve_batch(cost, eps, a, b, max_iter=iterations, tol=tol, method="log_sinkhorn",
                       grad="detach").plan


@torch.no_grad()
def unbalanced(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float,
               iterations: int, tol: float, rho: float) -> torch.Tensor:
    """Both marginals relaxed by ``rho * KL`` (POT, stabilised); ``rho = inf``: balanced."""
    if math.isinf(rho):
        return balanced(cost, a, b, eps, iterations, tol)
    from ot.unbalanced import sinkhorn_unbalanced

    return torch.stack([sinkhorn_unbalanced(a[i], b[i], cost[i], eps, rho,
                                            method="sinkhorn_stabilized",
                                            numItermax=iterations, stopThr=tol)
                        for i in range(len(cost))])


def plan(kind: str, cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float,
         iterations: int, tol: float, rho: float = math.inf) -> torch.Tensor:
    """The plan of solver ``kind`` ("official", "balanced" or "unbalanced")."""
    if kind == "official":
        return one_sided(cost, a, b, eps, iterations, tol)
    if kind == "balanced":
        return balanced(cost, a, b, eps, iterations, tol)
    return unbalanced(cost, a, b, eps, iterations, tol, rho)
