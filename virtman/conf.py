"""Configuration options of virtman (oslo.config).

Option names kept from the original: ``host_ip``, ``master_ip``, ``master_port``,
``heartbeat_interval``. The core never reads ``CONF`` itself: ``Settings.from_conf`` turns
the parsed options into one frozen object handed to it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from oslo_config import cfg, types

from brick import bus, values
from brick.exception import InvalidArgument
from brick.psk import read as read_psk
from virtman.guestconf import guest_opts, vcenter_opts, zvm_opts

CONF = cfg.CONF
LOG = logging.getLogger(__name__)

default_opts = [
    cfg.HostAddressOpt(
        "host_ip",
        help="This node's address: registered with Volt as the relay's host, used for the "
        "relay target and the NBD export. Detected from the default route when unset.",
    ),
    cfg.HostAddressOpt("master_ip", default="127.0.0.1", help="Volt's address."),
    cfg.PortOpt("master_port", default=7447, help="Volt's port."),
    cfg.ListOpt(
        "master_url",
        item_type=types.URI(schemes=["http", "https"]),
        help="Volt's URL, e.g. https://volt.example:7447 when volt-api serves TLS, or several "
        "comma-separated (volt-api processes sharing one PostgreSQL store, docs/ha.rst): "
        "requests go to the one that answered last and fail over to the next on connection "
        "errors and 5xx answers. When set it replaces master_ip and master_port.",
    ),
    cfg.StrOpt(
        "master_ca_file",
        help="PEM CA bundle that signs volt-api's certificate (https master_url). Unset: "
        "the system's CAs.",
    ),
    cfg.StrOpt(
        "master_token",
        secret=True,
        help="This node's Volt credential (X-Auth-Token): its node token (`volt-manage "
        "node-token <host_ip>` on the master), which only acts for this host_ip; Volt's "
        "admin [auth] token works too but is not bound to the node.",
    ),
    cfg.IntOpt(
        "heartbeat_interval",
        default=20,
        min=1,
        max=3600,
        help="Seconds between heartbeats to Volt; parent changes arrive with them. Must be "
        "well below Volt's node_timeout.",
    ),
    cfg.StrOpt(
        "driver",
        default="qemu",
        choices=[
            ("qemu", "userspace: qemu-storage-daemon, tgtd, qcow2 (any Linux host)"),
            ("dm", "kernel: open-iscsi, dm-multipath, bcache, LIO, dm-snapshot"),
        ],
        help="The block stack driver.",
    ),
    cfg.StrOpt("state_dir", default="/var/lib/virtman", help="Journal and default dirs."),
    cfg.StrOpt(
        "cache_dir",
        help="Cache files, one per image (default: <state_dir>/cache). Put it on "
        "local fast storage: every block read from upstream is kept here.",
    ),
    cfg.StrOpt(
        "instances_dir", help="Per-VM copy-on-write disks (default: <state_dir>/instances)."
    ),
    cfg.StrOpt("run_dir", default="/run/virtman", help="Sockets, pid files, FUSE exports."),
    cfg.PortOpt("iscsi_port", default=3260, help="Port of this node's relay target (tgtd)."),
    cfg.PortOpt(
        "nbd_port",
        default=10809,
        help="Port of this node's NBD exports of the relay (0: none). Children prefer NBD.",
    ),
    cfg.IntOpt(
        "tgt_control_port",
        default=3260,
        min=0,
        max=65535,
        help="tgtd's control port (tgtadm -C); distinct per tgtd on one machine.",
    ),
    cfg.StrOpt("iqn_prefix", default="iqn.2010-10.org.openstack:", help="IQN of images."),
    # -- data plane authentication (iSCSI CHAP, NBD TLS-PSK) --------------------------------
    cfg.StrOpt(
        "chap_user",
        help="CHAP user of every image and relay target (with chap_password); readers log "
        "in with it. Required unless insecure_targets. The same on every node of a cluster.",
    ),
    cfg.StrOpt(
        "chap_password",
        secret=True,
        help="CHAP password (12-64 printable characters, no spaces). Required unless "
        "insecure_targets.",
    ),
    cfg.StrOpt(
        "nbd_psk_file",
        help="Pre-shared key of the NBD relays, in QEMU's keys.psk format (lines "
        "identity:hexkey, the first line's identity is presented; mode 0600). NBD exports "
        "then require TLS with this key and NBD paths to parents present it. The same file "
        "on every node of a cluster. Required (qemu driver, or dm with dm_nbd_relay) unless "
        "insecure_targets.",
    ),
    cfg.BoolOpt(
        "privsep",
        default=True,
        help="Run root-only operations (the commands of brick.privileged.process.ROOT_COMMANDS "
        "and the kernel knob writes of brick.privileged.sysfs) in an oslo.privsep daemon "
        "holding only the capabilities listed in brick/privileged/__init__.py "
        "(docs/privsep.rst), started with virtmanserver (forked when it runs as root, else "
        "through [brick_privsep] helper_command); virtmanserver stops with an error if that "
        "daemon does not start. false: they run in virtmanserver itself, which must then be "
        "root (for operators who run the whole daemon as root on purpose).",
    ),
    cfg.BoolOpt(
        "insecure_targets",
        default=False,
        help="Allow serving iSCSI targets without CHAP and NBD exports without TLS when "
        "chap_user/chap_password or nbd_psk_file are unset: anyone who reaches the ports "
        "then reads every exported image. Logged as a WARNING at every start. Credentials "
        "that are set are always used.",
    ),
    cfg.IntOpt(
        "parent_wait_timeout",
        default=600,
        min=1,
        help="Seconds a create waits for Volt to place the node (btree executors answer "
        "'not placeable' until a parent is ready).",
    ),
    cfg.IntOpt(
        "degraded_retry_min",
        default=5,
        min=1,
        max=3600,
        help="Seconds before the first retry of an image left degraded at start (its "
        "stack could not be adopted or rebuilt, e.g. Volt unreachable for longer than "
        "parent_wait_timeout). The delay doubles after every failed retry, up to "
        "degraded_retry_max. A degraded image keeps its files, its VMs' disks and what "
        "still runs of its stack.",
    ),
    cfg.IntOpt(
        "degraded_retry_max",
        default=300,
        min=1,
        max=86400,
        help="Upper bound, in seconds, of the delay between two retries of a degraded "
        "image (at least degraded_retry_min).",
    ),
    cfg.FloatOpt(
        "daemon_check_interval",
        default=2.0,
        min=0.0,
        max=60.0,
        help="Seconds between two checks that this node's daemons (qemu-storage-daemon, "
        "tgtd) still run. One that died is started again at once and what lived in it is "
        "rebuilt: the image stacks with their cache files, the relays, the image targets "
        "of create_image_target. 0 turns the checks off (a restart of virtmanserver then "
        "does the same).",
    ),
    cfg.FloatOpt(
        "parent_check_interval",
        default=0.5,
        min=0.0,
        max=60.0,
        help="Seconds between two checks that each image's first parent still serves this "
        "node (a TCP connect to the port its path reads from, and the driver's failed "
        "reads for every parent). A parent that stopped is reported to Volt at once (over "
        "the control bus when it is up, else the REST API), which confirms it and evicts "
        "it: see docs/bus.rst, 'Detecting a dead parent'. 0 turns the checks off (Volt's "
        "node_timeout then notices the death).",
    ),
    cfg.IntOpt(
        "nbd_reconnect_delay",
        default=1,
        min=1,
        max=60,
        help="Seconds an NBD path waits for its parent before the read moves to another path. "
        "NBD paths lead to parents, and every node has a standby parent: a short wait keeps "
        "a dead parent's replacement within 2 s of its death (docs/bus.rst); a longer one "
        "rides out longer network blips on the first path.",
    ),
    cfg.IntOpt(
        "qemu_fuse_readahead_kib",
        default=4096,
        min=0,
        max=1 << 20,
        help="qemu driver: the kernel readahead window (read_ahead_kb of the mount's "
        "backing device) of every image's FUSE export. The kernel's default for a FUSE "
        "mount is small, so a cold sequential read reaches the upstream in small pieces, "
        "one at a time. 0 leaves the kernel's default.",
    ),
    cfg.IntOpt(
        "qemu_malloc_mmap_threshold_kib",
        default=32768,
        min=0,
        max=1 << 22,
        help="qemu driver: glibc's MALLOC_MMAP_THRESHOLD_ for qemu-storage-daemon. A "
        "fixed threshold above the daemon's request buffers keeps them on the heap instead "
        "of an mmap/munmap (and page faults) per large request. 0 leaves glibc's dynamic "
        "threshold.",
    ),
    cfg.StrOpt("pid_file", help="Write virtmanserver's PID here while it runs."),
    cfg.StrOpt(
        "prefetch_dir",
        help="Boot-read traces, <image_name>.trace.json (e.g. volume-image1.trace.json). "
        "When set, a node that builds a new stack for an image with a trace reads the "
        "trace's clusters from its parents in the background, so that the VM finds them "
        "cached. Unset: no prefetch.",
    ),
    cfg.IntOpt(
        "prefetch_depth",
        default=2,
        min=1,
        max=4,
        help="Prefetch reads in flight per image.",
    ),
    cfg.StrOpt(
        "dm_cache_device",
        help="dm driver: the node's one local cache device (a block device, e.g. an SSD "
        "partition), shared by every image: its first 16 MiB hold the images' bcache "
        "headers, the rest is one bcache cache set. Its content is lost. Unset: a sparse "
        "file <cache_dir>/dm-cache.img of dm_cache_size_mib on a loop device.",
    ),
    cfg.IntOpt(
        "dm_cache_size_mib",
        default=10240,
        min=64,
        help="dm driver: size of the cache file when dm_cache_device is unset. bcache keeps "
        "1/1024 of the cache ready for new data: bigger caches drop fewer first reads.",
    ),
    cfg.StrOpt(
        "dm_relay",
        default="lio",
        choices=[("lio", "LIO (rtslib-fb), kernel target"), ("tgt", "tgtd, userspace")],
        help="dm driver: the target that exports the relay.",
    ),
    cfg.PortOpt(
        "dm_image_port",
        default=0,
        help="dm driver with dm_relay=lio: port of a tgtd for create_image_target on this "
        "node (0: none, image targets are refused). With dm_relay=tgt the relay's tgtd "
        "serves them on iscsi_port.",
    ),
    cfg.BoolOpt(
        "dm_nbd_relay",
        default=False,
        help="dm driver: also export each relay over NBD on nbd_port (a qemu-storage-daemon "
        "reading the cached device), so that qemu-driver children read it over NBD: their "
        "NBD paths fail over when this node dies, where an iSCSI path of theirs hangs.",
    ),
    cfg.IntOpt(
        "dm_no_path_retry",
        default=30,
        min=1,
        max=3600,
        help="dm driver: seconds a multipath device with no working path queues I/O before "
        "failing it (multipathd's no_path_retry, in seconds).",
    ),
    cfg.IntOpt(
        "dm_cow_percent",
        default=110,
        min=10,
        max=1000,
        help="dm driver: size of each VM's copy-on-write file (sparse), in percent of the "
        "image size.",
    ),
    cfg.IntOpt(
        "prefetch_pause_ms",
        default=0,
        min=0,
        max=10000,
        help="Pause of each prefetch reader after every read (leaves bandwidth to the VM).",
    ),
    cfg.BoolOpt(
        "uplink_priority",
        default=False,
        help="Serve the nodes reading from this node (its relay and image targets' "
        "initiators, its NBD peers) in strict priority of their arrival on the uplink: an "
        "htb qdisc of ours (handle 7674:) on uplink_device with one class per reader, the "
        "first to arrive first, each assured uplink_floor_kbit (docs/virtman.rst, "
        "'Readers served by priority'). Off until measured on real boots: the simulation "
        "shows it (docs/benchmarks.rst), bench/provision.py does not yet.",
    ),
    cfg.StrOpt(
        "uplink_device",
        help="uplink_priority: the device whose egress is ordered (default: the device "
        "carrying host_ip, from `ip -o addr`).",
    ),
    cfg.IntOpt(
        "uplink_mbit",
        default=0,
        min=0,
        max=1000000,
        help="uplink_priority: the link rate the classes share, in Mbit/s; set it a little "
        "below the real rate, so that the queue forms in the qdisc and not in the NIC. 0: "
        "95 % of the speed in /sys/class/net/<uplink_device>/speed (virtmanserver stops "
        "with an error when the kernel does not know it, e.g. a veth).",
    ),
    cfg.IntOpt(
        "uplink_floor_kbit",
        default=0,
        min=0,
        help="uplink_priority: the rate each reader (and the default class) is assured "
        "whatever the readers above it take, in kbit/s; at most a tenth of the link. 0: 1 % "
        "of the link, at least 1000.",
    ),
]


# The XML-RPC control plane (virtmanserver) and what create_image_target may export.
api_opts = [
    cfg.HostAddressOpt(
        "listen_host",
        help="XML-RPC address. Unset: host_ip (this node's own address). 0.0.0.0 or :: "
        "(every interface) only when set explicitly.",
    ),
    cfg.PortOpt("listen_port", default=7774, help="XML-RPC port (path /RPC2)."),
    cfg.StrOpt(
        "auth_strategy",
        default="token",
        choices=[
            ("token", "callers send api_token in the X-Auth-Token header"),
            (
                "noauth",
                "no authentication: anyone who reaches listen_port controls the node "
                "(closed test networks only; logged as a warning at every start)",
            ),
        ],
        help="How XML-RPC callers are authenticated. With token, virtmanserver refuses to "
        "start without api_token.",
    ),
    cfg.StrOpt(
        "api_token",
        secret=True,
        help="The secret XML-RPC callers send in the X-Auth-Token header "
        "(auth_strategy = token). Ignored with noauth.",
    ),
    cfg.IntOpt(
        "max_request_bytes",
        default=1 << 20,
        min=1024,
        help="Largest XML-RPC request body, in bytes; a larger Content-Length is answered "
        "413 without reading the body.",
    ),
    cfg.FloatOpt(
        "request_timeout",
        default=5.0,
        min=0.1,
        max=300,
        help="Seconds a client has to send a whole request (TLS handshake, headers and body) "
        "after connecting, and to take the answer; a slower connection is closed.",
    ),
    cfg.IntOpt(
        "rpc_workers",
        default=16,
        min=1,
        max=256,
        help="Threads that run XML-RPC calls. Requests are read by one I/O thread and only "
        "complete, authenticated ones reach a worker; when all are busy (e.g. long creates) "
        "further complete requests wait for one.",
    ),
    cfg.IntOpt(
        "max_connections",
        default=512,
        min=4,
        max=16384,
        help="Open XML-RPC connections at most (being read, waiting for or in a call); a "
        "connection beyond it is answered 503 and closed. Keep it below the process's "
        "open-file limit.",
    ),
    cfg.IntOpt(
        "max_connections_per_peer",
        default=64,
        min=1,
        max=16384,
        help="Open XML-RPC connections at most from one client address, so that one host "
        "cannot take all of max_connections; one more is answered 503 and closed.",
    ),
    cfg.StrOpt(
        "tls_cert_file",
        help="PEM certificate (chain) of the XML-RPC server: set with tls_key_file to serve "
        "https only. Unset (both): plain http.",
    ),
    cfg.StrOpt("tls_key_file", help="PEM private key of tls_cert_file."),
    cfg.ListOpt(
        "image_dirs",
        help="Directories whose regular files create_image_target may export (real paths: "
        "a symlink or '..' leading out is refused). Default: <state_dir>/images.",
    ),
    cfg.ListOpt(
        "image_block_devices",
        default=[],
        help="Block devices create_image_target may export, each named explicitly "
        "(e.g. /dev/vg0/image1). Default: none.",
    ),
]


# one list: vmt-initenv.py writes every option of it
default_opts += api_opts + guest_opts + zvm_opts


def list_opts() -> list[tuple[str | None, list[cfg.Opt]]]:
    return [("DEFAULT", [*default_opts, bus.transport_url_sample_opt()]), ("vcenter", vcenter_opts)]


CONF.register_opts(default_opts)
CONF.register_opts(vcenter_opts, group="vcenter")
# [DEFAULT] transport_url (oslo.messaging's own option): the control bus, docs/bus.rst.
# Unset: no bus, parent changes arrive with the heartbeats only.
bus.register_transport_url(CONF)


@dataclass(frozen=True)
class Settings:
    host_ip: str
    master_url: str
    master_token: str | None
    heartbeat_interval: float
    state_dir: Path
    cache_dir: Path
    instances_dir: Path
    run_dir: Path
    iscsi_port: int = 3260
    nbd_port: int = 10809
    tgt_control_port: int = 3260
    iqn_prefix: str = "iqn.2010-10.org.openstack:"
    chap_user: str | None = None
    chap_password: str | None = None
    nbd_psk_file: Path | None = None
    insecure_targets: bool = False
    parent_wait_timeout: float = 600.0
    degraded_retry_min: float = 5.0
    degraded_retry_max: float = 300.0
    daemon_check_interval: float = 2.0
    parent_check_interval: float = 0.5
    nbd_reconnect_delay: int = 1
    qemu_fuse_readahead_kib: int = 4096
    qemu_malloc_mmap_threshold_kib: int = 32768
    prefetch_dir: Path | None = None
    prefetch_depth: int = 2
    prefetch_pause_ms: int = 0
    dm_cache_device: str | None = None
    dm_cache_size_mib: int = 10240
    dm_relay: str = "lio"
    dm_image_port: int = 0
    dm_nbd_relay: bool = False
    dm_no_path_retry: int = 30
    dm_cow_percent: int = 110
    master_ca_file: str | None = None
    transport_url: str | None = None
    # The node daemon's own port on host_ip (virtmanserver's XML-RPC), announced in the
    # heartbeats for Volt's liveness probe (docs/bus.rst); None: announced not (Nova's
    # in-process Virtman has no server).
    api_port: int | None = None

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts, host_ip: str) -> Settings:
        state = Path(conf.state_dir)
        return cls(
            host_ip=host_ip,
            master_url=",".join(conf.master_url or [])
            or f"http://{_url_host(conf.master_ip)}:{conf.master_port}",
            master_token=conf.master_token,
            master_ca_file=conf.master_ca_file,
            transport_url=conf.transport_url or None,
            heartbeat_interval=conf.heartbeat_interval,
            state_dir=state,
            cache_dir=Path(conf.cache_dir) if conf.cache_dir else state / "cache",
            instances_dir=Path(conf.instances_dir) if conf.instances_dir else state / "instances",
            run_dir=Path(conf.run_dir),
            iscsi_port=conf.iscsi_port,
            nbd_port=conf.nbd_port,
            tgt_control_port=conf.tgt_control_port,
            iqn_prefix=conf.iqn_prefix,
            chap_user=conf.chap_user,
            chap_password=conf.chap_password,
            nbd_psk_file=Path(conf.nbd_psk_file) if conf.nbd_psk_file else None,
            insecure_targets=conf.insecure_targets,
            parent_wait_timeout=conf.parent_wait_timeout,
            degraded_retry_min=conf.degraded_retry_min,
            degraded_retry_max=conf.degraded_retry_max,
            daemon_check_interval=conf.daemon_check_interval,
            parent_check_interval=conf.parent_check_interval,
            nbd_reconnect_delay=conf.nbd_reconnect_delay,
            qemu_fuse_readahead_kib=conf.qemu_fuse_readahead_kib,
            qemu_malloc_mmap_threshold_kib=conf.qemu_malloc_mmap_threshold_kib,
            prefetch_dir=Path(conf.prefetch_dir) if conf.prefetch_dir else None,
            prefetch_depth=conf.prefetch_depth,
            prefetch_pause_ms=conf.prefetch_pause_ms,
            dm_cache_device=conf.dm_cache_device,
            dm_cache_size_mib=conf.dm_cache_size_mib,
            dm_relay=conf.dm_relay,
            dm_image_port=conf.dm_image_port,
            dm_nbd_relay=conf.dm_nbd_relay,
            dm_no_path_retry=conf.dm_no_path_retry,
            dm_cow_percent=conf.dm_cow_percent,
        )


def _url_host(host: str) -> str:
    return values.bracket(host)


def default_config_files(openstack_compatible: bool) -> list[str]:
    """The original's files: Nova's and virtman's in OpenStack mode, virtman's otherwise
    (those that exist; oslo's usual search path first)."""
    wanted = ["/etc/nova/nova.conf"] if openstack_compatible else []
    wanted += cfg.find_config_files(project="virtman") or ["/etc/virtman/virtman.conf"]
    return [f for f in wanted if os.path.exists(f)]


def load(
    argv: Sequence[str] = (),
    *,
    openstack_compatible: bool = False,
    config_files: Sequence[str] | None = None,
    prog: str = "virtman",
) -> None:
    """Parse the configuration into ``CONF`` (once per process: a second call is a no-op,
    e.g. inside Nova, whose own options are parsed already)."""
    from oslo_log import log as oslo_logging

    try:
        oslo_logging.register_options(CONF)
    except cfg.ArgsAlreadyParsedError:
        return
    files = list(config_files) if config_files is not None else None
    CONF(
        list(argv),
        project="virtman",
        prog=prog,
        default_config_files=files or default_config_files(openstack_compatible),
    )
    if CONF.log_file:  # a fresh node has no log folder yet
        log_dir = Path(CONF.log_dir or "") / Path(CONF.log_file).parent
        log_dir.mkdir(parents=True, exist_ok=True)
    oslo_logging.setup(CONF, "virtman")


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
    raise ValueError("cannot detect host_ip (no default route): set host_ip")


def settings_from_conf() -> Settings:
    """``Settings`` from the parsed ``CONF``; ``ValueError`` if they do not hold together."""
    settings = Settings.from_conf(CONF, CONF.host_ip or detect_host_ip())
    if settings.degraded_retry_max < settings.degraded_retry_min:
        raise ValueError("degraded_retry_max must be at least degraded_retry_min")
    check_data_plane(settings, CONF.driver)
    return settings


def announced_api_port(listen_host: str | None, host_ip: str, listen_port: int) -> int | None:
    """The port virtmanserver announces to Volt (heartbeat ``api_port``): ``listen_port``
    when the server listens on ``host_ip`` (``listen_host`` unset, that address, or every
    interface), where Volt probes it; None otherwise (Volt then never takes the node for
    repairing)."""
    if not 1 <= listen_port <= 65535:
        return None
    if not listen_host or _is_unspecified(listen_host):
        return listen_port
    try:
        same = ipaddress.ip_address(listen_host) == ipaddress.ip_address(host_ip)
    except ValueError:
        same = listen_host.lower() == host_ip.lower()
    return listen_port if same else None


def _is_unspecified(host: str) -> bool:
    """0.0.0.0 or ::; a host name is not (whoever connects resolves it)."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def check_data_plane(settings: Settings, driver: str) -> None:
    """Refuse (``ValueError``) a node that would serve unauthenticated targets or NBD
    exports without ``insecure_targets``; with it, log a WARNING naming what is open."""
    if bool(settings.chap_user) != bool(settings.chap_password):
        raise ValueError("set both chap_user and chap_password, or neither")
    if _is_unspecified(settings.host_ip):
        raise ValueError(
            f"host_ip {settings.host_ip} is not an address: the targets and the NBD server "
            "listen on host_ip, set this node's own address"
        )
    if settings.nbd_psk_file is not None:
        try:
            read_psk(settings.nbd_psk_file)
        except InvalidArgument as exc:
            raise ValueError(str(exc)) from None
    serves_nbd = driver == "qemu" or (driver == "dm" and settings.dm_nbd_relay)
    missing: list[tuple[str, str]] = []
    if not settings.chap_user:
        missing.append(("chap_user/chap_password", "iSCSI targets without CHAP"))
    if serves_nbd and settings.nbd_psk_file is None:
        missing.append(("nbd_psk_file", "NBD exports without TLS"))
    if not missing:
        return
    if not settings.insecure_targets:
        options = " and ".join(option for option, _ in missing)
        raise ValueError(
            f"refusing to serve unauthenticated targets: set {options} (vmt-initenv.py "
            "generates them), or insecure_targets = true to serve them without"
        )
    LOG.warning(
        "insecure_targets = true: serving %s; anyone who reaches this node reads its images",
        " and ".join(what for _, what in missing),
    )
