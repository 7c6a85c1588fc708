"""Zero-shot: the backbone's class-prompt classifier, nothing trained."""

from fedclip.algorithms.base import Algorithm
from fedclip.algorithms.registry import register
from fedclip.tensors import Params


@register
class ZeroShot(Algorithm):
    name = "zeroshot"
    summary = "nothing: the backbone's class-prompt classifier"
    trains = False
    fine_tunes = False  # nothing is trained

    def init_global(self, dim: int) -> Params | None:
        return None
