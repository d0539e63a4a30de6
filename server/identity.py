"""Who sent a reply: site names bound to the authenticated Flower node that first used them.

A hospital is identified by ``msg.metadata.src_node_id``, not by the name it writes in its reply:
the SuperLink accepts a reply only from the node its instruction went to, and with SuperNode
authentication a node id belongs to one registered key. On first contact a node's name
is bound to it; from then on a reply that reports another node's name, or a node that reports a
second name, is refused. Within one phase a second reply from a node and a reply from a node that
was not asked are refused too. When two unbound nodes claim the same unbound name at once, neither
is bound (and both are refused) until one of them stops. Names of the form ``node-<digits>`` are
reserved for the display of nodes that report no name, so no hospital can pass as another node.

The bindings live in the server's checkpoint state, so they survive a resumed run. Node ids are
only stable while the SuperLink keeps its database: a simulation (and a SuperLink with an
in-memory database) draws new ids each session. ``reconcile`` therefore drops the old bindings,
and says so, when none of the bound nodes is among the connected ones.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

logger = logging.getLogger("fedvitgan.server")

#: The display name of a node that reported no name (``node-<id>``): no hospital may claim one.
RESERVED_NAME = re.compile(r"^node-\d+$")


@dataclass(frozen=True)
class Verdict:
    """One reply's identity: the name to file it under, and why it is refused (None: admitted)."""

    node_id: int
    name: str
    claimed: str | None
    refused: str | None = None


class SiteRegistry:
    """Site name <-> node id bindings of one federation."""

    def __init__(self, bindings: Mapping[str, int] | None = None) -> None:
        self.bindings: dict[str, int] = {str(k): int(v) for k, v in (bindings or {}).items()}

    def name_of(self, node_id: int) -> str | None:
        for name, node in self.bindings.items():
            if node == node_id:
                return name
        return None

    def display(self, node_id: int) -> str:
        """The bound name of a node, else ``node-<id>``."""
        return self.name_of(node_id) or f"node-{node_id}"

    def reconcile(self, connected: Iterable[int]) -> str | None:
        """Drop every binding when no bound node is connected (new node ids); returns a note if so."""
        connected = set(connected)
        if not self.bindings or connected & set(self.bindings.values()):
            return None
        note = (f"none of the {len(self.bindings)} bound nodes is connected (new node ids: a new simulation "
                f"or SuperLink session); site bindings start afresh")
        logger.warning(note)
        self.bindings.clear()
        return note

    def admit(self, replies: Sequence[tuple[int, str | None]], asked: Iterable[int]) -> list[Verdict]:
        """Verdicts for one phase's replies, given as (source node id, claimed name or None).

        Admitted replies bind their node to their name if neither is bound yet.
        """
        asked = set(asked)
        seen: set[int] = set()
        verdicts: list[Verdict | None] = [None] * len(replies)
        candidates: dict[int, str] = {}
        for i, (node, claimed) in enumerate(replies):
            bound = self.name_of(node)
            refusal = None
            if node not in asked:
                refusal = f"node {node} was not asked in this phase"
            elif node in seen:
                refusal = f"a second reply from node {node} in this phase"
            elif claimed is not None and RESERVED_NAME.match(claimed):
                refusal = f"site name {claimed!r} is reserved for nodes that report no name"
            elif bound is not None and claimed is not None and claimed != bound:
                refusal = f"node {node} is bound to site {bound!r} but reported {claimed!r}"
            elif bound is None and claimed is not None and claimed in self.bindings:
                refusal = f"site name {claimed!r} is bound to node {self.bindings[claimed]}, not to node {node}"
            seen.add(node)
            if refusal is not None:  # a refused reply's claimed name is not trusted
                verdicts[i] = Verdict(node, bound or f"node-{node}", claimed, refusal)
            elif bound is None and claimed is not None:
                candidates[i] = claimed
            else:
                verdicts[i] = Verdict(node, bound or f"node-{node}", claimed)
        claims = Counter(candidates.values())
        for i, claimed in candidates.items():
            node = replies[i][0]
            if claims[claimed] > 1:
                nodes = sorted(replies[j][0] for j, c in candidates.items() if c == claimed)
                verdicts[i] = Verdict(node, f"node-{node}", claimed, f"site name {claimed!r} claimed by nodes {nodes} "
                                                                     f"at first contact; it is bound to none of them")
                continue
            self.bindings[claimed] = node
            logger.info("site %s is node %s", claimed, node)
            verdicts[i] = Verdict(node, claimed, claimed)
        assert all(v is not None for v in verdicts)
        return verdicts  # type: ignore[return-value]
