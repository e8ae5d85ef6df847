"""``virtmanserver``: virtman on a compute node or image server, served over XML-RPC."""

from __future__ import annotations

import dataclasses
import faulthandler
import logging
import os
import signal
import ssl
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import brick.privileged
import brick.privileged.process
from brick import values
from brick.exception import BrickError
from virtman import capture, imageservice, uplinkwatch
from virtman import conf as virtman_conf
from virtman.compute import Virtman
from virtman.conf import Settings
from virtman.drivers import load_driver
from virtman.errors import JournalCorrupt, VirtmanError
from virtman.guest import migration, sources
from virtman.guest.disk_export import DiskExports
from virtman.guest.domains import VirtualMachines
from virtman.guest.manager import Guests
from virtman.guest.vcenter_rdm import EsxHost, RecordedHost
from virtman.server import Limits, Methods, build_server
from virtman.zvm import service as zvm_service

if TYPE_CHECKING:  # oslo.vmware is the optional extra vmthunder[vcenter]: imported when used
    from virtman.guest.vcenter_guests import VCenterGuests

LOG = logging.getLogger(__name__)
CONF = virtman_conf.CONF


def check_auth() -> str | None:
    """The token callers must send (None: noauth); SystemExit if token auth has none."""
    if CONF.auth_strategy == "noauth":
        LOG.warning(
            "virtmanserver: auth_strategy = noauth: anyone who reaches the XML-RPC port can "
            "create and destroy VMs and export image files (closed test networks only)"
        )
        return None
    if not CONF.api_token:
        raise SystemExit(
            "virtmanserver: auth_strategy = token needs api_token (set api_token in "
            "virtman.conf, e.g. made by vmt-initenv.py, or set auth_strategy = noauth "
            "explicitly on a closed test network)"
        )
    return str(CONF.api_token)


def tls_context() -> ssl.SSLContext | None:
    """The server's TLS context from tls_cert_file/tls_key_file (both or none)."""
    cert, key = CONF.tls_cert_file, CONF.tls_key_file
    if not cert and not key:
        return None
    if not (cert and key):
        raise SystemExit("virtmanserver: set both tls_cert_file and tls_key_file, or neither")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise SystemExit(f"virtmanserver: cannot load tls_cert_file/tls_key_file: {exc}") from None
    return context


def guest_image_source(virtman: Virtman, settings: Settings) -> Callable[[str], Any]:
    """Where a guest's deploy reads its image: this node's export, else the image servers of
    ``guest_image_servers`` through Volt's tree; SystemExit naming a bad entry."""
    try:
        image_servers = sources.parse_image_servers(CONF.guest_image_servers)
    except ValueError as exc:
        raise SystemExit(f"virtmanserver: {exc}") from None
    local = values.Portal(values.unbracket(settings.host_ip), settings.iscsi_port)
    return sources.image_source(virtman.journal.exports, local, image_servers, settings.iqn_prefix)


def build_vcenter_guests(virtman: Virtman, settings: Settings) -> VCenterGuests:
    """``guest_backend = vcenter``: the guests as VMs of ``[vcenter]``; SystemExit naming
    what is wrong when vCenter cannot be used."""
    group = CONF.vcenter
    if group.esx_host not in ("vsphere", "recorded"):
        raise SystemExit(
            "virtmanserver: guest_backend = vcenter needs [vcenter] esx_host: vsphere or "
            "recorded (docs/vcenter.rst)"
        )
    if group.esx_host == "vsphere" and CONF.driver != "dm":
        raise SystemExit(
            f"virtmanserver: [vcenter] esx_host = vsphere needs driver = dm: the {CONF.driver} "
            "driver's guest disk is a qcow2 file, which an ESXi host cannot map as a raw disk "
            "(docs/vcenter.rst)"
        )
    try:  # here, not at the top: only this backend needs oslo.vmware
        from virtman.guest.vcenter import VCenterMachines, VCenterSettings
        from virtman.guest.vcenter_esx import VSphereHost
        from virtman.guest.vcenter_guests import VCenterGuests
    except ImportError as exc:
        raise SystemExit(
            f"virtmanserver: guest_backend = vcenter needs oslo.vmware ({exc}); install "
            "the extra: pip install 'vmthunder[vcenter]'"
        ) from None
    try:
        machines = VCenterMachines(VCenterSettings.from_conf(group), state_dir=settings.state_dir)
    except (VirtmanError, ValueError) as exc:
        raise SystemExit(f"virtmanserver: [vcenter]: {exc}") from None
    driver = virtman.driver
    host: EsxHost
    if group.esx_host == "vsphere":
        host = VSphereHost(machines, driver.chap)
        LOG.info("virtmanserver: guests are VMs of vCenter %s", machines.settings.endpoint)
    else:
        host = RecordedHost(settings.state_dir / "vcenter-esx-host.json")
        LOG.warning(
            "virtmanserver: guests are VMs of vCenter %s; the ESXi host's iSCSI and RDM "
            "steps are recorded in %s, not done ([vcenter] esx_host = recorded)",
            machines.settings.endpoint,
            host.path,
        )
    guests = VCenterGuests(
        virtman,
        machines,
        host,
        DiskExports(driver.tgt, driver.chap, settings.iqn_prefix, settings.host_ip,
                    settings.iscsi_port),
        connections=guest_image_source(virtman, settings),
        name_prefix=CONF.guest_name_prefix,
        cpu_allocation_ratio=group.cpu_allocation_ratio,
    )  # fmt: skip
    try:
        guests.adopt()
    except VirtmanError as exc:
        LOG.error("virtmanserver: guests not adopted (vCenter: %s)", exc)
    virtman.supervisor.listeners.append(guests.restore_exports)  # tgtd restarted
    return guests


def build_guests(virtman: Virtman, settings: Settings) -> Guests | VCenterGuests:
    """The node's guests, adopted from the journal and libvirt (never restarted)."""
    if CONF.guest_backend == "vcenter":
        return build_vcenter_guests(virtman, settings)
    guests = Guests(
        virtman,
        VirtualMachines(CONF.guest_libvirt_uri),
        connections=guest_image_source(virtman, settings),
        console_dir=settings.state_dir / "guests",
        kernel=CONF.guest_kernel,
        initrd=CONF.guest_initrd,
        cmdline=CONF.guest_cmdline,
        name_prefix=CONF.guest_name_prefix,
        state_dir=settings.state_dir,
        migration_settings=migration.Settings(
            uri=CONF.guest_migration_uri or CONF.guest_libvirt_uri,
            host=CONF.guest_migration_host or settings.host_ip,
            timeout_s=CONF.guest_migration_timeout,
            bandwidth_mib_s=CONF.guest_migration_bandwidth,
        ),
    )
    try:
        guests.adopt()
    except VirtmanError as exc:
        level = logging.ERROR if guests.list() else logging.INFO
        LOG.log(level, "virtmanserver: guests not adopted (libvirt: %s); retried per call", exc)
    return guests


def start_privsep() -> None:
    """Start the privsep daemon; SystemExit with the reason if it does not come up."""
    try:
        brick.privileged.start()
    except brick.privileged.PrivsepUnavailable as exc:
        raise SystemExit(
            f"virtmanserver: {exc} (privsep = true; docs/privsep.rst: run as root, or set "
            "[brick_privsep] helper_command, or privsep = false to run everything as root)"
        ) from None
    LOG.info("virtmanserver: privsep daemon %s", brick.privileged.process.whoami())


def main(argv: list[str] | None = None) -> None:
    # kill -USR1: every thread's stack on stderr, to see where a stop or a call hangs.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    virtman_conf.load(sys.argv[1:] if argv is None else argv, prog="virtmanserver")
    token = check_auth()
    if CONF.privsep:
        start_privsep()
    else:
        LOG.warning(
            "virtmanserver: privsep = false: root-only operations run in this process, "
            "without the allow-lists of brick/privileged (docs/privsep.rst)"
        )
    try:
        serve(token)
    finally:
        brick.privileged.stop()  # last, and on every way out: it ran the node's root daemons


def serve(token: str | None) -> None:
    """Build the node from the loaded configuration and serve until a signal."""
    context = tls_context()
    try:
        settings = virtman_conf.settings_from_conf()
    except ValueError as exc:
        raise SystemExit(f"virtmanserver: {exc}") from None
    host_ip = settings.host_ip
    listen_host = CONF.listen_host or host_ip
    # Volt probes this port (only for liveness) before it evicts a parent whose data
    # daemon stopped: a live node daemon is repairing it (docs/bus.rst).
    api_port = virtman_conf.announced_api_port(CONF.listen_host, host_ip, CONF.listen_port)
    if api_port is None:
        LOG.info(
            "virtmanserver: XML-RPC on %s, not host_ip %s: heartbeats announce no api_port",
            listen_host,
            host_ip,
        )
    settings = dataclasses.replace(settings, api_port=api_port)
    limits = Limits(
        token=token,
        max_request_bytes=CONF.max_request_bytes,
        request_timeout=CONF.request_timeout,
        rpc_workers=CONF.rpc_workers,
        max_connections=CONF.max_connections,
        max_connections_per_peer=CONF.max_connections_per_peer,
    )
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
    images = imageservice.of_node(virtman, CONF)
    images.restore()  # what a tgtd that died with the host (or alone) held
    capture.sweep_partials(images)  # a capture a crash interrupted
    virtman.supervisor.listeners.append(images.restore)

    def fail(reason: str) -> NoReturn:
        """Undo the start so far (what Virtman holds, the pid file) and exit with ``reason``."""
        virtman.shutdown()
        if pid_file:
            pid_file.unlink(missing_ok=True)
        raise SystemExit(f"virtmanserver: {reason}") from None

    try:
        guests = build_guests(virtman, settings)
    except SystemExit as exc:  # guest options that cannot be used ([vcenter], image servers)
        fail(str(exc.code).removeprefix("virtmanserver: "))
    try:
        server = build_server(
            (listen_host, CONF.listen_port), limits, virtman, images, context, guests=guests
        )
    except OSError as exc:
        fail(f"cannot listen on {listen_host}:{CONF.listen_port}: {exc}")
    if virtman.bus is not None:  # the cluster controller's guest calls (docs/bus.rst)
        virtman.bus.serve_guests(Methods(virtman, images, guests), token)
    zvm_server = None
    if CONF.zvm_api_enabled:
        try:
            zvm_server = zvm_service.build_server(
                CONF,
                state_dir=settings.state_dir,
                disk_dir=settings.cache_dir,
                virtman=virtman,
                images=images,
                backend=guests,
                token=token,
                ssl_context=context,
            )
        except (OSError, JournalCorrupt, ValueError) as exc:
            server.server_close()
            fail(f"z/VM API on {CONF.zvm_api_listen_host}:{CONF.zvm_api_port}: {exc}")
        zvm_server.start()
        LOG.info(
            "virtmanserver: z/VM Cloud Connector API on %s (auth %s%s)",
            zvm_server.url,
            CONF.auth_strategy,
            ""
            if token is None or CONF.zvm_api_auth == "token"
            else f", or peer-uid of {', '.join(CONF.zvm_api_peer_users)}",
        )
    uplink = None
    try:  # uplink_priority: before serving, so that a bad option stops the start
        ports = (settings.iscsi_port, settings.nbd_port)  # relays: tgtd or LIO, and NBD
        uplink = uplinkwatch.from_conf(CONF, host_ip, driver.tgt, ports)
        if uplink is not None:
            uplink.start()  # adopts our qdisc of a previous run
    except (ValueError, OSError, BrickError) as exc:
        if uplink is not None:
            uplink.stop()
        if zvm_server is not None:
            zvm_server.stop()
        server.server_close()
        fail(str(exc))
    stopping = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        LOG.info("virtmanserver: signal %d, stopping", signum)
        stopping.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    LOG.info(
        "virtmanserver ready on %s://%s:%s/RPC2 (auth %s, host_ip %s, driver %s, Volt %s, "
        "image_dirs %s)",
        "https" if context else "http",
        server.server_address[0],
        server.server_address[1],
        CONF.auth_strategy,
        host_ip,
        driver.name,
        settings.master_url,
        ", ".join(images.image_dirs),
    )
    print("Virtman Server Run ...", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        if uplink is not None:
            uplink.stop()  # removes our qdisc
        if zvm_server is not None:
            zvm_server.stop()
        server.server_close()
        close = getattr(guests, "close", None)  # the vCenter session; libvirt's has none
        if close is not None:
            close()
        virtman.shutdown()
        if pid_file:
            pid_file.unlink(missing_ok=True)
        LOG.info("virtmanserver stopped")


if __name__ == "__main__":
    main()
