"""Feature-space personalisation: a shared cosine classifier on the cached image features,
behind a **personal** feature transform per client (in the spirit of FedOT-style
personalisation and of LG-FedAvg, Liang et al., 2020, "Think Locally, Act Globally": local
representation, global head).

``logits = s * normalise(Q_k f) @ normalise(W)^T``: ``W`` (C x d, initialised at the class
prompts' text features, as the linear probe) is averaged by the server; ``Q_k`` stays on
client ``k`` and is trained with it every round. ``kind``:

* ``orthogonal`` (default): ``Q = (I + A)(I - A)^-1`` with ``A`` skew-symmetric (the Cayley
  transform, an orthogonal matrix for every A): the transform rotates the client's features
  and keeps their geometry, aligning the client's feature distribution with the shared head
  the way an orthogonal Procrustes map would (the transport-map view of feature-space
  personalisation, restricted to rotations). d^2 personal values (262,144 at d = 512; never
  sent);
* ``lowrank``: ``Q f = f + U (V f)`` with rank ``rank`` (U starts at zero, V random):
  2 r d personal values.

Both start at the identity, so round 0 is the zero-shot classifier; the held-out domain (no
transform of its own) is scored with the identity, i.e. the shared classifier alone. Only
``W`` travels (C x d: 3,584 values for PACS at d = 512).
"""

from __future__ import annotations

from typing import Literal, cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedclip.adapters import get_params
from fedclip.algorithms.linear_probe import LinearProbe, LinearProbeClient
from fedclip.algorithms.registry import register
from fedclip.tensors import Params


class TransformOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["orthogonal", "lowrank"] = Field(
        "orthogonal", description="The personal transform: a rotation (Cayley) or I + U V.")
    rank: int = Field(16, ge=1, le=4096, description="lowrank: the rank of U V.")


class Orthogonal(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.skew = nn.Parameter(torch.zeros(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.skew - self.skew.T
        eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
        q = torch.linalg.solve(eye - a, eye + a, left=False)  # (I + A)(I - A)^-1
        return x @ q.T


class LowRank(nn.Module):
    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.zeros(rank, dim))
        self.up = nn.Parameter(torch.zeros(dim, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (x @ self.down.T) @ self.up.T


class TransformedProbe(nn.Module):
    def __init__(self, classes: int, dim: int, kind: str, rank: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(classes, dim))
        self.transform = Orthogonal(dim) if kind == "orthogonal" else LowRank(dim, rank)


class PersonalTransformClient(LinearProbeClient):
    """PersonalTransform's client side."""

    def embed(self, module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        if module is None:
            return F.normalize(x, dim=-1)
        return F.normalize(cast(TransformedProbe, module).transform(x), dim=-1)


@register
class PersonalTransform(LinearProbe):
    name = "personal-transform"
    summary = "a personal feature transform (rotation) per client, a shared class head"
    personal = ("transform.*",)
    Options = TransformOptions
    options: TransformOptions
    Client = PersonalTransformClient

    def build_module(self, dim: int) -> nn.Module:
        return TransformedProbe(self._classes(), dim, self.options.kind, self.options.rank)

    def init_global(self, dim: int) -> Params | None:
        module = cast(TransformedProbe, self.build_module(dim))
        assert self.text is not None  # _classes() refused a missing one
        with torch.no_grad():
            module.weight.copy_(self.text)
            if isinstance(module.transform, LowRank):
                gen = torch.Generator().manual_seed(self.cfg.seed)
                module.transform.down.copy_(torch.randn(module.transform.down.shape,
                                                        generator=gen) / dim ** 0.5)
        return get_params(module)
