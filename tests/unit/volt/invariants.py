"""Structural checks every executor's trees must pass after any sequence of operations."""

from __future__ import annotations

import math

from volt.topology import Executor, Node, Tree


def check_tree(tree: Tree, executor: Executor, *, depth_bound: bool) -> None:
    seen: set[int] = set()
    order: list[Node] = []
    for node in tree.bfs():
        assert id(node) not in seen, f"{node.peer_id} reached twice: the tree has a cycle"
        seen.add(id(node))
        order.append(node)
        assert len(node.children) == (tree.root_fanout if node.is_root else tree.fanout)
        for slot, child in enumerate(node.children):
            if child is None:
                continue
            assert child.parent is node and child.slot == slot
            assert child.depth == node.depth + 1, f"{child.peer_id} depth {child.depth}"
    reachable = {n.peer_id for n in order if not n.is_root}
    assert reachable == set(tree.nodes), "nodes lost from or stale in the tree"

    # The indexes placement uses match the tree.
    for depth, level in tree.levels.items():
        assert {n.peer_id for n in level.values()} == {n.peer_id for n in order if n.depth == depth}
    for depth, level in tree.with_free_slot.items():
        assert {n.peer_id for n in level.values()} == {
            n.peer_id for n in order if n.depth == depth and n.has_free_slot()
        }

    for node in tree.nodes.values():
        parents = executor.parents(tree, node)
        ids = [p.peer_id for p in parents]
        assert len(ids) == len(set(ids)), f"{node.peer_id} has duplicate parents {ids}"
        for i, parent in enumerate(parents):
            assert parent.peer_id in tree.nodes, f"{node.peer_id} told to read from a ghost"
            # Parents are strictly shallower, so the read graph (tree + standby) is acyclic.
            assert parent.depth < node.depth, f"{node.peer_id} parent {parent.peer_id} not above"
            if node.ready or i > 0:
                assert parent.ready, f"{node.peer_id} ({node.status}) given pending {ids}"
            else:
                assert parent.ready or parent is node.parent
        if node.parent is tree.root:
            assert parents == [], "top-level nodes read from the image server"

    if depth_bound and tree.nodes:
        # Ready nodes sit above pending ones.
        for node in tree.nodes.values():
            assert not node.ready or node.parent.ready, f"{node.peer_id} under a pending parent"
        # The balanced executor's own invariant (stronger than the bound below): no node
        # is deeper than where the next node would be placed.
        assert tree.max_depth() <= tree.placement_depth()
        # The shallowest tree of N nodes: r top-level nodes, then fanout f below each node.
        f, r = tree.fanout, tree.root_fanout
        bound = math.ceil(math.log(len(tree) * (f - 1) / r + 1, f)) + 1
        assert tree.max_depth() <= bound, f"depth {tree.max_depth()} > {bound} for N={len(tree)}"
