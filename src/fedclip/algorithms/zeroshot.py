"""Zero-shot: the backbone's class-prompt classifier, nothing trained."""

from fedclip.adapters import Params
from fedclip.algorithms import register
from fedclip.algorithms.base import Algorithm


@register
class ZeroShot(Algorithm):
    name = "zeroshot"
    summary = "nothing: the backbone's class-prompt classifier"
    trains = False

    def init_global(self, dim: int) -> Params | None:
        return None
