"""fedclip's deployed round as messages only: each round one exchange, a training message
with the adapter's payload to each of ``train-nodes`` nodes and an evaluation message to the
others, all replies awaited; the round's wall time is what Flower itself costs."""

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def exchange(grid: Grid, messages: list[Message], interval: float) -> list[Message]:
    """Every reply: Flower's ``send_and_receive`` (``interval`` 0), or its push and pull every
    ``interval`` seconds (as fedclip's PollingGrid)."""
    if interval <= 0:
        return list(grid.send_and_receive(messages))
    waiting = set(grid.push_messages(messages))
    replies: list[Message] = []
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies += got
        waiting -= {m.metadata.reply_to_message_id for m in got}
        if waiting:
            time.sleep(interval)
    return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    rounds, values, train_nodes = int(cfg["rounds"]), int(cfg["values"]), int(cfg["train-nodes"])
    interval, need = float(cfg["poll-interval"]), int(cfg["min-nodes"])
    began = time.perf_counter()
    deadline = time.monotonic() + float(cfg["discover-timeout"])
    while len(nodes := sorted(grid.get_node_ids())) < need:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {need} SuperNodes connected")
        time.sleep(0.2)
    discovered = time.perf_counter()
    payload = ArrayRecord([np.zeros(values, dtype=np.float32)])
    history = []
    for server_round in range(1, rounds + 1):
        start = time.perf_counter()
        config = ConfigRecord({"server-round": server_round})
        messages = [Message(RecordDict({"arrays": payload, "config": config}), dst_node_id=n,
                            message_type=MessageType.TRAIN) for n in nodes[:train_nodes]]
        messages += [Message(RecordDict({"config": config}), dst_node_id=n,
                             message_type=MessageType.EVALUATE) for n in nodes[train_nodes:]]
        replies = exchange(grid, messages, interval)
        failed = [r.error.reason for r in replies if r.has_error()]
        if failed or len(replies) != len(messages):
            raise RuntimeError(f"round {server_round}: {len(replies)} of {len(messages)} "
                               f"replies, errors: {failed[:2]}")
        history.append({"round": server_round, "round_seconds": time.perf_counter() - start})
    if cfg["out"]:
        out = Path(str(cfg["out"]))
        out.mkdir(parents=True, exist_ok=True)
        (out / "floor.json").write_text(json.dumps(
            {"discovery_seconds": discovered - began, "history": history}, indent=1))
