"""Local: each client trains its own adapter alone; nothing is sent (the lower bound).

Every parameter is personal, so the runtime keeps each client's adapter in its state and
sends nothing: no special case in the round loop."""

from fedclip.algorithms.base import Algorithm
from fedclip.algorithms.registry import register


@register
class Local(Algorithm):
    name = "local"
    summary = "each client its own adapter, alone (the lower bound for collaboration)"
    personal = ("*",)
