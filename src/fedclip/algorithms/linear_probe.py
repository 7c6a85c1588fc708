"""Linear probe: FedAvg of a linear classifier on the frozen image features, initialised from
the class prompts' text features (zero-shot init: round 0 *is* the zero-shot classifier).

``logits = s * normalise(I) @ normalise(W).T``: a cosine classifier whose class vectors start
at the prompts' text features and train with the same loss options (contrastive against
``W[label]``, or cross-entropy over all classes). C x d parameters (3,584 for PACS at d=512).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from fedclip.adapters import get_params
from fedclip.algorithms.base import Algorithm, ClientSide
from fedclip.algorithms.registry import register
from fedclip.errors import ConfigError
from fedclip.tensors import Params


class ClassVectors(nn.Module):
    def __init__(self, classes: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(classes, dim))


class LinearProbeClient(ClientSide):
    """LinearProbe's client side."""

    def embed(self, module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)

    def class_text(self, module: nn.Module | None, class_text: torch.Tensor) -> torch.Tensor:
        return class_text if module is None else F.normalize(
            cast(torch.Tensor, module.weight), dim=-1)


@register
class LinearProbe(Algorithm):
    name = "linear-probe"
    summary = "a linear (cosine) classifier on the features, zero-shot initialised"
    init_needs_text = True
    open_vocabulary = False  # a class vector per class (fedpft, personal-transform: too)
    Client = LinearProbeClient

    def _classes(self) -> int:
        if self.text is None:
            raise ConfigError("linear-probe starts from the class prompts' features; "
                              "build it with get_algorithm(cfg, Runtime(prompts, class_text))")
        return self.text.shape[0]

    def init_global(self, dim: int) -> Params | None:
        module = ClassVectors(self._classes(), dim)
        assert self.text is not None  # _classes() refused a missing one
        with torch.no_grad():
            module.weight.copy_(self.text)
        return get_params(module)

    def build_module(self, dim: int) -> nn.Module:
        return ClassVectors(self._classes(), dim)
