"""The SQL store: upserts, removals, and stores created before a column existed."""

import sqlalchemy as sa

from volt.store import Store, TreeWrite, node_values
from volt.topology.tree import Tree


def test_save_upserts_and_removes(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path}/volt.sqlite")
    tree = Tree("v1", 2)
    a = tree.new_node("10.0.0.1:v1", "10.0.0.1", seq=0)
    tree.attach(a, tree.root, 0)
    b = tree.new_node("10.0.0.2:v1", "10.0.0.2", seq=1)
    tree.attach(b, a, 1)
    store.save("v1", 2, [a, b], [], create=True)
    a.port, a.nbd_port, a.status = "3260", "10809", "OK"
    store.save("v1", 2, [a], ["10.0.0.2:v1"])
    [rows] = store.load()
    assert (rows.volume_id, rows.fanout) == ("v1", 2)
    [row] = rows.nodes
    assert (row.peer_id, row.port, row.nbd_port, row.status, row.parent_peer_id, row.slot) == (
        "10.0.0.1:v1",
        "3260",
        "10809",
        "OK",
        None,
        0,
    )


def test_a_batch_writes_each_nodes_last_change_in_order(tmp_path) -> None:
    """Group commit: several trees' changes in one transaction; a node changed, removed and
    placed again within the batch ends as its last change; a tree deleted then created
    again within it holds only what came after the deletion."""
    store = Store(f"sqlite:///{tmp_path}/volt.sqlite")
    tree = Tree("v1", 2)
    a = tree.new_node("10.0.0.1:v1", "10.0.0.1", seq=0)
    tree.attach(a, tree.root, 0)
    b = tree.new_node("10.0.0.2:v1", "10.0.0.2", seq=1)
    tree.attach(b, a, 0)
    first = [node_values("v1", a), node_values("v1", b)]
    a.status = "OK"
    other = Tree("v2", 3)
    c = other.new_node("10.0.0.3:v2", "10.0.0.3", seq=0)
    other.attach(c, other.root, 0)
    store.write_batch(
        [
            TreeWrite("v1", 2, first, create=True),
            TreeWrite("v2", 3, [node_values("v2", c)], create=True),
            TreeWrite("v1", 2, [], ["10.0.0.2:v1"]),
            TreeWrite("v1", 2, [node_values("v1", a)]),
            TreeWrite("v2", delete=True),
            TreeWrite("v2", 3, [], create=True),
        ]
    )
    found = {rows.volume_id: rows for rows in store.load()}
    assert sorted(found) == ["v1", "v2"]
    assert [(r.peer_id, r.status) for r in found["v1"].nodes] == [("10.0.0.1:v1", "OK")]
    assert (found["v2"].fanout, found["v2"].nodes) == (3, [])

    store.write_batch([TreeWrite("v1", 2, [node_values("v1", b)]), TreeWrite("v1", 2, [], [])])
    assert [r.peer_id for r in store.load(["v1"])[0].nodes] == ["10.0.0.1:v1", "10.0.0.2:v1"]


def test_a_store_without_the_nbd_port_column_gets_it(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/old.sqlite"
    Store(url).dispose()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE volt_nodes DROP COLUMN nbd_port")
    store = Store(url)
    columns = {c["name"] for c in sa.inspect(store.engine).get_columns("volt_nodes")}
    assert "nbd_port" in columns


def test_a_tree_keeps_its_image_server_fanout_and_old_trees_have_none(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/old.sqlite"
    store = Store(url)
    store.save("old", 2, [], [], create=True)
    store.dispose()
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # a store made before the column
        conn.exec_driver_sql("ALTER TABLE volt_volumes DROP COLUMN root_fanout")
    store = Store(url)
    store.save("v1", 4, [], [], create=True, root_fanout=1)
    store.write_batch([TreeWrite("v2", 3, [], create=True, root_fanout=2)])
    found = {rows.volume_id: (rows.fanout, rows.root_fanout) for rows in store.load()}
    assert found == {"old": (2, None), "v1": (4, 1), "v2": (3, 2)}
