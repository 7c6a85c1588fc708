"""What a client does, as plain functions on tensors: train locally, evaluate.

Both the in-process runner and Flower's ClientApp call these, so the two agree bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedclip.adapters import Params, class_logits, get_params
from fedclip.algorithms.base import Algorithm


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # [n, d] raw image features
    y: torch.Tensor  # [n] class indices

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class ClientData:
    """A client's features: its splits and the classes its domain has."""

    name: str
    train: Split
    val: Split
    test: Split
    class_mask: torch.Tensor  # [C] bool


@dataclass(frozen=True)
class TrainResult:
    params: Params
    num_examples: int
    loss: float
    seconds: float
    optimizer_state: dict | None


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    loss: float
    num_examples: int


def round_seed(seed: int, server_round: int, client_key: str) -> int:
    """A seed for one client's batches in one round, independent of process and order."""
    entropy = [seed, server_round, *client_key.encode()]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def train_local(
    algorithm: Algorithm,
    global_params: Params,
    train: Split,
    class_text: torch.Tensor,
    logit_scale: float,
    *,
    seed: int,
    optimizer_state: dict | None = None,
) -> TrainResult:
    """Local epochs of Adam on the adapter, starting from ``global_params``.

    ``class_text`` are the normalised class-prompt features. Batches come from a generator
    seeded with ``seed`` (see :func:`round_seed`). With the contrastive loss, a batch of one
    sample is skipped, as in the reference code.
    """
    cfg = algorithm.cfg
    start = time.perf_counter()
    dim = train.x.shape[1]
    module = algorithm.build_module(dim)
    module.load_state_dict(global_params)
    module.train()
    frozen_global = {k: v.detach().clone() for k, v in global_params.items()}
    optimizer = torch.optim.Adam(module.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                 eps=cfg.eps, weight_decay=cfg.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for _ in range(cfg.local_epochs):
        order = torch.randperm(len(train), generator=generator)
        for batch in order.split(cfg.batch_size):
            if len(batch) < 2 and cfg.loss == "clip":
                continue
            emb = algorithm.embed(module, train.x[batch])
            text = algorithm.class_text(module, class_text)
            loss = algorithm.task_loss(emb, train.y[batch], text, logit_scale)
            objective = algorithm.local_loss(loss, module, frozen_global)
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    kept = optimizer.state_dict() if cfg.optimizer_state == "keep" else None
    return TrainResult(get_params(module), len(train), float(np.mean(losses)) if losses else
                       float("nan"), time.perf_counter() - start, kept)


def load_module(algorithm: Algorithm, params: Params | None, dim: int) -> nn.Module | None:
    """The algorithm's module holding ``params``, in eval mode (None: no adapter)."""
    if params is None:
        return None
    module = algorithm.build_module(dim)
    module.load_state_dict(params)
    return module.eval()


def evaluate(
    algorithm: Algorithm,
    params: Params | None,
    split: Split,
    class_text: torch.Tensor,
    logit_scale: float,
    class_mask: torch.Tensor | None = None,
) -> EvalResult:
    """Accuracy (over the classes in ``class_mask``) and class cross-entropy of ``params``."""
    module = load_module(algorithm, params, split.x.shape[1]) if len(split) else None
    return evaluate_module(algorithm, module, split, class_text, logit_scale, class_mask)


@torch.no_grad()
def evaluate_module(
    algorithm: Algorithm,
    module: nn.Module | None,
    split: Split,
    class_text: torch.Tensor,
    logit_scale: float,
    class_mask: torch.Tensor | None = None,
) -> EvalResult:
    """As :func:`evaluate`, with the module already built (one build for many splits)."""
    if len(split) == 0:
        return EvalResult(float("nan"), float("nan"), 0)
    chunks = split.x.split(algorithm.eval_batch)
    emb = torch.cat([algorithm.embed(module, chunk) for chunk in chunks])
    text = algorithm.class_text(module, class_text)
    logits = class_logits(emb, text, logit_scale, class_mask)
    accuracy = float((logits.argmax(dim=1) == split.y).float().mean())
    loss = float(F.cross_entropy(logits.masked_fill(torch.isinf(logits), -1e4), split.y))
    return EvalResult(accuracy, loss, len(split))
