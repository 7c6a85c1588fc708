"""FedCLIP (Lu et al., 2023): the attention adapter, averaged by the server."""

from fedclip.algorithms.base import Algorithm
from fedclip.algorithms.registry import register


@register
class FedCLIP(Algorithm):
    name = "fedclip"
    summary = "the attention adapter; the server averages"
    batchable = True
