"""Where the VMs of a burst go: a pure function of the demands and the nodes' free room.

Rule: each VM goes to the node with room that has received the fewest VMs of this burst so
far, the one with the most free capacity first (vcpus, then memory, then the node id). A
burst therefore spreads round-robin over the nodes with room, most free first, which keeps
the image's tree shallow (one child per node). Placement is all or nothing: a burst that
does not fit is refused with the numbers, and nothing is placed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from volt.errors import VoltError


class InsufficientCapacity(VoltError):
    status = 409
    code = "volt.cluster.insufficient_capacity"
    title = "Conflict"


@dataclass(frozen=True)
class Demand:
    vcpus: int
    memory_mb: int


@dataclass(frozen=True)
class Room:
    """What a node has free now (its capacity minus what the controller placed on it)."""

    node_id: str
    vcpus: int
    memory_mb: int

    def fits(self, demand: Demand) -> bool:
        return self.vcpus >= demand.vcpus and self.memory_mb >= demand.memory_mb


def place(
    demands: Sequence[Demand], rooms: Iterable[Room], exclude: Iterable[str] = ()
) -> list[str]:
    """The node id of each demand, in order; ``InsufficientCapacity`` if any does not fit
    (the message gives what was asked and what is free)."""
    skip = set(exclude)
    before = {r.node_id: (r.vcpus, r.memory_mb) for r in rooms if r.node_id not in skip}
    free = {n: list(vm) for n, vm in before.items()}
    given = dict.fromkeys(free, 0)
    chosen = []
    for i, demand in enumerate(demands):
        fitting = [n for n, (v, m) in free.items() if v >= demand.vcpus and m >= demand.memory_mb]
        if not fitting:
            asked_v = sum(d.vcpus for d in demands)
            asked_m = sum(d.memory_mb for d in demands)
            rooms_text = ", ".join(f"{n}: {v} vcpus {m} MB" for n, (v, m) in sorted(before.items()))
            raise InsufficientCapacity(
                f"{len(demands)} VMs ({asked_v} vcpus, {asked_m} MB) do not fit: VM #{i} "
                f"({demand.vcpus} vcpus, {demand.memory_mb} MB) has no node with room; "
                f"free before this burst: {rooms_text or 'no nodes'}"
            )
        node = min(fitting, key=lambda n: (given[n], -free[n][0], -free[n][1], n))
        free[node][0] -= demand.vcpus
        free[node][1] -= demand.memory_mb
        given[node] += 1
        chosen.append(node)
    return chosen
