"""An in-process Flower Grid: delivers messages straight to a ClientApp, one Context per node.

It lets tests drive the real ServerApp loop and the real ClientApp without Ray or sockets, and
tamper with replies on their way back (to play a malfunctioning hospital).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

Tamper = Callable[[int, Message], Message]


class InProcessGrid(Grid):
    """``num_sites`` virtual hospitals with node ids 1..N in this process."""

    def __init__(self, client_app: ClientApp, num_sites: int, tamper: Tamper | None = None,
                 contexts: dict[int, Context] | None = None) -> None:
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 1
        self.client_app = client_app
        self.tamper = tamper
        self.contexts = contexts if contexts is not None else {
            node: Context(run_id=1, node_id=node, node_config={"partition-id": node - 1, "num-partitions": num_sites},
                          state=RecordDict(), run_config={})
            for node in range(1, num_sites + 1)
        }
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._counter = 0

    def set_run(self, run) -> None:  # noqa: ANN001 - Flower's Run type
        pass

    @property
    def run(self):  # noqa: ANN201
        raise NotImplementedError

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            self._counter += 1
            msg.metadata._message_id = f"m{self._counter}"  # the SuperLink would set it
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            reply = self.client_app(msg, self.contexts[node])
            if self.tamper is not None:
                reply = self.tamper(node, reply)
            self.replies.append(reply)
            replies.append(reply)
        return replies
