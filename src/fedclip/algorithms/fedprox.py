"""FedProx on the adapter: FedCLIP plus ``mu/2 * ||w - w_global||^2`` in the local objective.

``mu`` reaches clients in each round's configuration (``--set fedprox.mu=0.01``)."""

from pydantic import BaseModel, ConfigDict, Field

from fedclip.algorithms.base import Algorithm, ClientJob, ClientSide
from fedclip.algorithms.registry import register


class ProxOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    mu: float = Field(0.01, ge=0, allow_inf_nan=False, description="Proximal weight.")


class FedProxClient(ClientSide):
    """FedProx's client side."""

    def proximal_weight(self, job: ClientJob) -> float:
        return float(job.config.values["mu"])


@register
class FedProx(Algorithm):
    name = "fedprox"
    summary = "the adapter, with mu/2 ||w - w_global||^2 in the local loss"
    Options = ProxOptions
    batchable = True
    Client = FedProxClient
