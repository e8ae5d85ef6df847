"""Configuration options of volt-api (oslo.config).

Option names kept from the original Volt: ``bind_host``, ``bind_port``, ``default_executor``.
"""

from oslo_config import cfg

from brick import bus

CONF = cfg.CONF

default_opts: list[cfg.Opt] = [
    cfg.HostAddressOpt(
        "bind_host",
        default="127.0.0.1",
        help="Address volt-api listens on. The default serves this machine only: set the "
        "master's own address on the cluster network (0.0.0.0 or :: listen on every "
        "interface, only when written explicitly).",
    ),
    cfg.PortOpt("bind_port", default=7447, help="TCP port volt-api listens on."),
    cfg.IntOpt(
        "max_connections",
        default=16384,
        min=64,
        max=1048576,
        help="Client connections volt-api serves at once (Granian's backpressure). Every "
        "compute node keeps one open (its heartbeat comes before the 30 s idle timeout), so "
        "set it above the number of compute nodes plus other clients: a connection past it "
        "waits unanswered in the listen backlog. volt-api raises its soft open-file limit "
        "to fit (this + 256); a lower hard limit lowers it, with a warning.",
    ),
    cfg.StrOpt(
        "default_executor",
        default="balanced",
        help="Placement executor (entry point of namespace 'volt.executor'): 'balanced' "
        "(k-ary, several parents per node, immediate placement, rebalancing removal), "
        "'btree' (the original binary tree: one parent, pending nodes take no children) or "
        "'btreewithuncle' (btree plus the parent's sibling as a second parent).",
    ),
    cfg.StrOpt(
        "auth_strategy",
        default="token",
        choices=[
            ("token", "clients send [auth] token in the X-Auth-Token header"),
            ("noauth", "no authentication (only for closed test networks)"),
        ],
        help="How requests to /v1 (and /metrics) are authenticated. 'token': the admin "
        "token of [auth] token, or a node token derived from [auth] node_secret; 'noauth': "
        "anyone may do anything, and a node's host is whatever the body or the source "
        "address says (the original protocol).",
    ),
    cfg.BoolOpt(
        "metrics_public",
        default=False,
        help="Serve GET /metrics without a credential. By default it needs the admin or a "
        "node token (auth_strategy = token), since it names every image.",
    ),
    cfg.FloatOpt(
        "request_body_timeout",
        default=5.0,
        min=0.5,
        max=60.0,
        help="Seconds a client has to send the whole request body once its headers are in; "
        "a slower one gets 408 and its connection is closed. Bodies are read by the event "
        "loop (no thread waits for them), only after authentication, and only on the three "
        "operations that take one (query, register, heartbeat).",
    ),
    cfg.IntOpt(
        "node_timeout",
        default=60,
        min=2,
        max=86400,
        help="Seconds without a heartbeat (or query) after which all nodes of a host are "
        "evicted and their children re-parented. Must exceed the nodes' heartbeat_interval; "
        "after a restart of volt-api every host gets a full node_timeout again.",
    ),
    cfg.FloatOpt(
        "dead_parent_repair_grace",
        default=10.0,
        min=0.0,
        max=600.0,
        help="Seconds a reported parent is given to repair itself: when a child reports "
        "that its parent stopped serving it and the parent's data port refuses Volt's "
        "connection too, but the parent's node daemon still accepts on the port its "
        "heartbeats announce (api_port), its supervisor is restarting the data daemon. "
        "The parent stays in its trees and its data port is checked again after this "
        "long: evicted then if it still refuses. A parent whose node daemon does not "
        "accept, or that announced no port, is evicted at once (docs/bus.rst). 0: check "
        "again at once.",
    ),
    cfg.IntOpt(
        "api_threads",
        default=4,
        min=1,
        max=256,
        deprecated_for_removal=True,
        deprecated_reason="volt-api runs its handlers on Granian's event loop (RSGI): they "
        "are serialised on the trees' lock, and a thread pool only cost throughput.",
        help="Ignored.",
    ),
    cfg.StrOpt(
        "pid_file",
        help="Write the PID of volt-api here while it runs (removed on clean shutdown).",
    ),
]

balanced_opts: list[cfg.Opt] = [
    cfg.IntOpt(
        "fanout",
        default=2,
        min=2,
        max=64,
        help="Children per node, the image server included (tree parent role). New trees "
        "only: a tree keeps the fan-out it was created with.",
    ),
    cfg.IntOpt(
        "image_server_fanout",
        min=1,
        max=64,
        help="Children of the image server (the tree's top level), when they should differ "
        "from fanout (default: fanout). The image server sends each block once per top-level "
        "node: on a thin image-server link 1 boots a burst faster and halves its egress "
        "(docs/benchmarks.rst). New trees only.",
    ),
    cfg.IntOpt(
        "parents_per_node",
        default=2,
        min=1,
        max=8,
        help="Parents given to each node below the top level: the tree parent, which carries "
        "the reads, then standby paths for failover (the parent's siblings, then its "
        "ancestors). Only ready nodes are standby parents.",
    ),
]

auth_opts: list[cfg.Opt] = [
    cfg.StrOpt(
        "token",
        secret=True,
        help="The admin credential, sent in X-Auth-Token (auth_strategy = token): every "
        "operation, including the admin-only ones (deleting a tree, listing a tree's or all "
        "members). Required with that strategy: volt-api refuses to start without it.",
    ),
    cfg.StrOpt(
        "node_secret",
        secret=True,
        help="Cluster secret from which each node's own token is derived: "
        "node:<host>:<hex HMAC-SHA256(node_secret, host)> (issue one with `volt-manage "
        "node-token <host>`). A node token may only query, register, leave and heartbeat "
        "for peer ids of its own host. Unset: only the admin token is accepted. Must differ "
        "from token; changing it invalidates every node token.",
    ),
]

ssl_opts: list[cfg.Opt] = [
    cfg.StrOpt(
        "cert_file",
        help="PEM certificate (chain) volt-api serves HTTPS with. Set together with "
        "key_file; unset: plain HTTP. Clients then need https:// URLs and the CA.",
    ),
    cfg.StrOpt("key_file", help="PEM private key of cert_file (unencrypted)."),
]

database_opts: list[cfg.Opt] = [
    cfg.StrOpt(
        "connection",
        default="sqlite:////var/lib/volt/volt.sqlite",
        secret=True,
        help="SQLAlchemy URL of the store that keeps all trees, e.g. "
        "sqlite:////var/lib/volt/volt.sqlite, postgresql+psycopg://volt:PW@db/volt, "
        "mysql+pymysql://volt:PW@db/volt. Several volt-api processes may share one "
        "PostgreSQL store for high availability (docs/ha.rst); SQLite and MySQL stores "
        "serve one volt-api only.",
    ),
    cfg.FloatOpt(
        "liveness_write_interval",
        default=5.0,
        min=0.1,
        max=60.0,
        help="PostgreSQL store only: write a host's last heartbeat to the store at most this "
        "often (seconds; at most a quarter of node_timeout), so that heartbeats do not load "
        "the database. A host is evicted when the store has not heard of it for "
        "node_timeout.",
    ),
    cfg.BoolOpt(
        "group_commit",
        default=True,
        help="SQLite and MySQL stores: write the tree changes of concurrent requests in one "
        "store transaction (each answer still waits until its change is written). A "
        "PostgreSQL store shared by several volt-api processes commits each change on its "
        "own, under the tree's lock (docs/ha.rst).",
    ),
]

cluster_opts: list[cfg.Opt] = [
    cfg.StrOpt(
        "nodes_file",
        help="JSON list of the Virtman nodes the cluster controller dispatches to "
        '([{"id", "url", "token", "vcpus"?, "memory_mb"?}], docs/cluster.rst). Unset: '
        "volt-api serves no cluster routes.",
    ),
    cfg.IntOpt(
        "dispatch_workers",
        default=8,
        min=1,
        max=256,
        help="Threads that bring VMs up on the nodes (at most this many node calls at once).",
    ),
    cfg.FloatOpt(
        "capacity_interval",
        default=5.0,
        min=0.1,
        max=3600.0,
        help="Seconds between two asks of a node's capacity (guest_host_info), made in the "
        "background: placement reads the last answers, never a node. A node whose last ask "
        "failed is 'down', one whose last answer is older than 2 x this + 5 s is 'stale'; "
        "neither gets VMs (GET /v1/nodes shows both).",
    ),
    cfg.FloatOpt(
        "bus_call_timeout",
        default=120.0,
        min=1.0,
        max=3600.0,
        help="With a control bus (transport_url): seconds a guest verb sent over the bus "
        "waits for its answer before it is sent again over XML-RPC (the verbs are "
        "idempotent; docs/bus.rst), and that node gets XML-RPC for a minute. A deploy that "
        "takes longer than this finishes over XML-RPC.",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_opts(default_opts)
    # [DEFAULT] transport_url (oslo.messaging's own option): the control bus, docs/bus.rst.
    # Unset: no bus, parent changes reach the nodes with their heartbeats only.
    bus.register_transport_url(conf)
    conf.register_opts(balanced_opts, group="balanced")
    conf.register_opts(auth_opts, group="auth")
    conf.register_opts(ssl_opts, group="ssl")
    conf.register_opts(database_opts, group="database")
    conf.register_opts(cluster_opts, group="cluster")


def list_opts() -> list[tuple[str | None, list[cfg.Opt]]]:
    """Options for oslo-config-generator (entry point ``oslo.config.opts``)."""
    return [
        ("DEFAULT", [*default_opts, bus.transport_url_sample_opt()]),
        ("balanced", balanced_opts),
        ("auth", auth_opts),
        ("ssl", ssl_opts),
        ("database", database_opts),
        ("cluster", cluster_opts),
    ]


register_opts(CONF)
