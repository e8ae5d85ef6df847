"""Exact behaviour of each executor on small, hand-checked trees."""

from tests.unit.volt.invariants import check_tree
from volt.topology import OK, Tree, load_executor


def peer(i: int) -> str:
    return f"10.0.0.{i}:volume-x"


def join(executor, tree, i):
    return executor.join(tree, peer(i), f"10.0.0.{i}")


def shape(tree):
    return {p: (n.parent.peer_id, n.slot) for p, n in tree.nodes.items()}


def test_btree_grows_one_level_per_registration_round():
    """The original: pending nodes take no children, so the third node must retry."""
    ex = load_executor("btree")
    tree = Tree("volume-x", ex.fanout())
    a, b = join(ex, tree, 1), join(ex, tree, 2)
    assert ex.parents(tree, a) == [] and ex.parents(tree, b) == []
    assert join(ex, tree, 3) is None
    tree.set_status(a, OK)
    c = join(ex, tree, 3)
    assert c.parent is a and c.slot == 0
    assert ex.parents(tree, c) == [a]
    d = join(ex, tree, 4)
    assert d.parent is a and d.slot == 1
    assert join(ex, tree, 5) is None  # b still pending, a full


def test_btree_removal_rehangs_right_subtree_on_leftmost_chain():
    ex = load_executor("btree")
    tree = Tree("volume-x", 2)
    nodes = {}
    for i in range(1, 8):
        nodes[i] = join(ex, tree, i)
        assert nodes[i] is not None
        tree.set_status(nodes[i], OK)
    # 1 -> (3, 4), 2 -> (5, 6), 3 -> (7, _)
    assert shape(tree)[peer(7)] == (peer(3), 0)
    ex.remove(tree, nodes[1])
    # 3 takes 1's place; 4 (right) hangs on 3's leftmost chain: 3 has a free right slot.
    assert shape(tree)[peer(3)] == (None, 0)
    assert shape(tree)[peer(4)] == (peer(3), 1)
    assert shape(tree)[peer(7)] == (peer(3), 0)
    assert ex.parents(tree, nodes[4]) == [nodes[3]]


def test_btree_removal_terminates_where_the_original_looped():
    """Leftmost chain ends at a pending leaf: the original's while loop never ended."""
    ex = load_executor("btree")
    tree = Tree("volume-x", 2)
    n = {i: join(ex, tree, i) for i in (1, 2)}
    tree.set_status(n[1], OK)
    n[3], n[4] = join(ex, tree, 3), join(ex, tree, 4)  # children of 1
    tree.set_status(n[3], OK)
    n[5], n[6] = join(ex, tree, 5), join(ex, tree, 6)  # children of 3, pending
    tree.set_status(n[4], OK)
    ex.remove(tree, n[1])  # up = 3 (full, pending children): 4 must go elsewhere
    assert n[4].parent is not None and not n[4].parent.is_root
    assert n[4].peer_id in tree.nodes
    assert all(p.ready for p in ex.parents(tree, n[4]))


def test_btreewithuncle_adds_ready_uncle():
    ex = load_executor("btreewithuncle")
    tree = Tree("volume-x", 2)
    n = {}
    for i in range(1, 4):
        n[i] = join(ex, tree, i)
        tree.set_status(n[i], OK)
    assert n[3].parent is n[1]
    assert ex.parents(tree, n[3]) == [n[1], n[2]]


def test_balanced_places_a_burst_at_once():
    ex = load_executor("balanced", fanout=2, parents_per_node=2)
    tree = Tree("volume-x", 2)
    nodes = [join(ex, tree, i) for i in range(1, 8)]
    assert [n.depth for n in nodes] == [1, 1, 2, 2, 2, 2, 3]
    # All pending: a node sees its pending tree parent first and reads from the image server.
    assert ex.parents(tree, nodes[2]) == [nodes[0]]
    tree.set_status(nodes[1], OK)
    # Sibling of the pending parent is ready: the "other parent".
    assert ex.parents(tree, nodes[2]) == [nodes[0], nodes[1]]
    tree.set_status(nodes[0], OK)
    assert ex.parents(tree, nodes[2]) == [nodes[0], nodes[1]]
    assert ex.parents(tree, nodes[4]) == [nodes[1], nodes[0]]
    # Under a pending parent (node 3), the nearest ready ancestor (node 1) comes next.
    assert ex.parents(tree, nodes[6]) == [nodes[2], nodes[0]]


def test_balanced_registration_lifts_a_ready_node_above_pending_ones():
    ex = load_executor("balanced", fanout=2, parents_per_node=2)
    tree = Tree("volume-x", 2)
    nodes = [join(ex, tree, i) for i in range(1, 16)]  # all pending, depths 1..4
    leaf = nodes[14]
    chain = [leaf, *tree.ancestors(leaf)]  # leaf, its parent, grandparent, top node
    assert [n.depth for n in chain] == [4, 3, 2, 1]
    slots = [n.slot for n in chain]
    tree.set_status(leaf, OK)
    ex.registered(tree, leaf)
    # It swapped places with each pending ancestor, so it now sits at the top (reading from
    # the image server) and each ancestor moved one place down the same path.
    assert leaf.parent is tree.root and leaf.slot == slots[3]
    assert [n.depth for n in chain] == [1, 4, 3, 2]
    assert chain[3].parent is leaf and chain[2].parent is chain[3] and chain[1].parent is chain[2]
    assert [chain[1].slot, chain[2].slot, chain[3].slot] == slots[:3]
    assert tree.max_depth() == 4 and len(tree) == 15
    check_tree(tree, ex, depth_bound=True)
    # A node that registers under a ready parent stays where it is.
    child = chain[3]  # pending, under the ready leaf
    before = (child.parent, child.slot)
    tree.set_status(child, OK)
    ex.registered(tree, child)
    assert (child.parent, child.slot) == before
    check_tree(tree, ex, depth_bound=True)
