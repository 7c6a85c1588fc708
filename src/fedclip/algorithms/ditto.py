"""Ditto (Li et al., 2021): every client keeps a personal adapter, trained each round toward
the global one (``lam/2 ||v - w_global||^2``), beside the global adapter's usual local
training. The global adapter is averaged as in FedCLIP; personalization is scored with the
personal adapters (kept in client state: in-process, or Flower's ``context.state``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from fedclip.algorithms.base import Algorithm, ClientJob, ClientSide, ClientUpdate, State
from fedclip.algorithms.registry import register
from fedclip.core.client import round_seed, train_local
from fedclip.losses import proximal_term
from fedclip.tensors import Params

PERSONAL_MODEL = "ditto/"


class DittoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    lam: float = Field(0.1, ge=0, allow_inf_nan=False,
                       description="Pull of the personal adapter toward the global one.")


class DittoClient(ClientSide):
    """Ditto's client side."""

    def train_client(self, job: ClientJob) -> ClientUpdate:
        update = super().train_client(job)  # the global adapter's local round (FedAvg)
        personal = self.personal_model(job.state) or job.global_params
        lam = float(job.config.values["lam"])
        result = train_local(
            self, personal, job.train, job.class_text, job.logit_scale, config=job.config,
            seed=round_seed(self.cfg.seed, job.config.server_round, job.name + "/ditto"),
            objective=lambda loss, module: loss + proximal_term(
                dict(module.named_parameters()), job.global_params, lam))
        job.state.update({PERSONAL_MODEL + k: v for k, v in result.params.items()})
        return update

    def eval_params(self, global_params: Params | None, state: State) -> Params | None:
        if global_params is None:
            return None
        return self.personal_model(state) or global_params


@register
class Ditto(Algorithm):
    name = "ditto"
    summary = "a personal adapter per client, regularized toward the averaged global one"
    Options = DittoOptions
    Client = DittoClient

    @staticmethod
    def personal_model(state: State) -> Params:
        """The personal adapter kept in a client's state (empty before its first round)."""
        return {k.removeprefix(PERSONAL_MODEL): v for k, v in state.items()
                if k.startswith(PERSONAL_MODEL)}

