"""FedProx on the adapter: FedCLIP plus ``mu/2 * ||w - w_global||^2`` in the local objective."""

import torch
from torch import nn

from fedclip.adapters import Params
from fedclip.algorithms import register
from fedclip.algorithms.base import Algorithm


def proximal_term(module: nn.Module, global_params: Params, mu: float) -> torch.Tensor:
    named = dict(module.named_parameters())
    return 0.5 * mu * sum(((named[k] - g) ** 2).sum() for k, g in global_params.items()
                          if k in named)


@register
class FedProx(Algorithm):
    name = "fedprox"

    def local_loss(self, loss: torch.Tensor, module: nn.Module, global_params: Params
                   ) -> torch.Tensor:
        return loss + proximal_term(module, global_params, self.cfg.prox_mu)
