"""A Grid that checks for replies every ``poll-interval`` seconds.

Flower 1.42's deployment grid sleeps 3 s between its checks for replies, so every exchange
(a round's training, an evaluation) costs a multiple of 3 s whatever the nodes take. This
wrapper keeps Flower's grid for everything (node ids, message creation, push, pull) and only
shortens the wait, through the grid's public ``push_messages`` / ``pull_messages``: on a
localhost deployment a round then ends within ``poll-interval`` of its last reply.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid


class PollingGrid(Grid):
    """Flower's ``grid`` with ``send_and_receive`` checking every ``interval`` seconds."""

    def __init__(self, grid: Grid, interval: float) -> None:
        self.grid, self.interval = grid, interval

    def set_run(self, run):  # noqa: ANN001, ANN201
        self.grid.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull their replies every ``interval`` seconds until all
        have come or ``timeout`` has passed (Flower's semantics, a shorter wait)."""
        waiting = set(self.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while waiting:
            got = list(self.pull_messages(waiting))
            replies.extend(got)
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or (timeout is not None and time.monotonic() >= end):
                break
            time.sleep(self.interval)
        return replies
