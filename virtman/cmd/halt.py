"""``virtman-halt``: stop a node's daemons (tgtd, qemu-storage-daemon) when the host goes down.

virtmanserver.service stops with ``KillMode=process``: the daemons outlive a restart of
virtmanserver, so running VMs keep their disks and the next start adopts them. At poweroff
they must end too, and tgtd ignores SIGTERM: systemd's final kill would wait 90 s for it.
The unit runs this as ``ExecStopPost=... --at-shutdown``: then it acts only while systemd
is shutting down (``systemctl is-system-running`` says ``stopping``) and does nothing after
a plain stop, a restart or a crash. Without the flag it stops the daemons at once (an
operator's choice, e.g. to get new daemon binaries in use with no VM left).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from oslo_config import cfg

from brick.exception import BrickError
from brick.executor import execute
from virtman import conf as virtman_conf
from virtman.drivers import load_driver
from virtman.layers.base import Driver

LOG = logging.getLogger(__name__)
CONF = virtman_conf.CONF
CLI_OPTS = [
    cfg.BoolOpt(
        "at-shutdown",
        default=False,
        help="Act only while systemd shuts the host down (for the unit's ExecStopPost).",
    ),
]


def system_stopping() -> bool:
    """True while systemd shuts down (it answers ``stopping`` with exit status 1)."""
    try:
        state = execute(["systemctl", "is-system-running"], check_exit_code=False, timeout_s=30)
    except BrickError as exc:
        LOG.warning("virtman-halt: cannot ask systemd for its state: %s", exc)
        return False
    return state.stdout.strip() == "stopping"


def halt(*, at_shutdown: bool, stopping: Callable[[], bool], driver: Callable[[], Driver]) -> int:
    """Stop the daemons of ``driver()`` (built only if it acts); the exit status."""
    if at_shutdown and not stopping():
        LOG.info("virtman-halt: the host is not shutting down: the daemons stay")
        return 0
    node = driver()
    try:
        node.halt()
    except BrickError as exc:
        LOG.error("virtman-halt: %s", exc)
        return 1
    LOG.info("virtman-halt: the %s driver's daemons are stopped", node.name)
    return 0


def main(argv: list[str] | None = None) -> int:
    CONF.register_cli_opts(CLI_OPTS)
    virtman_conf.load(sys.argv[1:] if argv is None else argv, prog="virtman-halt")

    def driver() -> Driver:
        try:
            settings = virtman_conf.settings_from_conf()
        except ValueError as exc:
            raise SystemExit(f"virtman-halt: {exc}") from None
        return load_driver(CONF.driver, settings)

    return halt(at_shutdown=CONF.at_shutdown, stopping=system_stopping, driver=driver)
