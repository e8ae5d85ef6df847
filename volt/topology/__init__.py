"""Placement of nodes in per-image trees (pure logic, no I/O).

Executors are plugins of the entry-point namespace ``volt.executor`` (the original's name).
"""

from volt.topology.base import Executor, load_executor
from volt.topology.tree import OK, PENDING, Node, Tree

__all__ = ["OK", "PENDING", "Executor", "Node", "Tree", "load_executor"]
