"""The SQL store of all trees (SQLAlchemy Core; SQLite by default, PostgreSQL or MySQL).

The in-memory trees are a write-through cache of these tables: every change is committed
before the API answers, so a restart (even after ``kill -9``) serves the same trees.
Heartbeat times are not stored by a lone volt-api: after a restart every host starts a fresh
``node_timeout`` instead of being evicted for the time volt-api was down. On PostgreSQL
(several volt-api processes may share it, see docs/ha.rst) they are, in ``volt_members``,
together with a version counter per tree and advisory locks that serialise tree changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

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
    sa.Column("root_fanout", sa.Integer),  # the image server's children; NULL: fanout
    # Bumped by every change of the tree on a shared (PostgreSQL) store: a volt-api reloads
    # its cached copy when the number differs from the one it last wrote or read.
    sa.Column("version", sa.BigInteger),
)

# Last heartbeat (or query) of each host, on a shared store only: written at most every
# liveness_write_interval per host, read by the one evictor.
members = sa.Table(
    "volt_members",
    metadata,
    sa.Column("member", sa.String(255), primary_key=True),
    sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
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

# The cluster controller's tasks and their VMs (volt/cluster, docs/cluster.rst).
cluster_tasks = sa.Table(
    "volt_cluster_tasks",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("origin", sa.String(16), nullable=False),  # "v1" or "snooze"
)

cluster_vms = sa.Table(
    "volt_cluster_vms",
    metadata,
    sa.Column(
        "task_id",
        sa.String(36),
        sa.ForeignKey("volt_cluster_tasks.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("idx", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("userid", sa.String(8), nullable=False, unique=True),
    sa.Column("image", sa.String(255), nullable=False),
    sa.Column("vcpus", sa.Integer, nullable=False),
    sa.Column("memory_mb", sa.Integer, nullable=False),
    sa.Column("node", sa.String(64)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("address", sa.String(64)),
    sa.Column("error", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("extra", sa.Text),  # JSON: what a Snooze template carried (xml, network demand)
    # The controller that changed the row last (its controller_id): who resumes the VM's
    # unfinished step after a restart (volt/cluster/controller.py, resume)
    sa.Column("owner", sa.String(36)),
)

# What happened to each cluster VM on the way (volt/cluster/events.py): the controller's
# dispatches (and over which transport) and the nodes' progress notifications.
cluster_events = sa.Table(
    "volt_cluster_events",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("userid", sa.String(8), nullable=False, index=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("source", sa.String(80), nullable=False),  # "controller" or a node's publisher
    sa.Column("event", sa.String(40), nullable=False),
    sa.Column("step", sa.String(40), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),  # "bus"/"xmlrpc", "started"/"done", an error
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
    version: int | None = field(default=None)
    root_fanout: int | None = None  # None: fanout (a tree of a store made before it)


@dataclass(frozen=True)
class TreeWrite:
    """One tree's change, its rows taken when it was made (see Store.write_batch)."""

    volume_id: str
    fanout: int = 0
    rows: list[dict[str, object]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    create: bool = False
    delete: bool = False  # the whole tree is gone
    root_fanout: int | None = None  # with create


EVICTOR_LOCK = (0x566F6C74, 1)  # ("Volt", 1): the session lock only the evictor holds


def volume_lock_key(volume_id: str) -> int:
    """The advisory lock key (a signed 64-bit integer) of one tree."""
    return int.from_bytes(hashlib.sha256(volume_id.encode()).digest()[:8], "big", signed=True)


def node_values(volume_id: str, node: Node) -> dict[str, object]:
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
        # Several volt-api processes may share a PostgreSQL store (docs/ha.rst).
        self.shared = self.engine.dialect.name == "postgresql"
        try:
            metadata.create_all(self.engine)
            self._add_missing_columns()
        except sa.exc.SQLAlchemyError as exc:
            raise StoreUnavailable(f"cannot open the store: {exc.__class__.__name__}") from exc
        self._prepare_statements()

    def _add_missing_columns(self) -> None:
        """Columns added after a store was created (nullable ones only) are added in place."""
        for table in (volumes, nodes, members, cluster_vms):
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
        if parsed.get_backend_name() == "postgresql":
            # A dead volt-api host is noticed by the server within ~20 s (its advisory locks,
            # the evictor's included, are freed); a dead server by the client likewise.
            keepalive = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2}
            keepalive["keepalives_count"] = 3
            return sa.create_engine(
                url,
                pool_pre_ping=True,
                connect_args={
                    **keepalive,
                    "options": "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 "
                    "-c tcp_keepalives_count=3",
                },
            )
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

    def load(
        self, volume_ids: list[str] | None = None, conn: Connection | None = None
    ) -> list[VolumeRows]:
        """All trees, or those of ``volume_ids`` (missing ones are simply absent); with
        ``conn``, inside that connection's transaction."""
        if conn is None:
            with self.engine.connect() as own:
                return self.load(volume_ids, own)
        volume_query = sa.select(volumes)
        query = sa.select(nodes).order_by(nodes.c.volume_id, nodes.c.seq)
        if volume_ids is not None:
            volume_query = volume_query.where(volumes.c.id.in_(volume_ids))
            query = query.where(nodes.c.volume_id.in_(volume_ids))
        heads = {
            row.id: (row.fanout, row.version, row.root_fanout) for row in conn.execute(volume_query)
        }
        by_volume: dict[str, list[NodeRow]] = {vid: [] for vid in heads}
        for row in conn.execute(query):
            if row.volume_id not in by_volume:
                continue  # written after the volume rows were read
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
        return [
            VolumeRows(vid, heads[vid][0], rows, heads[vid][1], heads[vid][2])
            for vid, rows in by_volume.items()
        ]

    def save(
        self,
        volume_id: str,
        fanout: int,
        changed: Iterable[Node],
        removed: Iterable[str],
        *,
        create: bool = False,
        version: int | None = None,
        root_fanout: int | None = None,
        conn: Connection | None = None,
    ) -> None:
        """Write one tree's changes in one transaction (``create``: the volume row too, with
        ``root_fanout``); ``version``: the tree's new version; ``conn``: inside that
        connection's transaction."""
        if conn is None:
            with self.engine.begin() as own:
                self.save(
                    volume_id, fanout, changed, removed, create=create, version=version,
                    root_fanout=root_fanout, conn=own,
                )  # fmt: skip
            return
        rows = [node_values(volume_id, node) for node in changed]
        removed = list(removed)
        if create:
            head = {"id": volume_id, "fanout": fanout, "version": version}
            conn.execute(self._upsert_volume, [head | {"root_fanout": root_fanout}])
        elif version is not None:
            conn.execute(volumes.update().where(volumes.c.id == volume_id).values(version=version))
        if removed:
            conn.execute(
                self._delete_node, [{"volume_id": volume_id, "peer_id": p} for p in removed]
            )
        if rows:
            conn.execute(self._upsert_node, rows)

    def write_batch(self, writes: Iterable[TreeWrite]) -> None:
        """Apply ``writes`` (several trees' changes, in order) in ONE transaction: Volt's
        group commit (volt/service.py). All of them are written, or none. Between two
        deletions of a whole tree the changes are merged: each node's last row (or its
        removal) is written once, in one statement per kind."""
        with self.engine.begin() as conn:
            run: list[TreeWrite] = []
            for write in writes:
                if write.delete:
                    self._write_run(conn, run)
                    run = []
                    self.delete_volume(write.volume_id, conn)
                else:
                    run.append(write)
            self._write_run(conn, run)

    def _write_run(self, conn: Connection, run: list[TreeWrite]) -> None:
        created: dict[str, dict[str, object]] = {}
        last: dict[tuple[str, object], dict[str, object] | None] = {}  # None: removed
        for write in run:
            if write.create:
                created[write.volume_id] = {
                    "id": write.volume_id,
                    "fanout": write.fanout,
                    "version": None,
                    "root_fanout": write.root_fanout,
                }
            for peer_id in write.removed:
                last[(write.volume_id, peer_id)] = None
            for row in write.rows:
                last[(write.volume_id, row["peer_id"])] = row
        if created:
            conn.execute(self._upsert_volume, list(created.values()))
        removed = [{"volume_id": v, "peer_id": p} for (v, p), row in last.items() if row is None]
        if removed:
            conn.execute(self._delete_node, removed)
        rows = [row for row in last.values() if row is not None]
        if rows:
            conn.execute(self._upsert_node, rows)

    def delete_volume(self, volume_id: str, conn: Connection | None = None) -> None:
        if conn is None:
            with self.engine.begin() as own:
                self.delete_volume(volume_id, own)
            return
        conn.execute(nodes.delete().where(nodes.c.volume_id == volume_id))
        conn.execute(volumes.delete().where(volumes.c.id == volume_id))

    # -- shared store (PostgreSQL) -----------------------------------------------------------
    def lock_volume(self, conn: Connection, volume_id: str) -> int | None:
        """Take the tree's advisory lock until ``conn``'s transaction ends; return the
        tree's version (None: no such tree in the store)."""
        conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": volume_lock_key(volume_id)}
        )
        row = conn.execute(
            sa.select(volumes.c.version).where(volumes.c.id == volume_id)
        ).one_or_none()
        if row is None:
            return None
        return int(row.version or 0)

    def member_volumes(self, member: str) -> list[tuple[str, str, int]]:
        """(volume_id, peer_id, tree version) of each node of ``member``."""
        query = (
            sa.select(nodes.c.volume_id, nodes.c.peer_id, volumes.c.version)
            .join(volumes, volumes.c.id == nodes.c.volume_id)
            .where(nodes.c.member == member)
        )
        with self.engine.connect() as conn:
            return [(r.volume_id, r.peer_id, int(r.version or 0)) for r in conn.execute(query)]

    def touch_members(self, names: Iterable[str], conn: Connection | None = None) -> None:
        """Record a heartbeat of each host now (the database's clock)."""
        rows = [{"member": name} for name in names]
        if not rows:
            return
        if conn is not None:
            conn.execute(self._touch_member, rows)
            return
        with self.engine.begin() as own:
            own.execute(self._touch_member, rows)

    def volume_counts(self) -> list[tuple[str, int]]:
        """(volume_id, node count) of every tree, sorted."""
        query = (
            sa.select(volumes.c.id, sa.func.count(nodes.c.peer_id))
            .select_from(volumes.outerjoin(nodes, nodes.c.volume_id == volumes.c.id))
            .group_by(volumes.c.id)
            .order_by(volumes.c.id)
        )
        with self.engine.connect() as conn:
            return [(str(r[0]), int(r[1])) for r in conn.execute(query)]

    def expired_members(self, node_timeout: float) -> list[str]:
        """Hosts with nodes whose last heartbeat is older than ``node_timeout`` seconds.
        Hosts with nodes but no heartbeat row (placed before an upgrade, or whose row was
        removed) get one now: their timeout starts now."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO volt_members (member, last_seen) "
                    "SELECT DISTINCT member, now() FROM volt_nodes "
                    "ON CONFLICT (member) DO NOTHING"
                )
            )
            rows = conn.execute(
                sa.text(
                    "SELECT m.member FROM volt_members m WHERE m.last_seen < "
                    "now() - make_interval(secs => :timeout) ORDER BY m.member"
                ),
                {"timeout": node_timeout},
            )
            return [r.member for r in rows]

    def forget_member(self, member: str) -> None:
        """Drop the heartbeat row of a host that has no node left."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "DELETE FROM volt_members WHERE member = :m AND NOT EXISTS "
                    "(SELECT 1 FROM volt_nodes WHERE member = :m)"
                ),
                {"m": member},
            )

    def credit_members(self, seconds: float, *, floor: float | None = None) -> None:
        """Move every host's last heartbeat ``seconds`` later (never past now); with
        ``floor``: also at least to ``floor`` seconds ago."""
        query = (
            "UPDATE volt_members SET last_seen = LEAST(now(), "
            "last_seen + make_interval(secs => :seconds))"
        )
        params: dict[str, float] = {"seconds": seconds}
        if floor is not None:
            query = (
                "UPDATE volt_members SET last_seen = LEAST(now(), GREATEST("
                "last_seen + make_interval(secs => :seconds), "
                "now() - make_interval(secs => :floor)))"
            )
            params["floor"] = floor
        with self.engine.begin() as conn:
            conn.execute(sa.text(query), params)

    def member_ages(self) -> dict[str, float]:
        """Seconds since each host's last recorded heartbeat."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT member, EXTRACT(EPOCH FROM now() - last_seen) AS age FROM volt_members"
                )
            )
            return {r.member: max(0.0, float(r.age)) for r in rows}

    def all_member_nodes(self) -> dict[str, list[str]]:
        """Each host's peer ids, sorted."""
        query = sa.select(nodes.c.member, nodes.c.peer_id).order_by(nodes.c.peer_id)
        found: dict[str, list[str]] = {}
        with self.engine.connect() as conn:
            for row in conn.execute(query):
                found.setdefault(row.member, []).append(row.peer_id)
        return found

    def _prepare_statements(self) -> None:
        """Build the write statements once; rows come as execute() parameters."""
        self._upsert_volume = self._upsert(volumes, ["id"])
        self._upsert_node = self._upsert(nodes, ["volume_id", "peer_id"])
        self._touch_member = sa.text(
            "INSERT INTO volt_members (member, last_seen) VALUES (:member, now()) "
            "ON CONFLICT (member) DO UPDATE SET last_seen = excluded.last_seen"
        )
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


class EvictorLease:
    """The right to run the evictor on a shared store: a session advisory lock held on a
    connection of its own. It is freed when that connection ends, so when a volt-api dies
    (or its host: TCP keepalives) another one's next ``hold()`` gets it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.conn: Connection | None = None
        self.held = False

    def hold(self) -> bool:
        """Whether this process holds the lease now (taking it if it is free)."""
        try:
            if self.conn is None:
                self.conn = self.store.engine.connect().execution_options(
                    isolation_level="AUTOCOMMIT"
                )
            if self.held:
                self.conn.execute(sa.text("SELECT 1"))  # the session (and the lock) lives
                return True
            got = self.conn.execute(
                sa.text("SELECT pg_try_advisory_lock(:a, :b)"),
                {"a": EVICTOR_LOCK[0], "b": EVICTOR_LOCK[1]},
            ).scalar()
            self.held = bool(got)
            return self.held
        except sa.exc.SQLAlchemyError as exc:
            if self.held:
                LOG.warning("lost the evictor lease (store connection failed: %s)", exc)
            self.release()
            return False

    def release(self) -> None:
        held, self.held = self.held, False
        if self.conn is not None:
            if held:  # freed now: a closed session frees it only once its backend has ended
                with contextlib.suppress(sa.exc.SQLAlchemyError):
                    self.conn.execute(
                        sa.text("SELECT pg_advisory_unlock(:a, :b)"),
                        {"a": EVICTOR_LOCK[0], "b": EVICTOR_LOCK[1]},
                    )
            try:
                self.conn.invalidate()  # the session ends: the lock is freed
                self.conn.close()
            except sa.exc.SQLAlchemyError:
                pass
            self.conn = None
