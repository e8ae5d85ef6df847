"""The SQL store: upserts, removals, and stores created before a column existed."""

import sqlalchemy as sa

from volt.store import Store
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


def test_a_store_without_the_nbd_port_column_gets_it(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/old.sqlite"
    Store(url).dispose()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE volt_nodes DROP COLUMN nbd_port")
    store = Store(url)
    columns = {c["name"] for c in sa.inspect(store.engine).get_columns("volt_nodes")}
    assert "nbd_port" in columns
