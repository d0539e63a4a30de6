"""In-process Flower Grids: deliver messages straight to a ClientApp, one Context per node.

``InProcessGrid`` lets tests drive the real ServerApp loop and the real ClientApp without Ray or
sockets, and tamper with replies on their way back (to play a malfunctioning hospital): a tamper
function may return the reply changed, ``None`` (the reply never arrives: a straggler) or a list
of messages (duplicates, or a reply from another node). A ClientApp that raises yields Flower's
error reply, as the simulation engine does. ``ReplayGrid`` answers with the contents of replies
recorded from an earlier real round, so reply checks can be exercised without training again.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

Tamper = Callable[[int, Message], "Message | list[Message] | None"]


def simulated_contexts(num_sites: int) -> dict[int, Context]:
    """Node ids 1..N with the node config Flower's simulation engine gives its virtual SuperNodes."""
    return {node: Context(run_id=1, node_id=node, node_config={"partition-id": node - 1, "num-partitions": num_sites},
                          state=RecordDict(), run_config={})
            for node in range(1, num_sites + 1)}


class InProcessGrid(Grid):
    """``num_sites`` virtual hospitals with node ids 1..N in this process."""

    def __init__(self, client_app: ClientApp | None, num_sites: int, tamper: Tamper | None = None,
                 contexts: dict[int, Context] | None = None) -> None:
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 1
        self.client_app = client_app
        self.tamper = tamper
        self.contexts = contexts if contexts is not None else simulated_contexts(num_sites)
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

    def answer(self, msg: Message) -> Message:
        """The hospital's reply to ``msg`` (Flower's error reply if its ClientApp raises)."""
        assert self.client_app is not None
        try:
            return self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as error:  # what the simulation engine's worker does
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(error)}:<'{error}'>"),
                           reply_to=msg)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies: list[Message] = []
        for msg in messages:
            self._counter += 1
            msg.metadata._message_id = f"m{self._counter}"  # the SuperLink would set it
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            reply: Message | list[Message] | None = self.answer(msg)
            if self.tamper is not None:
                reply = self.tamper(node, reply)
            for one in [] if reply is None else reply if isinstance(reply, list) else [reply]:
                self.replies.append(one)
                replies.append(one)
        return replies


class ReplayGrid(InProcessGrid):
    """Answers each message with a copy of the content recorded for its node and message type."""

    def __init__(self, recorded: Mapping[tuple[int, str], RecordDict], num_sites: int,
                 tamper: Tamper | None = None) -> None:
        super().__init__(None, num_sites, tamper)
        self.recorded = recorded

    @classmethod
    def record(cls, grid: InProcessGrid) -> dict[tuple[int, str], RecordDict]:
        """The last reply content of each (node, message type) a grid saw."""
        return {(int(r.metadata.src_node_id), r.metadata.message_type): copy.deepcopy(r.content)
                for r in grid.replies if not r.has_error()}

    def answer(self, msg: Message) -> Message:
        content = self.recorded[(int(msg.metadata.dst_node_id), msg.metadata.message_type)]
        return Message(copy.deepcopy(content), reply_to=msg)
