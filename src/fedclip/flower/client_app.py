"""The ClientApp: decode, call the core client functions, encode the reply."""

from __future__ import annotations

import json
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedclip.flower.codec import decode, encode, run_config_to_cfg
from fedclip.flower.node import Node, node_for
from fedclip.runtime.checkpoint import flatten_optimizer, unflatten_optimizer
from fedclip.runtime.client import evaluate as evaluate_split
from fedclip.runtime.client import round_seed, train_local


def _identity(node: Node) -> ConfigRecord:
    return ConfigRecord({"client": node.name, "role": node.role, "domain": node.domain})


def handle_query(node: Node) -> RecordDict:
    """Who this node is, so the server can plan rounds without seeing any data."""
    info = ConfigRecord({"client": node.name, "role": node.role, "domain": node.domain,
                         "classes": list(node.classes)})
    metrics = MetricRecord({"num-examples": len(node.data.train) if node.data else 0,
                            "dim": int(node.class_text.shape[1]),
                            "logit-scale": float(node.logit_scale)})
    return RecordDict({"node": info, "metrics": metrics})


def _load_optimizer(state: RecordDict) -> dict | None:
    """This node's Adam state from earlier rounds (``optimizer_state = "keep"``)."""
    if "optimizer" not in state.array_records:
        return None
    groups = json.loads(str(state.config_records["optimizer-groups"]["json"]))
    tensors = state.array_records["optimizer"].to_torch_state_dict()
    return unflatten_optimizer(dict(tensors), {"self": groups})["self"]


def _save_optimizer(state: RecordDict, optimizer_state: dict) -> None:
    tensors, groups = flatten_optimizer({"self": optimizer_state})
    state.array_records["optimizer"] = ArrayRecord(tensors)
    state.config_records["optimizer-groups"] = ConfigRecord({"json": json.dumps(groups["self"])})


def handle_train(node: Node, content: RecordDict, transfer: str,
                 state: RecordDict | None = None) -> RecordDict:
    """One round of local training; with ``optimizer_state = "keep"`` the node's Adam state
    lives in ``state`` (Flower's ``context.state``) between rounds."""
    if node.data is None:
        raise RuntimeError(f"node {node.name!r} holds the held-out domain and never trains")
    server_round = int(content["config"]["server-round"])
    keep = node.algorithm.cfg.optimizer_state == "keep" and state is not None
    result = train_local(
        node.algorithm, decode(content["arrays"]), node.data.train, node.class_text,
        node.logit_scale, seed=round_seed(node.algorithm.cfg.seed, server_round, node.name),
        optimizer_state=_load_optimizer(state) if keep else None)
    if keep and result.optimizer_state is not None:
        _save_optimizer(state, result.optimizer_state)
    metrics = MetricRecord({"num-examples": result.num_examples, "train-loss": result.loss,
                            "train-seconds": result.seconds})
    return RecordDict({"arrays": encode(result.params, transfer), "metrics": metrics,
                       "node": _identity(node)})


def handle_evaluate(node: Node, content: RecordDict) -> RecordDict:
    """Training nodes: val and test split; the held-out node: its whole domain. With
    ``zeroshot`` in the config, the same without the adapter too."""
    arrays: ArrayRecord = content["arrays"]
    variants = [("", decode(arrays) if len(arrays) else None)]
    if content["config"].get("zeroshot", False):
        variants.append(("zeroshot-", None))
    args = (node.class_text, node.logit_scale)
    values: dict[str, float] = {}
    for prefix, params in variants:
        if node.data is not None:
            mask = node.data.class_mask
            val = evaluate_split(node.algorithm, params, node.data.val, *args, mask)
            test = evaluate_split(node.algorithm, params, node.data.test, *args, mask)
            values |= {f"{prefix}val-accuracy": val.accuracy, f"{prefix}val-loss": val.loss,
                       f"{prefix}test-accuracy": test.accuracy,
                       "num-examples": val.num_examples}
        else:
            held = evaluate_split(node.algorithm, params, node.heldout, *args, node.heldout_mask)
            values |= {f"{prefix}heldout-accuracy": held.accuracy,
                       "num-examples": held.num_examples}
    return RecordDict({"metrics": MetricRecord(values), "node": _identity(node)})


def dp_clipping_mod(msg: Message, context: Context, call_next):  # noqa: ANN001, ANN201
    """Flower's ``fixedclipping_mod`` when the server asks for clipping (DP runs), else a
    pass-through, so one ClientApp serves runs with and without DP."""
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    if KEY_CLIPPING_NORM in msg.content["config"]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def build_client_app(defaults: dict[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``defaults`` sit under the run config (``run_simulation`` passes none)."""
    app = ClientApp()

    def resolve(context: Context) -> tuple[Node, dict]:
        cfg, flower = run_config_to_cfg({**(defaults or {}), **dict(context.run_config)})
        return node_for(cfg, dict(context.node_config)), flower

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        node, _ = resolve(context)
        return Message(handle_query(node), reply_to=msg)

    @app.train(mods=[dp_clipping_mod])
    def train(msg: Message, context: Context) -> Message:
        node, flower = resolve(context)
        return Message(handle_train(node, msg.content, flower["transfer"], context.state),
                       reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        node, _ = resolve(context)
        return Message(handle_evaluate(node, msg.content), reply_to=msg)

    return app


app = build_client_app()
