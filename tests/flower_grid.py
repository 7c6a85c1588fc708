"""An in-memory Grid: the real ClientApp and ServerApp functions, called directly, no Ray."""

from __future__ import annotations

import copy
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid


class LocalGrid(Grid):
    def __init__(self, client_app: ClientApp, node_configs: list[dict], run_config: dict,
                 drop: dict[int, set[int]] | None = None, tamper=None) -> None:  # noqa: ANN001
        from flwr.supercore.run import Run
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as a SuperLink
        self._run = Run.create_empty(run_id=1)
        self.client_app = client_app
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i, node_config=nc, state=RecordDict(),
                              run_config=run_config)
            for i, nc in enumerate(node_configs)}
        self.drop = drop or {}  # node id -> rounds in which it does not answer train
        self.tamper = tamper  # (node id, reply) -> reply: a misbehaving client
        self.sent: list[Message] = []
        self.received: list[Message] = []  # every reply, as a server would see it

    def set_run(self, run) -> None:  # noqa: ANN001
        self._run = run

    @property
    def run(self):  # noqa: ANN201
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            server_round = msg.content["config"].get("server-round", 0) if \
                "config" in msg.content else 0
            if msg.metadata.message_type == "train" and server_round in self.drop.get(node, ()):
                continue
            # each node gets its own copy, as over the wire (mods may mutate what they read)
            wire = copy.deepcopy(msg)
            try:
                reply = self.client_app(wire, self.contexts[node])
            except Exception as ex:  # as a SuperNode does: an error reply, never a raise
                reason = str(type(ex)) + ":<'" + str(ex) + "'>"
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      reason=reason), reply_to=wire)
            if self.tamper:
                reply = self.tamper(node, reply)
            self.received.append(reply)
            replies.append(reply)
        return replies
