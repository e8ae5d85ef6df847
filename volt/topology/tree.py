"""The tree of one image: nodes, the image server at the root, and the indexes placement needs.

Pure data structure, no I/O. Every change marks the touched nodes in ``dirty`` (and removed
ones in ``removed``) so the caller can write exactly those rows to the store.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from sortedcontainers import SortedDict

PENDING = "pending"
OK = "OK"


@dataclass(eq=False)
class Node:
    """A node of a tree. The root stands for the image server(s) and has ``peer_id`` None."""

    peer_id: str | None
    member: str | None  # the host that queried (heartbeats and eviction are per member)
    host: str | None  # the relay target's address (registered); the member until then
    seq: int
    status: str = PENDING
    port: str | None = None
    iqn: str | None = None
    lun: str | None = None
    nbd_port: str | None = None  # an NBD export of the same relay (an extension; optional)
    parent: Node | None = None
    slot: int = 0
    depth: int = 0
    children: list[Node | None] = field(default_factory=list)

    @property
    def is_root(self) -> bool:
        return self.peer_id is None

    @property
    def ready(self) -> bool:
        return self.status == OK

    def has_free_slot(self) -> bool:
        return None in self.children

    def free_slot(self) -> int:
        return self.children.index(None)

    def child_nodes(self) -> list[Node]:
        return [c for c in self.children if c is not None]

    def identity(self) -> dict[str, str | None]:
        """The original's identity dict, byte-compatible; ``nbd_port`` is added only for a
        node that registered one."""
        identity = {
            "host": self.host,
            "port": self.port,
            "iqn": self.iqn,
            "lun": self.lun,
            "status": self.status,
            "peer_id": self.peer_id,
        }
        if self.nbd_port is not None:
            identity["nbd_port"] = self.nbd_port
        return identity


class Tree:
    """One image's tree. ``fanout`` bounds the children of every node; the root's (the
    image server's) are ``root_fanout`` (default: ``fanout``)."""

    def __init__(self, volume_id: str, fanout: int, root_fanout: int | None = None) -> None:
        self.volume_id = volume_id
        self.fanout = fanout
        self.root_fanout = root_fanout or fanout
        self.root = Node(peer_id=None, member=None, host=None, seq=-1, status=OK)
        self.root.children = [None] * self.root_fanout
        self.nodes: dict[str, Node] = {}
        self.next_seq = 0
        # depth -> {seq: node}; the root lives at depth 0.
        self.levels: dict[int, SortedDict] = {0: SortedDict({-1: self.root})}
        self.with_free_slot: dict[int, SortedDict] = {0: SortedDict({-1: self.root})}
        self.dirty: set[str] = set()
        self.removed: set[str] = set()

    # -- queries -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.nodes)

    def max_depth(self) -> int:
        return max((d for d, level in self.levels.items() if level), default=0)

    def placement_depth(self) -> int:
        """Depth a new node would get: one below the shallowest node with a free slot."""
        return min(d for d, level in self.with_free_slot.items() if level) + 1

    def bfs(self, start: Node | None = None) -> Iterator[Node]:
        """Breadth first, children in slot order (left before right)."""
        queue = [start or self.root]
        for node in queue:
            yield node
            queue.extend(node.child_nodes())

    def subtree(self, node: Node) -> Iterator[Node]:
        return self.bfs(node)

    def ancestors(self, node: Node) -> Iterator[Node]:
        """Parent first, up to (not including) the root."""
        current = node.parent
        while current is not None and not current.is_root:
            yield current
            current = current.parent

    # -- changes -----------------------------------------------------------------------
    def new_node(self, peer_id: str, member: str, *, seq: int | None = None) -> Node:
        if seq is None:
            seq = self.next_seq
        self.next_seq = max(self.next_seq, seq + 1)
        node = Node(peer_id=peer_id, member=member, host=member, seq=seq)
        node.children = [None] * self.fanout
        self.nodes[peer_id] = node
        self.dirty.add(peer_id)
        return node

    def attach(self, node: Node, parent: Node, slot: int) -> None:
        """Hang a detached node (and its subtree) under ``parent`` at ``slot``."""
        assert node.parent is None and parent.children[slot] is None
        parent.children[slot] = node
        node.parent = parent
        node.slot = slot
        self._mark(node)
        if not parent.has_free_slot():
            self._index_free(parent, False)
        self._set_depth(node, parent.depth + 1)

    def detach(self, node: Node) -> None:
        """Unhook a node (with its subtree) from its parent; it keeps its depth until attached."""
        parent = node.parent
        assert parent is not None
        parent.children[node.slot] = None
        node.parent = None
        self._index_free(parent, True)
        self._mark(node)

    def delete(self, node: Node) -> None:
        """Forget a detached node without children."""
        assert node.parent is None and not node.child_nodes() and node.peer_id is not None
        self._index_level(node, False)
        self._index_free(node, False)
        del self.nodes[node.peer_id]
        self.dirty.discard(node.peer_id)
        self.removed.add(node.peer_id)

    def take_children(self, new: Node, old: Node) -> None:
        """Move every child of ``old`` under ``new`` at the same slots (``new`` has none)."""
        assert not new.child_nodes()
        for slot, child in enumerate(old.children):
            if child is None:
                continue
            self.detach(child)
            self.attach(child, new, slot)

    def swap_with_parent(self, node: Node) -> None:
        """Exchange the places of ``node`` and its parent: ``node`` moves up one level and
        takes its parent's slot and other children; the parent takes ``node``'s slot and
        children. Only these two nodes change depth."""
        parent = node.parent
        assert parent is not None and not parent.is_root
        grand = parent.parent
        assert grand is not None
        upper_slot, lower_slot = parent.slot, node.slot
        lower_children = list(node.children)
        for child in node.child_nodes():
            self.detach(child)
        self.detach(node)
        siblings = list(parent.children)
        for child in parent.child_nodes():
            self.detach(child)
        self.detach(parent)
        self.attach(node, grand, upper_slot)
        self.attach(parent, node, lower_slot)
        for slot, sibling in enumerate(siblings):
            if sibling is not None:
                self.attach(sibling, node, slot)
        for slot, lower in enumerate(lower_children):
            if lower is not None:
                self.attach(lower, parent, slot)

    def set_status(self, node: Node, status: str) -> None:
        if node.status != status:
            node.status = status
            self._mark(node)

    def mark(self, node: Node) -> None:
        self._mark(node)

    def take_changes(self) -> tuple[list[Node], set[str]]:
        """Nodes to write and peer ids to delete since the last call."""
        changed = [self.nodes[p] for p in self.dirty if p in self.nodes]
        removed = self.removed
        self.dirty, self.removed = set(), set()
        return changed, removed

    # -- internals ---------------------------------------------------------------------
    def _mark(self, node: Node) -> None:
        if node.peer_id is not None:
            self.dirty.add(node.peer_id)

    def _set_depth(self, top: Node, depth: int) -> None:
        if top.depth == depth and top.peer_id in self.nodes and self._indexed(top):
            return
        shift = depth - top.depth
        for node in self.subtree(top):
            self._index_level(node, False)
            self._index_free(node, False)
            node.depth += shift
            self._index_level(node, True)
            self._index_free(node, node.has_free_slot())

    def _indexed(self, node: Node) -> bool:
        level = self.levels.get(node.depth)
        return level is not None and node.seq in level

    def _index_level(self, node: Node, present: bool) -> None:
        self._index(self.levels, node, present)

    def _index_free(self, node: Node, present: bool) -> None:
        self._index(self.with_free_slot, node, present and node.has_free_slot())

    @staticmethod
    def _index(index: dict[int, SortedDict], node: Node, present: bool) -> None:
        if present:
            level = index.get(node.depth)
            if level is None:  # not setdefault: a SortedDict is dear to build per call
                level = index[node.depth] = SortedDict()
            level[node.seq] = node
        else:
            level = index.get(node.depth)
            if level is not None:
                level.pop(node.seq, None)
