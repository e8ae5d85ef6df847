"""The SQL store of all trees (SQLAlchemy Core; SQLite by default, PostgreSQL or MySQL).

The in-memory trees are a write-through cache of these tables: every change is committed
before the API answers, so a restart (even after ``kill -9``) serves the same trees.
Heartbeat times are deliberately not stored: after a restart every host starts a fresh
``node_timeout`` instead of being evicted for the time volt-api was down.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from volt.errors import StoreUnavailable
from volt.topology.tree import Node

LOG = logging.getLogger(__name__)

metadata = sa.MetaData()
# host (a DNS name: 253, or a bracketed IPv6 address) + ":" + volume id (255): 509 at most.
# MySQL's 3072-byte key limit fits (255 + 512) utf8mb4 characters exactly.
PEER_ID_WIDTH = 512

volumes = sa.Table(
    "volt_volumes",
    metadata,
    sa.Column("id", sa.String(255), primary_key=True),
    sa.Column("fanout", sa.Integer, nullable=False),
)

nodes = sa.Table(
    "volt_nodes",
    metadata,
    sa.Column(
        "volume_id",
        sa.String(255),
        sa.ForeignKey("volt_volumes.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("peer_id", sa.String(PEER_ID_WIDTH), primary_key=True),
    sa.Column("member", sa.String(255), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("port", sa.String(8)),
    sa.Column("iqn", sa.String(255)),
    sa.Column("lun", sa.String(8)),
    sa.Column("nbd_port", sa.String(8)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("parent_peer_id", sa.String(PEER_ID_WIDTH)),  # NULL: child of the image server
    sa.Column("slot", sa.Integer, nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
)


@dataclass(frozen=True)
class NodeRow:
    peer_id: str
    member: str
    host: str
    port: str | None
    iqn: str | None
    lun: str | None
    nbd_port: str | None
    status: str
    parent_peer_id: str | None
    slot: int
    seq: int


@dataclass(frozen=True)
class VolumeRows:
    volume_id: str
    fanout: int
    nodes: list[NodeRow]


def _node_values(volume_id: str, node: Node) -> dict[str, object]:
    parent = node.parent
    assert parent is not None
    return {
        "volume_id": volume_id,
        "peer_id": node.peer_id,
        "member": node.member,
        "host": node.host,
        "port": node.port,
        "iqn": node.iqn,
        "lun": node.lun,
        "nbd_port": node.nbd_port,
        "status": node.status,
        "parent_peer_id": parent.peer_id,
        "slot": node.slot,
        "seq": node.seq,
    }


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = self._make_engine(url)
        try:
            metadata.create_all(self.engine)
            self._add_missing_columns()
        except sa.exc.SQLAlchemyError as exc:
            raise StoreUnavailable(f"cannot open the store: {exc.__class__.__name__}") from exc
        self._prepare_statements()

    def _add_missing_columns(self) -> None:
        """Columns added after a store was created (nullable ones only) are added in place."""
        for table in (volumes, nodes):
            present = {c["name"] for c in sa.inspect(self.engine).get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                assert column.nullable, column.name
                kind = column.type.compile(dialect=self.engine.dialect)
                LOG.warning("store: adding column %s.%s", table.name, column.name)
                with self.engine.begin() as conn:
                    conn.exec_driver_sql(
                        f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"
                    )

    @staticmethod
    def _make_engine(url: str) -> Engine:
        parsed = sa.engine.make_url(url)
        if parsed.get_backend_name() != "sqlite":
            return sa.create_engine(url, pool_pre_ping=True)
        if parsed.database and parsed.database != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(parsed.database)), exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL + NORMAL: a committed transaction survives a crash of the process.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.close()

        return engine

    def dispose(self) -> None:
        self.engine.dispose()

    def load(self, volume_ids: list[str] | None = None) -> list[VolumeRows]:
        """All trees, or those of ``volume_ids`` (missing ones are simply absent)."""
        volume_query = sa.select(volumes)
        query = sa.select(nodes).order_by(nodes.c.volume_id, nodes.c.seq)
        if volume_ids is not None:
            volume_query = volume_query.where(volumes.c.id.in_(volume_ids))
            query = query.where(nodes.c.volume_id.in_(volume_ids))
        with self.engine.connect() as conn:
            fanouts = {row.id: row.fanout for row in conn.execute(volume_query)}
            by_volume: dict[str, list[NodeRow]] = {vid: [] for vid in fanouts}
            for row in conn.execute(query):
                by_volume[row.volume_id].append(
                    NodeRow(
                        peer_id=row.peer_id,
                        member=row.member,
                        host=row.host,
                        port=row.port,
                        iqn=row.iqn,
                        lun=row.lun,
                        nbd_port=row.nbd_port,
                        status=row.status,
                        parent_peer_id=row.parent_peer_id,
                        slot=row.slot,
                        seq=row.seq,
                    )
                )
        return [VolumeRows(vid, fanouts[vid], rows) for vid, rows in by_volume.items()]

    def save(
        self,
        volume_id: str,
        fanout: int,
        changed: Iterable[Node],
        removed: Iterable[str],
        *,
        create: bool = False,
    ) -> None:
        """Write one tree's changes in one transaction (``create``: the volume row too)."""
        rows = [_node_values(volume_id, node) for node in changed]
        removed = list(removed)
        with self.engine.begin() as conn:
            if create:
                conn.execute(self._upsert_volume, [{"id": volume_id, "fanout": fanout}])
            if removed:
                conn.execute(
                    self._delete_node, [{"volume_id": volume_id, "peer_id": p} for p in removed]
                )
            if rows:
                conn.execute(self._upsert_node, rows)

    def delete_volume(self, volume_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(nodes.delete().where(nodes.c.volume_id == volume_id))
            conn.execute(volumes.delete().where(volumes.c.id == volume_id))

    def _prepare_statements(self) -> None:
        """Build the write statements once; rows come as execute() parameters."""
        self._upsert_volume = self._upsert(volumes, ["id"])
        self._upsert_node = self._upsert(nodes, ["volume_id", "peer_id"])
        self._delete_node = nodes.delete().where(
            nodes.c.volume_id == sa.bindparam("volume_id"),
            nodes.c.peer_id == sa.bindparam("peer_id"),
        )

    def _upsert(self, table: sa.Table, keys: list[str]) -> sa.TextClause:
        """INSERT or UPDATE one row per parameter set, as text: SQLAlchemy does not cache the
        compiled form of its dialect upsert constructs, and compiling costs more than writing."""
        columns = [c.name for c in table.columns]
        others = [c for c in columns if c not in keys]
        insert = (
            f"INSERT INTO {table.name} ({', '.join(columns)}) "  # noqa: S608 (our names)
            f"VALUES ({', '.join(':' + c for c in columns)})"
        )
        if self.engine.dialect.name == "mysql":
            updates = ", ".join(f"{c} = VALUES({c})" for c in others)
            return sa.text(f"{insert} ON DUPLICATE KEY UPDATE {updates}")
        updates = ", ".join(f"{c} = excluded.{c}" for c in others)
        return sa.text(f"{insert} ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}")
