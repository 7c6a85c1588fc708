"""The ClientApp: decode, call the same client functions as the in-process runner, encode.

Only the algorithm's shared parameters, its declared extras and metrics leave a node. What
the algorithm keeps on the client (personal parameters, optimizer state, control variates)
lives in Flower's ``context.state``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedclip.algorithms.base import Algorithm
from fedclip.allocator import keep_freed_memory
from fedclip.config import FlowerSettings
from fedclip.core.client import RoundConfig, client_job, personalize, run_job, score
from fedclip.core.client import evaluate as evaluate_split
from fedclip.dynamo import defer_dynamo_import
from fedclip.flower.codec import decode, encode
from fedclip.flower.logs import one_line_refusals
from fedclip.flower.node import node_for
from fedclip.flower.settings import run_config_to_cfg
from fedclip.flower.site import Site
from fedclip.tensors import Params, State

STATE_KEY = "fedclip.client-state"
log = logging.getLogger(__name__)


def _process_age() -> float:
    """Seconds since this process started (Linux; 0 where /proc is not there)."""
    try:
        with open("/proc/self/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


# A deployed SuperNode starts a `flwr-clientapp` process per message: there, torch's
# compiler machinery is never needed (the in-process runner and simulation workers, long
# lived, pay its import once and are left alone)
if os.path.basename(sys.argv[0] if sys.argv else "") == "flwr-clientapp":
    defer_dynamo_import()
# what starting this process and importing this module cost, reported by the first message
# the process serves (0 after that)
_STARTUP = [_process_age()]


def task_fingerprint(site: Site) -> str:
    """What a node believes the task is (classes, in order): the server checks that every
    node agrees."""
    return hashlib.sha256(json.dumps(list(site.classes)).encode()).hexdigest()[:16]


def handle_query(site: Site, algorithm: Algorithm | None = None,
                 config: dict | None = None) -> RecordDict:
    """Who this node is, so the server can plan and check the run without seeing data (and,
    when asked, the algorithm's initial parameters: those that start from the class
    prompts' features, which only nodes can compute)."""
    sizes = site.sizes()
    info = ConfigRecord({"client": site.name, "role": site.role, "domain": site.domain,
                         "task": task_fingerprint(site), "skipped": json.dumps(site.skipped)})
    metrics = MetricRecord({"client-index": site.index, "num-train": sizes["train"],
                            "num-val": sizes["val"], "num-test": sizes["test"],
                            "images": site.images, "dim": int(site.class_text.shape[1]),
                            "logit-scale": float(site.logit_scale)})
    reply = RecordDict({"node": info, "metrics": metrics})
    if algorithm is not None and (config or {}).get("send-init", False):
        init = algorithm.init_global(int(site.class_text.shape[1]))
        if init is not None:
            reply["init"] = encode(init)
    return reply


def load_state(context_state: RecordDict | None, device: str | torch.device = "cpu") -> State:
    """This node's client state, kept in Flower's ``context.state``."""
    if context_state is None or STATE_KEY not in context_state.array_records:
        return {}
    return {k: v.to(device).clone() for k, v in
            context_state.array_records[STATE_KEY].to_torch_state_dict().items()}


def save_state(context_state: RecordDict | None, state: State) -> None:
    """Keep ``state`` in Flower's ``context.state`` for the next message."""
    if context_state is not None and state:
        context_state.array_records[STATE_KEY] = ArrayRecord(
            {k: v.detach().cpu().contiguous() for k, v in state.items()})


def own_accuracies(site: Site, algorithm: Algorithm, params: Params | None, state: State,
                   prefix: str = "") -> dict[str, float]:
    """A training node's val and test accuracy of ``params`` (with its own state: personal
    parameters, a personal model), as every runtime scores a client (``core.client.score``)."""
    assert site.data is not None  # a training node
    val, test = score(algorithm.client, site.data, params, state, site.class_text,
                      site.logit_scale)
    return {f"{prefix}val-accuracy": val, f"{prefix}test-accuracy": test}


def handle_train(site: Site, algorithm: Algorithm, content: RecordDict, transfer: str,
                 context_state: RecordDict | None = None) -> RecordDict:
    """One round of local training through the one client entry (``core.client.client_job``
    and ``run_job``, as every runtime). With ``evaluate-round`` in the config, the node first
    scores the parameters it received (the previous round's, on its val and test splits) and
    sends the accuracies with its update: one message per round instead of two."""
    if site.data is None:
        raise RuntimeError(f"node {site.name!r} holds the held-out domain and never trains")
    client, raw = algorithm.client, dict(content["config"])
    device = site.class_text.device
    state = load_state(context_state, device)
    records = content.array_records
    received = client.complete(decode(records["arrays"], device), int(site.class_text.shape[1]))
    evaluation: dict[str, float] = {}
    if "evaluate-round" in raw:
        began = time.perf_counter()
        evaluation = own_accuracies(site, algorithm, received, state)
        evaluation["eval-seconds"] = time.perf_counter() - began
    extras = decode(records["extras"], device) if "extras" in records else {}
    job = client_job(client, site.name, site.data.train, received, extras,
                     RoundConfig.from_record(raw), state, site.class_text, site.logit_scale)
    update = run_job(client, job)
    if update is None:  # the server decides what a divergence means for the run
        log.warning("%s: its training diverged in round %d", site.name, job.config.server_round)
        return RecordDict({"metrics": MetricRecord({"diverged": 1, **evaluation})})
    save_state(context_state, state)
    metrics = MetricRecord({"num-examples": update.num_examples, "train-loss": update.loss,
                            "train-seconds": update.seconds, "steps": update.steps,
                            **evaluation})
    reply = RecordDict({"arrays": encode(update.params, transfer), "metrics": metrics})
    if update.extras:  # only algorithms that declare extras
        reply["extras"] = encode(update.extras, transfer)
    return reply


def handle_evaluate(site: Site, algorithm: Algorithm, content: RecordDict,
                    context_state: RecordDict | None = None) -> RecordDict:
    """Training nodes: val and test split (with their own state, as in-process); the
    held-out node: its whole domain. ``zeroshot`` in the config: the same without the
    adapter too; ``personalize-epochs``: fine-tune a copy and report its test accuracy."""
    client = algorithm.client
    arrays = content.array_records["arrays"]
    config = dict(content.config_records["config"])
    params = (client.complete(decode(arrays, site.class_text.device),
                              int(site.class_text.shape[1])) if len(arrays) else None)
    args = (site.class_text, site.logit_scale)
    epochs = config.get("personalize-epochs", 0)
    epochs = int(epochs) if isinstance(epochs, int | float) else 0
    if epochs > 0:
        if site.data is None or params is None:
            return RecordDict({"metrics": MetricRecord({})})
        accuracy, epoch = personalize(client, params, site.data, *args, epochs)
        return RecordDict({"metrics": MetricRecord({"personalized-accuracy": accuracy,
                                                    "personalized-epoch": epoch})})
    variants: list[tuple[str, Any]] = [("", params)]
    if config.get("zeroshot", False) and algorithm.has_zero_shot:  # else: none to score
        variants.append(("zeroshot-", None))
    values: dict[str, Any] = {}  # MetricRecord values
    for prefix, p in variants:
        if site.data is not None:
            state = load_state(context_state, site.class_text.device)
            values |= own_accuracies(site, algorithm, p, state, prefix)
        else:
            assert site.heldout is not None  # a site is a training or the held-out one
            held = evaluate_split(client, p, site.heldout, *args, site.heldout_mask)
            values |= {f"{prefix}heldout-accuracy": held.accuracy}
    return RecordDict({"metrics": MetricRecord(values)})


def build_client_app(defaults: dict[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``defaults`` sit under the run config (``run_simulation`` passes none)."""
    app = ClientApp()

    def resolve(context: Context) -> tuple[Site, Algorithm, FlowerSettings, dict[str, float]]:
        one_line_refusals()  # a node whose data does not fit: one line in its log
        keep_freed_memory()  # a process fedclip owns (fedclip.allocator)
        began = time.perf_counter()
        cfg, flower = run_config_to_cfg({**(defaults or {}), **dict(context.run_config)})
        site, algorithm = node_for(cfg, dict(context.node_config))
        costs = {"start-seconds": _STARTUP[0], "site-seconds": time.perf_counter() - began}
        _STARTUP[0] = 0.0
        return site, algorithm, flower, costs

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        site, algorithm, _, _ = resolve(context)
        return Message(handle_query(site, algorithm, dict(msg.content["config"])),
                       reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site, algorithm, flower, costs = resolve(context)
        reply = handle_train(site, algorithm, msg.content, flower.transfer, context.state)
        if "metrics" in reply.metric_records:  # where the message's time went
            reply.metric_records["metrics"].update(costs)
        return Message(reply, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        site, algorithm, _, _ = resolve(context)
        return Message(handle_evaluate(site, algorithm, msg.content, context.state),
                       reply_to=msg)

    return app


app = build_client_app()
