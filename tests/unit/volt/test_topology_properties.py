"""Random join / register / leave sequences against every executor (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.volt.invariants import check_tree
from volt.topology import OK, Tree, load_executor

EXECUTORS = [
    ("btree", {}),
    ("btreewithuncle", {}),
    ("balanced", {"fanout": 2, "parents_per_node": 2}),
    ("balanced", {"fanout": 3, "parents_per_node": 3}),
    ("balanced", {"fanout": 4, "parents_per_node": 1}),
    ("balanced", {"fanout": 4, "parents_per_node": 2, "image_server_fanout": 1}),
    ("balanced", {"fanout": 3, "parents_per_node": 2, "image_server_fanout": 2}),
]

operation = st.one_of(
    st.tuples(st.just("join"), st.integers(0, 80)),
    st.tuples(st.just("register"), st.integers(0, 80)),
    st.tuples(st.just("leave"), st.integers(0, 80)),
)


def run(name: str, options: dict, ops: list[tuple[str, int]]) -> None:
    executor = load_executor(name, **options)
    tree = Tree("volume-prop", executor.fanout(), executor.image_server_fanout())
    for op, host in ops:
        peer_id = f"10.0.{host // 250}.{host % 250}:volume-prop"
        node = tree.nodes.get(peer_id)
        if op == "join" and node is None:
            placed = executor.join(tree, peer_id, peer_id.partition(":")[0])
            if name == "balanced":
                assert placed is not None, "balanced always places at once"
            if placed is None:
                assert not any(n.ready and n.has_free_slot() for n in tree.bfs())
        elif op == "register" and node is not None and not node.ready:
            tree.set_status(node, OK)
            executor.registered(tree, node)
        elif op == "leave" and node is not None:
            executor.remove(tree, node)
            assert peer_id not in tree.nodes
        check_tree(tree, executor, depth_bound=name == "balanced")


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(EXECUTORS), st.lists(operation, max_size=120))
def test_random_sequences_keep_invariants(executor, ops):
    run(*executor, ops)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(EXECUTORS),
    st.integers(1, 60),
    st.lists(st.integers(0, 59), max_size=60),
    st.randoms(use_true_random=False),
)
def test_burst_then_leaves(executor, size, leavers, rnd):
    """A burst of joins, random registrations, then many leaves (subtrees move around)."""
    ops: list[tuple[str, int]] = [("join", i) for i in range(size)]
    ops += [("register", i) for i in range(size) if rnd.random() < 0.7]
    ops += [("join", i) for i in range(size)]  # btree: places the ones that had to retry
    ops += [("leave", i) for i in leavers]
    run(*executor, ops)


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(EXECUTORS),
    st.integers(3, 63),
    st.data(),
)
def test_burst_then_most_leave(executor, size, data):
    """Everyone but a few survivors leaves, leaves first: the survivors must not stay a chain."""
    survivors = data.draw(st.sets(st.integers(0, size - 1), min_size=1, max_size=4))
    leavers = sorted(set(range(size)) - survivors, reverse=True)
    leavers = data.draw(st.permutations(leavers)) if data.draw(st.booleans()) else leavers
    ops = [("join", i) for i in range(size)] + [("register", i) for i in range(size)]
    ops += [("join", i) for i in range(size)] + [("leave", i) for i in leavers]
    run(*executor, ops)


def test_chain_left_by_leaf_removals_is_flattened():
    """15 nodes in a complete binary tree; removing all but one root-to-leaf path must not
    leave a chain of depth 4 (bound for N=4 is 3)."""
    executor = load_executor("balanced", fanout=2, parents_per_node=2)
    tree = Tree("volume-chain", 2)
    nodes = [executor.join(tree, f"10.0.0.{i}:v", f"10.0.0.{i}") for i in range(1, 16)]
    path = set()
    node = nodes[-1]
    while not node.is_root:
        path.add(node.peer_id)
        node = node.parent
    assert len(path) == 4
    for node in reversed(nodes):
        if node.peer_id not in path:
            executor.remove(tree, node)
    assert len(tree) == 4 and tree.max_depth() == 2
    check_tree(tree, executor, depth_bound=True)
