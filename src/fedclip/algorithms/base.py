"""The algorithm interface: a few hooks that the shared round loop calls.

An algorithm declares how it differs from FedCLIP by overriding a hook; it never copies the
round loop. The in-process runner and the Flower apps call the same hooks.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from fedclip.adapters import AttentionAdapter, Params, build_adapter, embed, get_params
from fedclip.config import RunConfig
from fedclip.losses import class_ce_loss, clip_loss


class Algorithm:
    """FedCLIP's behaviour; subclasses override what differs."""

    name: ClassVar[str] = ""
    trains: ClassVar[bool] = True  # False: nothing is trained (zero-shot)
    communicates: ClassVar[bool] = True  # False: each client keeps its own adapter (local)
    inputs: ClassVar[str] = "features"  # "pixels": trains through the backbone (no cache)
    eval_batch: ClassVar[int] = 4096  # inputs per forward when evaluating

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    # --- model ----------------------------------------------------------------------------
    def setup(self, prompts: tuple[str, ...]) -> None:
        """Called once with the class prompts before any training (backbone algorithms)."""

    def init_global(self, dim: int) -> Params | None:
        """The global trainable state before round 1 (None: nothing to train)."""
        return get_params(build_adapter(dim, self.cfg.seed))

    def build_module(self, dim: int) -> nn.Module:
        return AttentionAdapter(dim)

    def start_params(self, global_params: Params, own: Params | None) -> Params:
        """Where a client starts its round: the global adapter (local: its own)."""
        return global_params

    # --- local training -------------------------------------------------------------------
    def embed(self, module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings of a batch of inputs (features: through the adapter)."""
        return embed(module, x)

    def class_text(self, module: nn.Module | None, class_text: torch.Tensor) -> torch.Tensor:
        """Normalised class-prompt embeddings (fixed, unless the text encoder trains)."""
        return class_text

    def task_loss(self, emb: torch.Tensor, labels: torch.Tensor, class_text: torch.Tensor,
                  logit_scale: float) -> torch.Tensor:
        """``emb`` normalised image embeddings, ``class_text`` normalised class prompts."""
        if self.cfg.loss == "ce":
            return class_ce_loss(emb, class_text, labels, logit_scale)
        return clip_loss(emb, class_text[labels], logit_scale)

    def local_loss(self, loss: torch.Tensor, module: nn.Module, global_params: Params
                   ) -> torch.Tensor:
        """The objective a client minimises, given the task loss (FedProx adds a term)."""
        return loss

    # --- server ---------------------------------------------------------------------------
    def aggregate(self, updates: list[tuple[Params, int]]) -> Params:
        """Average client parameters, weighted by train samples or uniformly."""
        weights = [float(n) if self.cfg.aggregation == "weighted" else 1.0 for _, n in updates]
        total = sum(weights)
        if total <= 0:
            raise ValueError("cannot aggregate: all client weights are zero")
        keys = updates[0][0].keys()
        return {k: sum(p[k] * (w / total) for (p, _), w in zip(updates, weights, strict=True))
                for k in keys}
