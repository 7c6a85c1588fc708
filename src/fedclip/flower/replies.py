"""Evaluation and personalization replies into records: one parser for both Flower paths
(the message-API strategy and the SecAgg+ legacy workflow).

A reply is judged by the role the server fixed for its node (never by what it says): val and
test accuracies count only from a training node, the held-out accuracy only from the
held-out node, each a finite number in [0, 1]; anything else is ignored (and logged).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from fedclip.core.records import Personalized
from fedclip.core.server import Evaluation
from fedclip.flower.codec import finite_number

log = logging.getLogger(__name__)
Reply = tuple[str, str, Mapping[str, Any]]  # (client, role, metrics), role fixed by the server


def evaluation_of(replies: Iterable[Reply], prefix: str = "") -> Evaluation:
    """(val, test, held-out) accuracies from evaluation replies (``prefix``: "zeroshot-" for
    the zero-shot scores sent in the same reply)."""
    val: dict[str, float] = {}
    test: dict[str, float] = {}
    heldout = None
    for client, role, metrics in replies:
        keys = ((f"{prefix}val-accuracy", f"{prefix}test-accuracy") if role == "train"
                else (f"{prefix}heldout-accuracy",))
        values = [v for k in keys if (v := finite_number(metrics.get(k), 0.0, 1.0)) is not None]
        if len(values) != len(keys):
            log.warning("ignored the evaluation of %s: %s must be numbers in [0, 1]", client,
                        ", ".join(keys))
            continue
        if role == "train":
            val[client], test[client] = values
        else:
            heldout = values[0]
    return val, test, heldout


def personalized_of(replies: Iterable[Reply], epochs: int) -> Personalized:
    """Each training node's personalized test accuracy and chosen epoch (in [0, epochs]); a
    reply without both counts as no answer."""
    per_client: dict[str, float] = {}
    chosen: dict[str, int] = {}
    for client, role, metrics in replies:
        acc = finite_number(metrics.get("personalized-accuracy"), 0.0, 1.0)
        epoch = finite_number(metrics.get("personalized-epoch"), 0, epochs)
        if role == "train" and acc is not None and epoch is not None:
            per_client[client], chosen[client] = acc, int(epoch)
    return Personalized(per_client, chosen)
