"""FedProx on the adapter: FedCLIP plus ``mu/2 * ||w - w_global||^2`` in the local objective.

``mu`` reaches clients in each round's configuration (``--set fedprox.mu=0.01``)."""

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedclip.algorithms.base import Algorithm, ClientJob
from fedclip.algorithms.registry import register
from fedclip.losses import proximal_term


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
        return loss + proximal_term(dict(module.named_parameters()), job.global_params,
                                    self.proximal_weight(job))
