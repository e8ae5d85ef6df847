"""``virtmanserver``: virtman on a compute node or image server, served over XML-RPC."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

from virtman import conf as virtman_conf
from virtman.compute import Virtman
from virtman.drivers import load_driver
from virtman.errors import JournalCorrupt
from virtman.imageservice import ImageService
from virtman.server import build_server

LOG = logging.getLogger(__name__)
CONF = virtman_conf.CONF


def main(argv: list[str] | None = None) -> None:
    virtman_conf.load(sys.argv[1:] if argv is None else argv, prog="virtmanserver")
    try:
        settings = virtman_conf.settings_from_conf()
    except ValueError as exc:
        raise SystemExit(f"virtmanserver: {exc}") from None
    host_ip = settings.host_ip
    pid_file = Path(CONF.pid_file) if CONF.pid_file else None
    if pid_file:
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{os.getpid()}\n")
    driver = load_driver(CONF.driver, settings)
    try:
        virtman = Virtman(settings=settings, driver=driver)
    except JournalCorrupt as exc:
        LOG.error("virtmanserver: %s", exc)
        if pid_file:
            pid_file.unlink(missing_ok=True)
        raise SystemExit(f"virtmanserver: {exc}") from None
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
