"""The registry refuses an algorithm whose declared capabilities contradict each other, with
one line naming the rule (one case per rule), and accepts every built-in one."""

from __future__ import annotations

import pytest
import torch

from fedclip.algorithms import algorithm_class, names, register
from fedclip.algorithms.base import RULES, Algorithm, ClientJob, ClientSide, ServerSide


def _make(client: dict | None = None, server: dict | None = None, **attrs):  # noqa: ANN003, ANN202
    """An algorithm class with ``attrs`` declared and hooks on its client or server side."""
    sides = {}
    if client:
        sides["Client"] = type("BadClient", (ClientSide,), client)
    if server:
        sides["Server"] = type("BadServer", (ServerSide,), server)
    return type("Bad", (Algorithm,), {"name": "bad-test", **attrs, **sides})


def _extras(self, global_params):  # noqa: ANN001, ANN202
    return {"s": torch.Size([1])}


def _loss(self, loss, module, job):  # noqa: ANN001, ANN202
    return loss * 2


class _ProxClient(ClientSide):
    def proximal_weight(self, job: ClientJob) -> float:
        return 0.1

    def local_loss(self, loss, module, job):  # noqa: ANN001, ANN201
        return loss


class _Prox(Algorithm):
    name = "prox-test"
    batchable = True
    Client = _ProxClient


CASES = [
    (_make(inputs="patches"), "inputs must be"),
    (_make(inputs="tokens", has_zero_shot=False), "inputs = 'tokens' needs has_zero_shot"),
    (_make(uses_text="text"), "uses_text must be"),
    (_make(init_needs_text=True, uses_text="none"), "init_needs_text"),
    (_make(trains=False), "fine_tunes = True needs trains"),
    (_make(trains=False, fine_tunes=False, client={"train_client": lambda self, job: None}),
     "trains = False must not override"),
    (_make(server={"reply_extras": _extras}), "aggregates_mean = True cannot hold"),
    (_make(sends_params=False, aggregates_mean=False), "sends_params = False needs"),
    (_make(batchable=True, client={"local_loss": _loss}),
     "batchable = True needs the objective"),
    (type("Sub", (_Prox,), {"name": "sub-test",
                            "Client": type("SubClient", (_ProxClient,), {"local_loss": _loss})}),
     "batchable = True needs the objective"),
    (_make(batchable=True, personal=("*",)), "batchable = True needs inputs"),
]


def test_every_rule_has_a_case():
    assert len(CASES) >= len(RULES)
    assert {rule for rule, _ in RULES} <= {c.contradiction() for c, _ in CASES}


@pytest.mark.parametrize(("cls", "rule"), CASES)
def test_a_contradictory_declaration_is_refused_in_one_line(cls, rule):
    with pytest.raises(TypeError, match="is not registered") as info:
        register(cls)
    assert rule in str(info.value) and "\n" not in str(info.value)


def test_every_built_in_algorithm_agrees_with_itself_and_a_prox_one_is_batchable():
    assert len(names()) >= 20
    assert all(algorithm_class(n).contradiction() is None for n in names())
    assert _Prox.contradiction() is None
    caps = algorithm_class("scaffold").capabilities()
    assert caps.sends_extras and not caps.aggregates_mean and "aggregate" in caps.overrides
    assert not hasattr(algorithm_class("scaffold").Client, "aggregate")  # sides apart
    assert not hasattr(algorithm_class("scaffold").Server, "train_client")
