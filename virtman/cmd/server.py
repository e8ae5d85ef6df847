"""``virtmanserver``: virtman on a compute node or image server, served over XML-RPC."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

from oslo_config import cfg
from oslo_log import log as oslo_logging

from virtman import conf as virtman_conf
from virtman.compute import Virtman
from virtman.drivers import load_driver
from virtman.imageservice import ImageService
from virtman.server import build_server

LOG = logging.getLogger(__name__)
CONF = virtman_conf.CONF


def detect_host_ip() -> str:
    """The source address the kernel would use for the default route (asks the routing
    table only: no packet is sent)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for family, probe in ((2, "192.0.2.1"), (10, "2001:db8::1")):
            try:
                routes = ipr.route("get", dst=probe, family=family)
            except Exception:  # noqa: S112 (no route for this family)
                continue
            for route in routes:
                source = route.get_attr("RTA_PREFSRC")
                if source:
                    return str(source)
    raise SystemExit("virtmanserver: cannot detect host_ip (no default route); set host_ip")


def main(argv: list[str] | None = None) -> None:
    oslo_logging.register_options(CONF)
    CONF(
        sys.argv[1:] if argv is None else argv,
        project="virtman",
        prog="virtmanserver",
        default_config_files=cfg.find_config_files(project="virtman", prog="virtmanserver")
        or (["/etc/virtman/virtman.conf"] if os.path.exists("/etc/virtman/virtman.conf") else []),
    )
    oslo_logging.setup(CONF, "virtman")
    host_ip = CONF.host_ip or detect_host_ip()
    settings = virtman_conf.Settings.from_conf(CONF, host_ip)
    if bool(settings.chap_user) != bool(settings.chap_password):
        raise SystemExit("virtmanserver: set both chap_user and chap_password, or neither")
    pid_file = Path(CONF.pid_file) if CONF.pid_file else None
    if pid_file:
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{os.getpid()}\n")
    driver = load_driver(CONF.driver, settings)
    virtman = Virtman(settings, driver)
    images = ImageService(driver.tgt, driver.chap, settings.iqn_prefix)  # type: ignore[attr-defined]
    server = build_server((CONF.listen_host, CONF.listen_port), CONF.api_token, virtman, images)
    stopping = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        LOG.info("virtmanserver: signal %d, stopping", signum)
        stopping.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    LOG.info(
        "virtmanserver ready on %s:%s (host_ip %s, driver %s, Volt %s)",
        CONF.listen_host,
        CONF.listen_port,
        host_ip,
        driver.name,
        settings.master_url,
    )
    print("Virtman Server Run ...", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        virtman.shutdown()
        if pid_file:
            pid_file.unlink(missing_ok=True)
        LOG.info("virtmanserver stopped")


if __name__ == "__main__":
    main()
