"""The default executor: a balanced k-ary tree with several parents per node.

Invariant kept after every operation (``max depth <= placement depth``): the tree is as
shallow as a complete k-ary tree of its size, up to one level, so depth <= ceil(log_k N) + 1.

* Join: a new node is placed at once, under the shallowest node with a free slot (a ready one
  if that level has one), even if that parent is still pending: no retry rounds in a burst.
* Remove: a deepest leaf takes the removed node's place (one node moves, like deleting from a
  heap); then, while the tree is deeper than a new node would be placed, a deepest leaf moves
  up to the shallowest free slot. Every move lifts a node, so removal terminates.
* Readiness: ready nodes are kept above pending ones. When a node registers, it swaps places
  with its pending ancestors (positions, and so the balance, stay as they are), so a ready
  node always reads from its tree parent and at most ``fanout`` nodes read from the image
  server once they serve VMs.
* Parents: the tree parent first (it carries the reads), then up to ``parents_per_node - 1``
  standby parents: the tree parent's siblings, then its ancestors and their siblings. Standby
  parents are ready and strictly shallower than the node, so no node can ever read from its
  own subtree. While the tree parent is pending, a pending node still sees it first (status
  "pending": connect later) and reads from the next entry; a ready node only ever gets ready
  parents.
"""

from __future__ import annotations

from collections.abc import Iterator

from volt.topology.base import Executor
from volt.topology.tree import Node, Tree

SCAN_LIMIT = 64  # bound on the search for a ready candidate within one level


class BalancedExecutor(Executor):
    name = "balanced"

    def __init__(
        self,
        fanout: int = 2,
        parents_per_node: int = 2,
        image_server_fanout: int | None = None,
        **_: object,
    ) -> None:
        if fanout < 2:
            raise ValueError("fanout must be at least 2")
        if parents_per_node < 1:
            raise ValueError("parents_per_node must be at least 1")
        if image_server_fanout is not None and image_server_fanout < 1:
            raise ValueError("image_server_fanout must be at least 1")
        self._fanout = fanout
        self._image_server_fanout = image_server_fanout or fanout
        self.parents_per_node = parents_per_node

    def fanout(self) -> int:
        return self._fanout

    def image_server_fanout(self) -> int:
        return self._image_server_fanout

    def join(self, tree: Tree, peer_id: str, member: str) -> Node | None:
        parent = self._placement_parent(tree)
        node = tree.new_node(peer_id, member)
        tree.attach(node, parent, parent.free_slot())
        return node

    def registered(self, tree: Tree, node: Node) -> None:
        self._promote(tree, node)

    def remove(self, tree: Tree, node: Node) -> None:
        parent, slot = node.parent, node.slot
        assert parent is not None
        if node.child_nodes():
            replacement = self._deepest_leaf(tree, prefer_ready=True)
            tree.detach(replacement)
            tree.detach(node)
            tree.attach(replacement, parent, slot)
            tree.take_children(replacement, node)
            self._sink(tree, replacement)
            self._promote(tree, replacement)
        else:
            tree.detach(node)
        tree.delete(node)
        self._rebalance(tree)

    def parents(self, tree: Tree, node: Node) -> list[Node]:
        parent = node.parent
        assert parent is not None
        if parent.is_root:
            return []
        result = [parent] if parent.ready or not node.ready else []
        for candidate in self._standby_candidates(tree, parent):
            if len(result) >= self.parents_per_node:
                break
            if candidate.ready:
                result.append(candidate)
        return result

    # -- internals ---------------------------------------------------------------------
    @staticmethod
    def _standby_candidates(tree: Tree, parent: Node) -> Iterator[Node]:
        """Nodes above the caller, nearest first: with a ready tree parent its siblings, then
        each ancestor followed by that ancestor's siblings; with a pending tree parent the
        ancestors first (the nearest ready one carries the reads), then all those siblings."""
        ancestors = list(tree.ancestors(parent))
        if parent.ready:
            yield from _siblings(parent)
            for ancestor in ancestors:
                yield ancestor
                yield from _siblings(ancestor)
        else:
            yield from ancestors
            for node in [parent, *ancestors]:
                yield from _siblings(node)

    def _placement_parent(self, tree: Tree) -> Node:
        depth = tree.placement_depth() - 1
        level = tree.with_free_slot[depth]
        for i, candidate in enumerate(level.values()):
            if candidate.ready:
                return candidate
            if i >= SCAN_LIMIT:
                break
        first: Node = level.peekitem(0)[1]
        return first

    def _deepest_leaf(self, tree: Tree, *, prefer_ready: bool) -> Node:
        """A node of the deepest level (all of them are leaves): the newest ready one if
        ``prefer_ready`` and one exists within the scan bound, else the newest."""
        level = tree.levels[tree.max_depth()]
        if prefer_ready:
            for i, candidate in enumerate(reversed(level.values())):
                if candidate.ready:
                    return candidate
                if i >= SCAN_LIMIT:
                    break
        newest: Node = level.peekitem(-1)[1]
        return newest

    def _rebalance(self, tree: Tree) -> None:
        while tree.nodes and tree.max_depth() > tree.placement_depth():
            leaf = self._deepest_leaf(tree, prefer_ready=False)
            tree.detach(leaf)
            parent = self._placement_parent(tree)
            tree.attach(leaf, parent, parent.free_slot())
            self._promote(tree, leaf)

    # Ready nodes are kept above pending ones (a heap ordered by readiness): a ready node's
    # tree parent is always ready, so it reads from its tree parent, and at most ``fanout``
    # ready nodes ever read from the image server. Positions (and so balance) do not change.
    @staticmethod
    def _promote(tree: Tree, node: Node) -> None:
        """Swap a ready node up past its pending ancestors."""
        while node.ready and node.parent is not None and not node.parent.is_root:
            if node.parent.ready:
                return
            tree.swap_with_parent(node)

    @staticmethod
    def _sink(tree: Tree, node: Node) -> None:
        """Swap a pending node down below its ready children."""
        while not node.ready:
            ready_child = next((c for c in node.child_nodes() if c.ready), None)
            if ready_child is None:
                return
            tree.swap_with_parent(ready_child)


def _siblings(node: Node) -> list[Node]:
    """The other children of ``node``'s parent, in slot order starting after ``node``."""
    parent = node.parent
    assert parent is not None
    width = len(parent.children)
    around = (parent.children[(node.slot + i) % width] for i in range(1, width))
    return [s for s in around if s is not None]
