"""``volt-api``: the Volt master daemon.

The HTTP layer is Granian: one worker process serving the RSGI application (volt.api.app),
whose event loop reads headers (Granian's http1 ``header_read_timeout``, 30 s) and bodies
(``request_body_timeout``) and runs the handlers. The
worker dies with the master process (PR_SET_PDEATHSIG), so
even a ``kill -9`` leaves no orphan holding the port. SIGTERM/SIGINT stop it gracefully.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from oslo_config import cfg
from oslo_log import log as oslo_logging

from volt import conf as volt_conf
from volt.api.app import VoltApp
from volt.bus import VoltBus
from volt.cluster.busdispatch import BusDispatch
from volt.cluster.controller import Controller
from volt.cluster.nodes import load_nodes
from volt.connlimit import fit_open_files
from volt.deathwatch import DeathWatch
from volt.errors import VoltError
from volt.liveness import Evictor, LoadMonitor
from volt.metrics import Metrics
from volt.service import VoltService
from volt.store import Store
from volt.topology import load_executor

LOG = logging.getLogger(__name__)
CONF = volt_conf.CONF
ARGV_ENV = "VOLT_API_ARGV"
PR_SET_PDEATHSIG = 1
GC_THRESHOLDS = (50_000, 50, 100)
HEADER_READ_TIMEOUT_MS = 5_000  # Granian's default is 30 s  # CPython default: (700, 10, 10)


def _parse_config(argv: list[str]) -> None:
    oslo_logging.register_options(CONF)
    CONF(argv, project="volt", prog="volt-api", default_config_files=_default_config_files())


def _default_config_files() -> list[str]:
    return cfg.find_config_files(project="volt", prog="volt-api") or (
        ["/etc/volt/volt.conf"] if os.path.exists("/etc/volt/volt.conf") else []
    )


def _auth_token() -> str | None:
    if CONF.auth_strategy == "noauth":
        return None
    return str(CONF.auth.token)


def _node_secret() -> str | None:
    if CONF.auth_strategy == "noauth" or not CONF.auth.node_secret:
        return None
    return str(CONF.auth.node_secret)


def check_config() -> None:
    """Refuse configurations that cannot work, with a message that says what to change."""
    if CONF.auth_strategy == "token" and not CONF.auth.token:
        raise SystemExit(
            "volt-api: auth_strategy = token needs [auth] token (or set auth_strategy = noauth "
            "explicitly on a closed test network)"
        )
    if CONF.auth_strategy == "token" and CONF.auth.node_secret == CONF.auth.token:
        raise SystemExit("volt-api: [auth] node_secret must differ from [auth] token")
    if CONF.cluster.nodes_file:
        try:
            load_nodes(CONF.cluster.nodes_file)
        except (OSError, ValueError) as exc:
            raise SystemExit(
                f"volt-api: [cluster] nodes_file {CONF.cluster.nodes_file}: {exc}"
            ) from None
    if bool(CONF.ssl.cert_file) != bool(CONF.ssl.key_file):
        raise SystemExit("volt-api: [ssl] cert_file and key_file go together")
    for name in ("cert_file", "key_file"):
        path = getattr(CONF.ssl, name)
        if path and not os.access(path, os.R_OK):
            raise SystemExit(f"volt-api: [ssl] {name} {path} is not a readable file")
    try:
        load_executor(CONF.default_executor)
    except Exception as exc:  # stevedore raises several kinds
        raise SystemExit(
            f"volt-api: unknown default_executor {CONF.default_executor!r} ({exc})"
        ) from None


def build_app() -> VoltApp:
    """Everything volt-api serves, built from the parsed configuration."""
    executor = load_executor(
        CONF.default_executor,
        fanout=CONF.balanced.fanout,
        image_server_fanout=CONF.balanced.image_server_fanout,
        parents_per_node=CONF.balanced.parents_per_node,
    )
    metrics = Metrics()
    store = Store(CONF.database.connection)
    service = VoltService(
        store,
        executor,
        node_timeout=CONF.node_timeout,
        metrics=metrics,
        liveness_write_interval=CONF.database.liveness_write_interval,
        group_commit=CONF.database.group_commit,
    )
    deathwatch = DeathWatch(service, repair_grace_s=CONF.dead_parent_repair_grace)
    volt_bus = None
    if CONF.transport_url:
        # A broker down now is no reason not to start: pushes fail fast and are logged
        # once; the listener reconnects by itself.
        volt_bus = VoltBus(CONF.transport_url, metrics=metrics).start()
        service.on_parents_changed = volt_bus.push
        volt_bus.events.on_dead_parent = deathwatch.report
    monitor = LoadMonitor()
    Evictor(service, monitor).start()
    cluster = None
    if CONF.cluster.nodes_file:
        nodes = load_nodes(CONF.cluster.nodes_file)
        cluster = Controller(
            store,
            nodes,
            workers=CONF.cluster.dispatch_workers,
            capacity_interval=CONF.cluster.capacity_interval,
            controller_address=(CONF.bind_host, CONF.bind_port),
            bus=None
            if volt_bus is None
            else BusDispatch(volt_bus.rpc, call_timeout=CONF.cluster.bus_call_timeout),
        )
        if volt_bus is not None:
            volt_bus.events.on_guest = cluster.node_event
        LOG.info(
            "volt-api: cluster controller over %d nodes (dispatch over %s)",
            len(nodes),
            "XML-RPC" if volt_bus is None else "the control bus, XML-RPC when it is down",
        )
    if CONF.auth_strategy == "noauth":
        LOG.warning("volt-api runs with auth_strategy = noauth: anyone can change every tree")
    LOG.info(
        "volt-api ready: executor %s, node_timeout %ss, auth %s%s",
        executor.name,
        CONF.node_timeout,
        CONF.auth_strategy,
        " (admin and node tokens)" if _node_secret() else "",
    )
    return VoltApp(
        service,
        auth_token=_auth_token(),
        node_secret=_node_secret(),
        metrics=metrics,
        metrics_public=CONF.metrics_public,
        body_timeout=CONF.request_body_timeout,
        monitor=monitor,
        cluster=cluster,
        deathwatch=deathwatch,
    )


def app_factory() -> VoltApp:
    """Entry point of the Granian worker process."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the master died before prctl took effect
        os._exit(1)
    if not hasattr(CONF, "bind_port") or CONF.config_file is None:
        _parse_config(json.loads(os.environ[ARGV_ENV]))
    try:
        app = build_app()
    except VoltError as err:
        LOG.error("volt-api cannot start: %s", err.detail)
        raise SystemExit(1) from err
    # The trees are long-lived objects: keep them out of the collector's full passes, and
    # collect young objects less often, so that no request waits behind a long GC pause.
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    return app


def _serve() -> None:
    from granian.constants import Interfaces
    from granian.server import Server

    log_config: dict[str, Any] = {
        "handlers": {},
        "loggers": {
            "_granian": {"level": "WARNING", "propagate": True},
            "granian.access": {"level": "WARNING", "propagate": True},
        },
    }
    ssl: dict[str, Any] = {}
    if CONF.ssl.cert_file:
        ssl = {"ssl_cert": Path(CONF.ssl.cert_file), "ssl_key": Path(CONF.ssl.key_file)}
    server = Server(
        "volt.cmd.api:app_factory",
        address=CONF.bind_host,
        port=CONF.bind_port,
        interface=Interfaces.RSGI,
        workers=1,
        backlog=4096,
        backpressure=fit_open_files(CONF.max_connections),  # one per compute node
        factory=True,
        log_dictconfig=log_config,
        workers_kill_timeout=10,
        **ssl,
    )
    server.serve()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    _parse_config(argv)
    oslo_logging.setup(CONF, "volt")
    check_config()
    try:
        Store(CONF.database.connection).dispose()  # fail fast, before forking the worker
    except VoltError as err:
        raise SystemExit(f"volt-api: {err.detail} ({CONF.database.connection})") from None
    os.environ[ARGV_ENV] = json.dumps(argv)
    pid_file = CONF.pid_file
    if pid_file:
        with open(pid_file, "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")
    scheme = "https" if CONF.ssl.cert_file else "http"
    LOG.info("volt-api listening on %s://%s:%d", scheme, CONF.bind_host, CONF.bind_port)
    try:
        _serve()
    finally:
        if pid_file and os.path.exists(pid_file):
            os.unlink(pid_file)
        LOG.info("volt-api stopped")


if __name__ == "__main__":
    main()
