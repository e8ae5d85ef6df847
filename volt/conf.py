"""Configuration options of volt-api (oslo.config).

Option names kept from the original Volt: ``bind_host``, ``bind_port``, ``default_executor``.
"""

from oslo_config import cfg

CONF = cfg.CONF

default_opts = [
    cfg.HostAddressOpt(
        "bind_host",
        default="0.0.0.0",  # noqa: S104 - a master serves the whole cluster
        help="Address volt-api listens on.",
    ),
    cfg.PortOpt("bind_port", default=7447, help="TCP port volt-api listens on."),
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
        help="How requests to /v1 are authenticated.",
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
    cfg.IntOpt(
        "api_threads",
        default=4,
        min=1,
        max=256,
        help="Worker threads that run API requests (the HTTP layer itself is Granian's). "
        "Requests are serialised on the trees' lock, so more threads mostly add GIL "
        "contention: 4 measured best on 2 cores (bench/volt_load.py).",
    ),
    cfg.StrOpt(
        "pid_file",
        help="Write the PID of volt-api here while it runs (removed on clean shutdown).",
    ),
]

balanced_opts = [
    cfg.IntOpt(
        "fanout",
        default=2,
        min=2,
        max=64,
        help="Children per node, the image server included (tree parent role). New trees "
        "only: a tree keeps the fan-out it was created with.",
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

auth_opts = [
    cfg.StrOpt(
        "token",
        secret=True,
        help="Shared secret clients send in X-Auth-Token (auth_strategy = token). Required "
        "with that strategy: volt-api refuses to start without it.",
    ),
]

database_opts = [
    cfg.StrOpt(
        "connection",
        default="sqlite:////var/lib/volt/volt.sqlite",
        secret=True,
        help="SQLAlchemy URL of the store that keeps all trees, e.g. "
        "sqlite:////var/lib/volt/volt.sqlite, postgresql+psycopg://volt:PW@db/volt, "
        "mysql+pymysql://volt:PW@db/volt.",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_opts(default_opts)
    conf.register_opts(balanced_opts, group="balanced")
    conf.register_opts(auth_opts, group="auth")
    conf.register_opts(database_opts, group="database")


def list_opts() -> list[tuple[str | None, list[cfg.Opt]]]:
    """Options for oslo-config-generator (entry point ``oslo.config.opts``)."""
    return [
        ("DEFAULT", default_opts),
        ("balanced", balanced_opts),
        ("auth", auth_opts),
        ("database", database_opts),
    ]


register_opts(CONF)
