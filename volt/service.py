"""Volt's state: every image's tree, the hosts' liveness, and write-through to the store.

All methods are thread-safe (one lock; tree operations are microseconds and the store write
happens inside it so that the store always matches memory).

On a shared store (PostgreSQL), several volt-api processes serve the same trees (docs/ha.rst):
each tree change runs in one database transaction holding the tree's advisory lock, and the
cached tree is reloaded first when its version in the store is not the one this process last
saw. Hosts' last heartbeats are kept in the store (written at most every
``liveness_write_interval`` per host), and only the process holding the evictor lease evicts.

Group commit (a store of one volt-api: SQLite, MySQL): a change is made in memory under the
lock and its rows are queued in the open batch; the whole batch is written in ONE store
transaction, and no caller gets its answer before the batch holding what it saw is written.
A caller in a thread (the evictor, tests) writes the batch at once; volt-api's event loop
(``deferred_commit``/``committed``) lets every request that is ready run first, so a burst of
concurrent registrations costs one transaction per loop turn instead of one per request. If
the write fails, every tree it touched (and every one touched since) is reloaded from the
store and each of those callers gets StoreUnavailable: a failed request still changes nothing.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from volt.errors import (
    InvalidInput,
    NotPlaceable,
    PeerNotFound,
    StoreUnavailable,
    VolumeNotFound,
)
from volt.metrics import Metrics
from volt.store import Store, TreeWrite, VolumeRows, node_values
from volt.topology import OK, Executor, Node, Tree
from volt.traffic import ReadCounters
from volt.validation import make_peer_id, split_peer_id

LOG = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass(frozen=True)
class Placement:
    node: Node | None  # None: not placeable yet (btree executors), retry
    parents: list[Node]


class Batch:
    """Tree writes made since the last flush (group commit); written together."""

    def __init__(self) -> None:
        self.writes: list[TreeWrite] = []
        self.done = False
        self.error: str | None = None
        self.scheduled = False  # a flush is queued on the event loop
        self.waiters: list[asyncio.Future[None]] = []

    def check(self) -> None:
        if self.error is not None:
            raise StoreUnavailable(self.error)


@dataclass(frozen=True)
class MemberInfo:
    host: str
    seconds_since_heartbeat: float
    peer_ids: list[str]


class VoltService:
    def __init__(
        self,
        store: Store,
        executor: Executor,
        *,
        node_timeout: float,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        liveness_write_interval: float = 5.0,
        group_commit: bool = True,
    ) -> None:
        self.store = store
        self.shared = store.shared
        # Group commit (see the module's docstring); a shared store commits per change.
        self.batching = group_commit and not self.shared
        self._batch = Batch()
        self._flush_mutex = threading.Lock()  # one batch written at a time, in order
        self._deferred: contextvars.ContextVar[list[Batch] | None] = contextvars.ContextVar(
            "volt_deferred_commit", default=None
        )
        # Shared store: the version of each cached tree, the transaction of the change under
        # way, and when each host's heartbeat was last written to the store.
        self.versions: dict[str, int] = {}
        self._conn: Connection | None = None
        self.written: dict[str, float] = {}
        self.liveness_write_interval = min(liveness_write_interval, node_timeout / 4.0)
        self.executor = executor
        self.node_timeout = node_timeout
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.trees: dict[str, Tree] = {}
        self.members: dict[str, set[tuple[str, str]]] = {}  # host -> {(volume_id, peer_id)}
        self.last_seen: dict[str, float] = {}
        # host -> the port of its node daemon's own API, as its last heartbeat announced it
        # (``api_port``, an extension): only ever probed for liveness (volt/deathwatch.py).
        # In memory, this process's heartbeats only.
        self.api_ports: dict[str, int] = {}
        self.traffic = ReadCounters()  # the nodes' read counters (heartbeat ``bytes_read``)
        self.unloaded: set[str] = set()  # trees to reload once the store answers again
        # The control bus (volt.bus): called with {host: [{"peer_id", "parents"}, ...]} for
        # the nodes whose parents a leave, an eviction or a registration changed. None: no
        # bus, parent changes reach nodes with their heartbeats only.
        self.on_parents_changed: Callable[[dict[str, list[dict[str, object]]]], None] | None = None
        self.lock = threading.Lock()
        with self.lock:
            self._load()
            loaded = self._batch
        if self.batching:
            self._flush(loaded)
            loaded.check()
        self.metrics.watch_trees(self.volume_counts)

    # -- API operations ------------------------------------------------------------------
    def query(self, volume_id: str, member: str) -> Placement:
        """Place ``member`` in the tree of ``volume_id`` (idempotent) and return its parents."""
        with self._locked(), self._tree_change(volume_id):
            tree, node = self._place(volume_id, member)
            if node is None:
                return Placement(None, [])
            return Placement(node, self.executor.parents(tree, node))

    def register(
        self,
        volume_id: str,
        peer_id: str,
        host: str,
        port: str,
        iqn: str,
        lun: str,
        *,
        nbd_port: str | None = None,
        place: bool = False,
    ) -> Placement:
        """The node's relay target is ready: it becomes a parent candidate (status OK).
        Returns the node and its parents now: registering can change them (the balanced
        executor lifts a registered node above its pending ancestors), and a node that reads
        them from this answer needs no heartbeat round trip to follow its tree parent.
        ``place``: a peer not in the tree yet is placed first, in the same change (one
        request per node instead of a query and a registration: half Volt's load in a
        burst); NotPlaceable when the executor cannot place it yet."""
        with self._locked(), self._tree_change(volume_id):
            placed = None
            if place:
                member, _ = split_peer_id(peer_id)
                _, placed = self._place(volume_id, member, quiet=True)
                if placed is None:
                    raise NotPlaceable(volume_id, peer_id)
            tree, node = self._find(volume_id, peer_id)
            wanted = (host, port, iqn, lun, nbd_port, OK)
            changed = (node.host, node.port, node.iqn, node.lun, node.nbd_port, node.status)
            if changed != wanted:
                # balanced: only a subtree can change; the btree executors' parents
                # (leftmost chains, uncles) may change anywhere: the whole tree.
                scope = _register_scope(node) if self.executor.name == "balanced" else None
                before = self._parents_view(tree, scope)
                node.host, node.port, node.iqn, node.lun = host, port, iqn, lun
                node.nbd_port = nbd_port
                became_ready = not node.ready
                tree.set_status(node, OK)
                tree.mark(node)
                if became_ready:
                    self.executor.registered(tree, node)
                self._commit(tree)
                self._push_changes(tree, before)
                # One line per request of a burst: a placing registration says both.
                where = _placed_where(placed) if placed is not None else ""
                LOG.info(
                    "registered %s in %s%s: %s:%s %s lun %s",
                    peer_id,
                    volume_id,
                    where,
                    host,
                    port,
                    iqn,
                    lun,
                )
            return Placement(node, self.executor.parents(tree, node))

    def leave(self, volume_id: str, peer_id: str) -> None:
        with self._locked(), self._tree_change(volume_id):
            tree, node = self._find(volume_id, peer_id)
            before = self._parents_view(tree)
            self._remove(tree, node, reason="leave")
            self._commit(tree)
            self._push_changes(tree, before)
            self._drop_if_empty(tree)

    def delete_volume(self, volume_id: str) -> int:
        """Forget a whole tree; returns how many nodes it had."""
        with self._locked(), self._tree_change(volume_id):
            tree = self.trees.get(volume_id)
            if tree is None:
                raise VolumeNotFound(volume_id)
            try:
                if self.batching:
                    self._batch.writes.append(TreeWrite(volume_id, delete=True))
                else:
                    self.store.delete_volume(volume_id, self._conn)
            except sa.exc.SQLAlchemyError as exc:
                raise StoreUnavailable(f"store write failed: {exc.__class__.__name__}") from exc
            self._forget_tree(tree)
            self.versions.pop(volume_id, None)
            self.metrics.removals.labels("volume_deleted").inc(len(tree))
            LOG.info("deleted the tree of %s (%d nodes)", volume_id, len(tree))
            return len(tree)

    def heartbeat(self, member: str, api_port: int | None = None) -> list[tuple[Node, list[Node]]]:
        """Refresh ``member``'s clock; return the parents of each of its nodes.
        ``api_port``: the port of the host's node daemon, kept for a host with nodes (None
        leaves the one kept alone)."""
        if self.shared:
            return self._shared_heartbeat(member, api_port)
        with self._locked():
            entries = self.members.get(member)
            if not entries:
                return []
            self.last_seen[member] = self.clock()
            if api_port is not None:
                self.api_ports[member] = api_port
            answer = []
            for volume_id, peer_id in sorted(entries):
                tree = self.trees[volume_id]
                node = tree.nodes[peer_id]
                answer.append((node, self.executor.parents(tree, node)))
            return answer

    def evict_expired(self) -> list[str]:
        """Remove every node of each host silent for ``node_timeout``; returns those hosts.
        On a shared store only the holder of the evictor lease may call this."""
        if self.shared:
            return self._shared_evict_expired()
        with self._locked():
            deadline = self.clock() - self.node_timeout
            expired = [m for m, seen in self.last_seen.items() if seen < deadline]
            for member in expired:
                self._evict(member, f"no heartbeat for {self.node_timeout}s")
            return expired

    def dead_parent_target(
        self, volume_id: str, reporter: str, parent: str
    ) -> tuple[str, str, int] | None:
        """Where to check that ``parent`` still serves ``reporter`` (a child's report,
        volt/deathwatch.py): (parent's host as Volt's member, host, the port the child
        reads from: NBD if it has one, else iSCSI). None if ``parent`` left the tree
        already (an earlier report or the evictor removed it: nothing to do). Raises
        PeerNotFound for a reporter not in the tree, InvalidInput for a parent that is
        not one of the reporter's."""
        with self._locked(), self._tree_change(volume_id):
            tree, child = self._find(volume_id, reporter)
            node = tree.nodes.get(parent)
            if node is None:
                return None
            if node not in self.executor.parents(tree, child):
                raise InvalidInput("parent", f"{parent!r} is not a parent of {reporter!r}")
            port = node.nbd_port or node.port
            if node.member is None or node.host is None or port is None:
                raise InvalidInput("parent", f"{parent!r} serves no target yet")
            return node.member, node.host, int(port)

    def api_port(self, member: str) -> int | None:
        """The port ``member``'s node daemon announced in its heartbeats, if any: for a
        liveness probe only (volt/deathwatch.py)."""
        with self.lock:
            return self.api_ports.get(member)

    def evict_member(self, member: str, why: str) -> bool:
        """Remove every node of ``member`` from its trees now, exactly as the evictor does
        (``why`` goes in the log); False if Volt knows no node of it (already evicted:
        reports of the same death are idempotent)."""
        if self.shared:
            return self._shared_evict(member, why)
        with self._locked():
            if member not in self.members:
                return False
            self._evict(member, why)
            return True

    def credit(self, seconds: float) -> None:
        """Move every host's last heartbeat ``seconds`` later (never past now): volt-api
        could not serve for that long, so nobody's silence during it counts."""
        if self.shared:
            self._store_call(self.store.credit_members, seconds)
            return
        with self.lock:
            now = self.clock()
            for member, seen in self.last_seen.items():
                self.last_seen[member] = min(now, seen + seconds)

    # -- views -----------------------------------------------------------------------------
    def credit_takeover(self, grace: float) -> None:
        """This process just became the evictor (shared store): no host is evicted in the
        next ``grace`` seconds, whose heartbeats may have gone to a master that died."""
        self._store_call(self.store.credit_members, 0.0, floor=max(0.0, self.node_timeout - grace))

    def volume_counts(self) -> list[tuple[str, int]]:
        if self.shared:
            return self._store_call(self.store.volume_counts)
        with self._locked():
            return [(vid, len(tree)) for vid, tree in sorted(self.trees.items())]

    def volume_nodes(self, volume_id: str) -> list[tuple[Node, list[Node]]]:
        """Breadth-first: each node with the parents it would be sent now."""
        with self._locked(), self._tree_change(volume_id):
            tree = self.trees.get(volume_id)
            if tree is None:
                raise VolumeNotFound(volume_id)
            return [
                (node, self.executor.parents(tree, node)) for node in tree.bfs() if not node.is_root
            ]

    def member_list(self) -> list[MemberInfo]:
        if self.shared:
            nodes = self._store_call(self.store.all_member_nodes)
            ages = self._store_call(self.store.member_ages)
            return [
                MemberInfo(host, ages.get(host, 0.0), peer_ids)
                for host, peer_ids in sorted(nodes.items())
            ]
        with self._locked():
            now = self.clock()
            return [
                MemberInfo(host, now - self.last_seen.get(host, now), sorted(p for _, p in nodes))
                for host, nodes in sorted(self.members.items())
            ]

    # -- group commit ----------------------------------------------------------------------
    @contextmanager
    def deferred_commit(self) -> Iterator[list[Batch]]:
        """Operations called inside this block (on this thread or task) do not wait for
        their batch to be written: they add it to the list yielded, for ``committed``."""
        batches: list[Batch] = []
        token = self._deferred.set(batches)
        try:
            yield batches
        finally:
            self._deferred.reset(token)

    async def committed(self, batches: list[Batch]) -> None:
        """Wait (in the event loop) until ``batches`` are written; StoreUnavailable if one
        failed. The first waiter of a batch queues its flush behind every callback ready
        now: the requests already received join the batch first."""
        loop = asyncio.get_running_loop()
        for batch in batches:
            if not batch.done:
                waiter: asyncio.Future[None] = loop.create_future()
                batch.waiters.append(waiter)
                if not batch.scheduled:
                    batch.scheduled = True
                    loop.call_soon(self._flush_and_wake, batch)
                await waiter
            batch.check()

    def _flush_and_wake(self, batch: Batch) -> None:
        try:
            self._flush(batch)
        finally:
            for waiter in batch.waiters:
                if not waiter.done():
                    waiter.set_result(None)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The service's lock around one operation; then (group commit) the operation's
        answer waits until the batch holding what it saw is written."""
        with self.lock:
            yield
            batch = self._batch
        if not self.batching:
            return
        if not batch.writes and not self._flush_mutex.locked():
            batch.check()  # nothing unwritten was seen (a failed write marked the batch)
            return
        deferred = self._deferred.get()
        if deferred is not None:
            deferred.append(batch)
            return
        self._flush(batch)
        batch.check()

    def _flush(self, batch: Batch) -> None:
        """Write the open batch (``batch`` or, if it is done already, nothing)."""
        with self._flush_mutex:
            if batch.done:
                return
            with self.lock:
                flushing = self._batch  # ``batch``: a batch not done is the open one
                self._batch = Batch()
            error = None
            if flushing.writes:
                try:
                    self.store.write_batch(flushing.writes)
                except Exception as exc:  # every failure fails the whole batch
                    LOG.error("store write of %d change(s) failed: %s", len(flushing.writes), exc)
                    error = f"store write failed: {exc.__class__.__name__}"
                    with self.lock:
                        # Changes made since were built on the failed ones: they fail too.
                        following = self._batch
                        self._batch = Batch()
                        touched = {w.volume_id for w in flushing.writes + following.writes}
                        self._reload(touched)
                        following.error, following.done = error, True
                self.metrics.batch_writes.observe(len(flushing.writes))
            flushing.error, flushing.done = error, True

    def _reload(self, volume_ids: set[str]) -> None:
        """Memory goes back to what the store holds for these trees (now, or once the
        store answers again)."""
        for volume_id in volume_ids:
            tree = self.trees.get(volume_id)
            if tree is not None:
                self._forget_tree(tree)
            self.unloaded.add(volume_id)
        self._retry_unloaded()

    # -- internals -------------------------------------------------------------------------
    def _place(
        self, volume_id: str, member: str, *, quiet: bool = False
    ) -> tuple[Tree, Node | None]:
        """Place ``member`` in the tree of ``volume_id`` unless it is there (under the lock
        and a tree change); the node is None when the executor cannot place it yet.
        ``quiet``: the caller logs the placement (a placing registration's one line)."""
        peer_id = make_peer_id(member, volume_id)
        tree = self.trees.get(volume_id)
        created = tree is None
        if tree is None:
            tree = Tree(volume_id, self.executor.fanout(), self.executor.image_server_fanout())
        node = tree.nodes.get(peer_id)
        if node is not None:
            self._seen(member)
            self._count_placement("existing")
            return tree, node
        node = self.executor.join(tree, peer_id, member)
        if node is None:
            self._count_placement("not_placeable")
            return tree, None
        self.trees[volume_id] = tree
        self._commit(tree, create=created)
        self.members.setdefault(member, set()).add((volume_id, peer_id))
        self._seen(member, force=True)
        self._count_placement("placed")
        if not quiet:
            LOG.info("placed %s in %s%s", peer_id, volume_id, _placed_where(node))
        return tree, node

    def _find(self, volume_id: str, peer_id: str) -> tuple[Tree, Node]:
        self._ensure_loaded(volume_id)
        tree = self.trees.get(volume_id)
        if tree is None:
            raise VolumeNotFound(volume_id)
        node = tree.nodes.get(peer_id)
        if node is None:
            raise PeerNotFound(volume_id, peer_id)
        return tree, node

    def _remove(self, tree: Tree, node: Node, *, reason: str) -> None:
        assert node.peer_id is not None
        self.executor.remove(tree, node)
        self._forget_member_node(node, tree.volume_id)
        self.metrics.removals.labels(reason).inc()
        LOG.info("removed %s from %s (%s)", node.peer_id, tree.volume_id, reason)

    def _forget_member_node(self, node: Node, volume_id: str) -> None:
        assert node.member is not None and node.peer_id is not None
        entries = self.members.get(node.member)
        if entries is not None:
            entries.discard((volume_id, node.peer_id))
            if not entries:
                del self.members[node.member]
                self.last_seen.pop(node.member, None)
                self.api_ports.pop(node.member, None)

    def _evict(self, member: str, why: str) -> None:
        entries = sorted(self.members.get(member, ()))
        LOG.warning(
            "evicting host %s: %s; its %d node(s) leave their trees", member, why, len(entries)
        )
        touched: dict[str, Tree] = {}
        views: dict[str, dict[str, tuple[str | None, list[dict[str, str | None]]]]] = {}
        for volume_id, peer_id in entries:
            tree = self.trees[volume_id]
            if volume_id not in views:
                views[volume_id] = self._parents_view(tree)
            self._remove(tree, tree.nodes[peer_id], reason="evicted")
            touched[volume_id] = tree
        self.members.pop(member, None)
        self.last_seen.pop(member, None)
        self.api_ports.pop(member, None)
        self.traffic.forget(member)
        self.metrics.evictions.inc()
        for tree in touched.values():
            try:
                self._commit(tree)
            except StoreUnavailable:
                continue  # the tree is reloaded from the store once it answers again
            self._push_changes(tree, views[tree.volume_id])
            self._drop_if_empty(tree)

    # -- parent changes for the bus ------------------------------------------------------------
    def _parents_view(
        self, tree: Tree, start: Node | None = None
    ) -> dict[str, tuple[str | None, list[dict[str, str | None]]]]:
        """{peer_id: (member, parents' identities)} of the nodes under ``start`` (whole
        tree: None); empty without a bus (nothing to compare)."""
        if self.on_parents_changed is None:
            return {}
        return {
            node.peer_id: (node.member, [p.identity() for p in self.executor.parents(tree, node)])
            for node in tree.bfs(start)
            if node.peer_id is not None
        }

    def _push_changes(
        self, tree: Tree, before: dict[str, tuple[str | None, list[dict[str, str | None]]]]
    ) -> None:
        """Hand the bus the nodes of ``before`` still in the tree whose parents differ now,
        grouped by host. Never raises: the bus is an optimisation of the heartbeat."""
        push = self.on_parents_changed
        if push is None or not before:
            return
        changes: dict[str, list[dict[str, object]]] = {}
        try:
            for peer_id, (member, parents) in before.items():
                node = tree.nodes.get(peer_id)
                if node is None or node.member is None:
                    continue
                now = [p.identity() for p in self.executor.parents(tree, node)]
                if now != parents or node.member != member:
                    changes.setdefault(node.member, []).append({"peer_id": peer_id, "parents": now})
            if changes:
                push(changes)
        except Exception:
            LOG.exception("could not hand parent changes of %s to the bus", tree.volume_id)

    def _count_placement(self, result: str) -> None:
        self.metrics.placements.labels(self.executor.name, result).inc()

    def _commit(self, tree: Tree, *, create: bool = False) -> None:
        """Write the tree's changes. If that fails, memory goes back to what the store holds
        (the tree is reloaded now, or as soon as the store answers again) and the caller gets
        StoreUnavailable: a failed request changes nothing."""
        changed, removed = tree.take_changes()
        if not (changed or removed or create):
            return
        if self.batching:  # written with its batch (_flush); rows taken now, under the lock
            rows = [node_values(tree.volume_id, node) for node in changed]
            write = TreeWrite(
                tree.volume_id, tree.fanout, rows, list(removed), create=create,
                root_fanout=tree.root_fanout,
            )  # fmt: skip
            self._batch.writes.append(write)
            return
        version = None
        if self.shared:
            # A new tree starts from a random version: a process that cached an earlier
            # tree of the same volume (since deleted) never mistakes it for this one.
            base = secrets.randbits(62) if create else self.versions.get(tree.volume_id, 0)
            version = base + 1
        try:
            self.store.save(
                tree.volume_id,
                tree.fanout,
                changed,
                removed,
                create=create,
                version=version,
                root_fanout=tree.root_fanout,
                conn=self._conn,
            )
        except sa.exc.SQLAlchemyError as exc:
            LOG.error("store write for %s failed: %s", tree.volume_id, exc)
            self._forget_tree(tree)
            if self.shared:  # the next change reloads the tree under its lock
                self.versions.pop(tree.volume_id, None)
                raise StoreUnavailable(f"store write failed: {exc.__class__.__name__}") from exc
            self.unloaded.add(tree.volume_id)
            self._retry_unloaded()
            raise StoreUnavailable(f"store write failed: {exc.__class__.__name__}") from exc
        if version is not None:
            self.versions[tree.volume_id] = version

    def _forget_tree(self, tree: Tree) -> None:
        self.trees.pop(tree.volume_id, None)
        for node in tree.nodes.values():
            self._forget_member_node(node, tree.volume_id)

    def _drop_if_empty(self, tree: Tree) -> None:
        """A tree whose last node left is forgotten (the next query starts a new one)."""
        if tree.nodes or self.trees.get(tree.volume_id) is not tree:
            return
        try:
            if self.batching:
                self._batch.writes.append(TreeWrite(tree.volume_id, delete=True))
            else:
                self.store.delete_volume(tree.volume_id, self._conn)
        except sa.exc.SQLAlchemyError as exc:
            LOG.warning("could not drop the empty tree of %s: %s", tree.volume_id, exc)
            if self.shared:
                raise StoreUnavailable(f"store write failed: {exc.__class__.__name__}") from exc
            return
        del self.trees[tree.volume_id]
        self.versions.pop(tree.volume_id, None)
        LOG.info("the tree of %s is empty and was dropped", tree.volume_id)

    def _ensure_loaded(self, volume_id: str) -> None:
        if volume_id in self.unloaded and not self._retry_unloaded(volume_id):
            raise StoreUnavailable(f"the tree of {volume_id!r} waits for the store to answer")

    def retry_unloaded(self) -> None:
        """Reload trees dropped after a failed write (called by the eviction loop)."""
        with self.lock:
            self._retry_unloaded()

    def _retry_unloaded(self, volume_id: str | None = None) -> bool:
        wanted = [volume_id] if volume_id else sorted(self.unloaded)
        try:
            found = {rows.volume_id: rows for rows in self.store.load(wanted)}
        except sa.exc.SQLAlchemyError as exc:
            LOG.warning("store still unavailable for %s: %s", ", ".join(wanted), exc)
            return False
        now = self.clock()
        for vid in wanted:
            self.unloaded.discard(vid)
            if vid in found:
                self._adopt(self._build_tree(found[vid]), now, keep_clocks=True)
        return True

    def _load(self) -> None:
        now = self.clock()
        for rows in self.store.load():
            if self.shared:
                self.versions[rows.volume_id] = rows.version or 0
            self._adopt(self._build_tree(rows), now, keep_clocks=False)
        total = sum(len(t) for t in self.trees.values())
        LOG.info("loaded %d tree(s) with %d node(s) from the store", len(self.trees), total)

    def _adopt(self, tree: Tree, now: float, *, keep_clocks: bool) -> None:
        self.trees[tree.volume_id] = tree
        for node in tree.nodes.values():
            assert node.member is not None and node.peer_id is not None
            self.members.setdefault(node.member, set()).add((tree.volume_id, node.peer_id))
            if not keep_clocks or node.member not in self.last_seen:
                self.last_seen[node.member] = now

    def _build_tree(self, rows: VolumeRows) -> Tree:
        tree = Tree(rows.volume_id, rows.fanout, rows.root_fanout)
        children: dict[str | None, list[tuple[int, Node]]] = {}
        for row in rows.nodes:
            node = tree.new_node(row.peer_id, row.member, seq=row.seq)
            node.host, node.port, node.iqn, node.lun = row.host, row.port, row.iqn, row.lun
            node.nbd_port = row.nbd_port
            node.status = row.status
            children.setdefault(row.parent_peer_id, []).append((row.slot, node))
        stack: list[Node] = [tree.root]
        while stack:
            parent = stack.pop()
            for slot, node in sorted(children.pop(parent.peer_id, []), key=lambda c: c[0]):
                tree.attach(node, parent, slot)
                stack.append(node)
        orphans = [node for group in children.values() for _, node in group]
        tree.take_changes()
        for node in orphans:  # rows whose parent row is missing: place them again
            LOG.warning("re-placing orphan %s of %s", node.peer_id, rows.volume_id)
            assert node.peer_id is not None
            tree.nodes.pop(node.peer_id)
            placed = self.executor.join(tree, node.peer_id, node.member or "")
            if placed is not None:
                placed.host, placed.port, placed.iqn, placed.lun = (
                    node.host,
                    node.port,
                    node.iqn,
                    node.lun,
                )
                placed.nbd_port = node.nbd_port
                placed.status = node.status
            else:
                tree.removed.add(node.peer_id)
        if orphans:
            self._commit(tree)
        return tree

    # -- shared store ----------------------------------------------------------------------
    @contextmanager
    def _tree_change(self, volume_id: str) -> Iterator[None]:
        """Around every use of one tree (the caller holds ``self.lock``). Shared store: one
        transaction holding the tree's advisory lock, the cached tree reloaded first if
        another process changed it; every write of the block commits with it."""
        if not self.shared:
            self._ensure_loaded(volume_id)
            yield
            return
        try:
            with self.store.engine.begin() as conn:
                self._conn = conn
                try:
                    version = self.store.lock_volume(conn, volume_id)
                    self._sync(volume_id, version, conn)
                    yield
                finally:
                    self._conn = None
        except (VolumeNotFound, PeerNotFound):
            raise  # found before anything changed
        except sa.exc.SQLAlchemyError as exc:
            LOG.error("store transaction on %s failed: %s", volume_id, exc)
            self._drop_cached(volume_id)
            raise StoreUnavailable(f"store transaction failed: {exc.__class__.__name__}") from exc
        except BaseException:
            # The transaction did not commit: the cached tree may hold what it rolled back.
            self._drop_cached(volume_id)
            raise

    def _drop_cached(self, volume_id: str) -> None:
        """Forget this process's copy of a tree: the next change reloads it."""
        cached = self.trees.get(volume_id)
        if cached is not None:
            self._forget_tree(cached)
        self.versions.pop(volume_id, None)

    def _sync(self, volume_id: str, version: int | None, conn: Connection) -> None:
        """Make the cached tree of ``volume_id`` the store's (``version``: the store's)."""
        cached = self.trees.get(volume_id)
        if cached is not None and version is not None and self.versions.get(volume_id) == version:
            return
        if cached is not None:
            self._forget_tree(cached)
        self.versions.pop(volume_id, None)
        if version is None:
            return
        for rows in self.store.load([volume_id], conn):
            self.versions[volume_id] = rows.version or 0
            self._adopt(self._build_tree(rows), self.clock(), keep_clocks=True)

    def _seen(self, member: str, *, force: bool = False) -> None:
        """``member`` was heard from. Shared store: written there (in the change's
        transaction if one is under way) when ``force`` or not in the last
        ``liveness_write_interval``."""
        now = self.clock()
        self.last_seen[member] = now
        if not self.shared:
            return
        if not force and now - self.written.get(member, -math.inf) < self.liveness_write_interval:
            return
        try:
            self.store.touch_members([member], self._conn)
        except sa.exc.SQLAlchemyError as exc:
            raise StoreUnavailable(f"store write failed: {exc.__class__.__name__}") from exc
        self.written[member] = now

    def _store_call(self, call: Callable[..., _T], *args: object, **kwargs: object) -> _T:
        try:
            return call(*args, **kwargs)
        except sa.exc.SQLAlchemyError as exc:
            raise StoreUnavailable(f"store unavailable: {exc.__class__.__name__}") from exc

    def _shared_heartbeat(
        self, member: str, api_port: int | None = None
    ) -> list[tuple[Node, list[Node]]]:
        entries = self._store_call(self.store.member_volumes, member)
        if not entries:
            return []
        with self.lock:
            self._seen(member)
            if api_port is not None:
                self.api_ports[member] = api_port
            for volume_id in sorted({vid for vid, _, version in entries}):
                known = self.versions.get(volume_id)
                stale = {v for vid, _, v in entries if vid == volume_id} != {known}
                if stale or volume_id not in self.trees:
                    with self._tree_change(volume_id):
                        pass
            answer = []
            for volume_id, peer_id, _ in sorted(entries):
                tree = self.trees.get(volume_id)
                node = tree.nodes.get(peer_id) if tree is not None else None
                if tree is None or node is None:
                    continue  # left or evicted since the store was read
                answer.append((node, self.executor.parents(tree, node)))
            return answer

    def _shared_evict_expired(self) -> list[str]:
        expired = self._store_call(self.store.expired_members, float(self.node_timeout))
        for member in expired:
            self._shared_evict(member, f"no heartbeat for {self.node_timeout}s")
        return expired

    def _shared_evict(self, member: str, why: str) -> bool:
        entries = self._store_call(self.store.member_volumes, member)
        if entries:
            LOG.warning(
                "evicting host %s: %s; its %d node(s) leave their trees", member, why, len(entries)
            )
        for volume_id, peer_id, _ in sorted(entries):
            with self._locked(), self._tree_change(volume_id):
                tree = self.trees.get(volume_id)
                node = tree.nodes.get(peer_id) if tree is not None else None
                if tree is None or node is None:
                    continue
                before = self._parents_view(tree)
                self._remove(tree, node, reason="evicted")
                self._commit(tree)
                self._push_changes(tree, before)
                self._drop_if_empty(tree)
        self._store_call(self.store.forget_member, member)
        with self.lock:
            self.written.pop(member, None)
            self.api_ports.pop(member, None)
        self.traffic.forget(member)
        self.metrics.evictions.inc()
        return bool(entries)


def _placed_where(node: Node) -> str:
    """Where a placement put ``node``, for the log (its parent may have moved since)."""
    parent = node.parent.peer_id if node.parent else None
    return f" at depth {node.depth} under {parent}"


def _register_scope(node: Node) -> Node | None:
    """The top of the part of the tree whose parents a registration of ``node`` may change
    (None: the whole tree). A ready node moves up past its pending ancestors (balanced) and
    becomes a standby parent of its siblings' subtrees: the subtree of the grandparent of
    the highest place it can reach covers them."""
    top = node
    while top.parent is not None and not top.parent.is_root and not top.parent.ready:
        top = top.parent
    scope = top.parent
    if scope is not None and scope.parent is not None:
        scope = scope.parent
    return None if scope is None or scope.is_root else scope
