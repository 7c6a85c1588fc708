"""CLIP-Adapter (Gao et al., 2021) on the image side, averaged by the server.

A residual bottleneck MLP, ``Linear(d, d/r) -> ReLU -> Linear(d/r, d) -> ReLU`` (no biases,
as in the paper), blended with the frozen feature: ``I* = alpha * mlp(I) + (1 - alpha) * I``,
then normalised. Options: ``alpha`` (default 0.2, the paper's choice for ImageNet) and the
``reduction`` r (4). 2 d^2 / r parameters: 131,072 at d = 512.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedclip.adapters import get_params
from fedclip.algorithms.base import Algorithm, ClientSide
from fedclip.algorithms.registry import register
from fedclip.tensors import Params


class ClipAdapterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    alpha: float = Field(0.2, ge=0, le=1, description="Weight of the adapted feature.")
    reduction: int = Field(4, ge=1, description="Bottleneck: d / reduction hidden units.")


class ResidualAdapter(nn.Module):
    def __init__(self, dim: int, reduction: int, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha
        hidden = max(1, dim // reduction)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(),
                                 nn.Linear(hidden, dim, bias=False), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.mlp(x) + (1 - self.alpha) * x


class ClipAdapterClient(ClientSide):
    """ClipAdapter's client side."""

    def embed(self, module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(module(x) if module is not None else x, dim=-1)


@register
class ClipAdapter(Algorithm):
    name = "clip-adapter"
    summary = "CLIP-Adapter: residual bottleneck MLP on the image features, averaged"
    Options = ClipAdapterOptions
    options: ClipAdapterOptions
    Client = ClipAdapterClient

    def build_module(self, dim: int) -> nn.Module:
        return ResidualAdapter(dim, self.options.reduction, self.options.alpha)

    def init_global(self, dim: int) -> Params | None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            return get_params(self.build_module(dim))
