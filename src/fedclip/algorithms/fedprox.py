"""FedProx on the adapter: FedCLIP plus ``mu/2 * ||w - w_global||^2`` in the local objective.

``mu`` reaches clients in each round's configuration (``--set fedprox.mu=0.01``)."""

from typing import cast

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedclip.algorithms.base import Algorithm, ClientJob
from fedclip.algorithms.registry import register
from fedclip.tensors import Params


def proximal_term(module: nn.Module, reference: Params, mu: float) -> torch.Tensor:
    """``mu/2 ||w - reference||^2`` over the module's parameters."""
    named = dict(module.named_parameters())
    return cast(torch.Tensor, 0.5 * mu * sum(((named[k] - g) ** 2).sum()
                                             for k, g in reference.items() if k in named))


class ProxOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    mu: float = Field(0.01, ge=0, allow_inf_nan=False, description="Proximal weight.")


@register
class FedProx(Algorithm):
    name = "fedprox"
    summary = "the adapter, with mu/2 ||w - w_global||^2 in the local loss"
    Options = ProxOptions
    batchable = True

    def proximal_weight(self, job: ClientJob) -> float:
        return float(job.config.values["mu"])

    def local_loss(self, loss: torch.Tensor, module: nn.Module, job: ClientJob) -> torch.Tensor:
        return loss + proximal_term(module, job.global_params, self.proximal_weight(job))
