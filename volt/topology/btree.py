"""The original Volt's binary tree executors, kept faithful with two fixes.

* Placement: breadth-first from the image server, the first *ready* node with a free slot
  takes the new node (left child first). If no ready node has a free slot the node is not
  placed and the caller answers "not placeable yet, retry" (the original's behaviour: a tree
  grows one level per registration round).
* Removal: the left child takes the removed node's place and the right subtree is re-hung
  below the first ready node with a free slot on the left child's leftmost chain. Fix 1: where
  the original looped forever (the chain ends at a pending leaf), the search falls back to a
  breadth-first search of the tree; it always terminates.
* Parents: ``[tree parent]``, or ``[]`` under the image server. Fix 2: only ready nodes are
  ever returned as parents; if a re-hung subtree's parent is still pending, its nearest ready
  ancestor is returned instead. ``btreewithuncle`` adds the parent's sibling when it is ready
  (the original added it whatever its status).
"""

from __future__ import annotations

from volt.topology.base import Executor
from volt.topology.tree import Node, Tree

LEFT, RIGHT = 0, 1


class BtreeExecutor(Executor):
    name = "btree"

    def __init__(self, **_: object) -> None:
        pass

    def fanout(self) -> int:
        return 2

    def join(self, tree: Tree, peer_id: str, member: str) -> Node | None:
        slot_owner = self._first_available(tree, tree.root)
        if slot_owner is None:
            return None
        node = tree.new_node(peer_id, member)
        tree.attach(node, slot_owner, slot_owner.free_slot())
        return node

    def remove(self, tree: Tree, node: Node) -> None:
        left, right = node.children
        parent, slot = node.parent, node.slot
        assert parent is not None
        for child in (left, right):
            if child is not None:
                tree.detach(child)
        tree.detach(node)
        tree.delete(node)
        up = left or right
        if up is not None:
            tree.attach(up, parent, slot)
        if left is not None and right is not None:
            host = self._on_leftmost_chain(left) or self._first_available(tree, tree.root)
            if host is None:  # every free slot is under a pending node
                host = next(n for n in tree.bfs() if n.has_free_slot())
            tree.attach(right, host, host.free_slot())

    def parents(self, tree: Tree, node: Node) -> list[Node]:
        parent = node.parent
        assert parent is not None
        if parent.is_root:
            return []
        first = parent if parent.ready else self.nearest_ready_ancestor(tree, parent)
        return [] if first is None else [first]

    @staticmethod
    def _available(node: Node) -> bool:
        return node.ready and node.has_free_slot()

    def _first_available(self, tree: Tree, start: Node) -> Node | None:
        return next((n for n in tree.bfs(start) if self._available(n)), None)

    def _on_leftmost_chain(self, start: Node) -> Node | None:
        current: Node | None = start
        while current is not None and not self._available(current):
            current = current.children[LEFT]
        return current


class BtreeWithUncleExecutor(BtreeExecutor):
    name = "btreewithuncle"

    def parents(self, tree: Tree, node: Node) -> list[Node]:
        result = super().parents(tree, node)
        parent = node.parent
        if result and parent is not None and parent.parent is not None:
            uncle = parent.parent.children[1 - parent.slot]
            if uncle is not None and uncle.ready and uncle not in result:
                result.append(uncle)
        return result
