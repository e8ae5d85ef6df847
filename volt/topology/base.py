"""The executor interface: how a tree grows, shrinks, and whom each node reads from."""

from __future__ import annotations

import abc
from typing import Any

from stevedore import driver

from volt.topology.tree import Node, Tree

NAMESPACE = "volt.executor"


class Executor(abc.ABC):
    """Placement policy. All methods run under the caller's lock and only touch ``tree``."""

    name: str

    @abc.abstractmethod
    def fanout(self) -> int:
        """Children per node for trees created by this executor."""

    def image_server_fanout(self) -> int:
        """Children of the image server (the tree's root) for trees created by this
        executor."""
        return self.fanout()

    @abc.abstractmethod
    def join(self, tree: Tree, peer_id: str, member: str) -> Node | None:
        """Place a new node; None when it cannot be placed yet (the caller retries)."""

    @abc.abstractmethod
    def remove(self, tree: Tree, node: Node) -> None:
        """Take ``node`` out of the tree and re-parent its children. Always terminates."""

    def registered(self, tree: Tree, node: Node) -> None:  # noqa: B027 - optional hook
        """``node`` just became ready (its relay target is registered)."""

    @abc.abstractmethod
    def parents(self, tree: Tree, node: Node) -> list[Node]:
        """Ordered parents to send to ``node``: the first carries the reads, the others are
        standby paths. An empty list means "read from the image server"."""

    def nearest_ready_ancestor(self, tree: Tree, node: Node) -> Node | None:
        """The closest ready ancestor of ``node`` below the root (None = the image server)."""
        for ancestor in tree.ancestors(node):
            if ancestor.ready:
                return ancestor
        return None


def load_executor(name: str, **options: Any) -> Executor:
    """Instantiate the executor registered under ``name`` in ``volt.executor``."""
    manager: driver.DriverManager[Executor] = driver.DriverManager(
        NAMESPACE, name, invoke_on_load=True, invoke_kwds=options
    )
    executor = manager.driver
    if not isinstance(executor, Executor):
        raise TypeError(f"executor plugin {name!r} is not an Executor: {executor!r}")
    return executor
