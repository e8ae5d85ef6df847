"""Prometheus metrics of volt-api (served at GET /metrics)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class _NodesCollector(Collector):
    def __init__(self, counts: Callable[[], list[tuple[str, int]]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "volt_nodes", "Nodes in the tree of each image", labels=["volume_id"]
        )
        for volume_id, count in self._counts():
            family.add_metric([volume_id], count)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.placements = Counter(
            "volt_placements",
            "Query answers by result: placed (new node), existing (node already placed), "
            "not_placeable (retry signal of the btree executors)",
            ["executor", "result"],
            registry=self.registry,
        )
        self.removals = Counter(
            "volt_removals", "Nodes removed, by reason", ["reason"], registry=self.registry
        )
        self.evictions = Counter(
            "volt_evicted_hosts", "Hosts evicted for missing heartbeats", registry=self.registry
        )
        self.node_events = Counter(
            "volt_node_events",
            "Notifications received from the nodes on the control bus, by event type",
            ["event_type"],
            registry=self.registry,
        )
        self.requests = Counter(
            "volt_requests",
            "API requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "volt_request_duration_seconds",
            "API request latency",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.batch_writes = Histogram(
            "volt_store_batch_changes",
            "Tree changes written per store transaction (group commit)",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=self.registry,
        )

    def watch_trees(self, counts: Callable[[], list[tuple[str, int]]]) -> None:
        self.registry.register(_NodesCollector(counts))
