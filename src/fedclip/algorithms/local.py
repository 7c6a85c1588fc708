"""Local: each client trains its own adapter alone; nothing is sent (the lower bound)."""

from fedclip.adapters import Params
from fedclip.algorithms import register
from fedclip.algorithms.base import Algorithm


@register
class Local(Algorithm):
    name = "local"
    communicates = False

    def start_params(self, global_params: Params, own: Params | None) -> Params:
        return own if own is not None else global_params
