"""The WSGI application of the z/VM-shaped API: the connector's routes, bodies and reply
envelope ``{"overallRC", "rc", "rs", "modID", "output", "errmsg"}`` (docs/zvm-api.rst).

Every request is authenticated first (``TokenAuth``; ``/token`` is the handshake), then
its path parameters, query and body are checked field by field (``validate``) before
anything on the node changes. Guest verbs call only ``GuestBackend``; images go through the
``Catalogue``; network interfaces are recorded in the ``Store``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from virtman.errors import GuestNotFound, InvalidInput
from virtman.zvm import validate as v
from virtman.zvm.auth import TokenAuth
from virtman.zvm.backend import GuestBackend
from virtman.zvm.envelope import (
    MOD_FILE,
    MOD_GUEST,
    MOD_IMAGE,
    MOD_NETWORK,
    MOD_VOLUME,
    ApiError,
    envelope,
    error_of,
    failure,
    not_supported,
    request_error,
)
from virtman.zvm.images import Catalogue
from virtman.zvm.peer import PeerUids
from virtman.zvm.store import Store

LOG = logging.getLogger(__name__)

NIC_BASE, NIC_STEP = 0x1000, 3  # the connector's default NIC vdevs: 1000, 1003, ...
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}
VERSION = {"api_version": "1.0", "min_version": "1.0", "max_version": "1.0", "version": "1.6.3"}
GUEST_ACTIONS = {"start", "stop", "softstop", "pause", "unpause", "reboot", "reset"}
GUEST_ACTIONS_NOT_HERE = {
    "live_migrate_vm",
    "register_vm",
    "deregister_vm",
    "live_resize_cpus",
    "resize_cpus",
    "live_resize_mem",
    "resize_mem",
    "grow_root_volume",
}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any  # parsed JSON, or None without a body
    params: dict[str, str]
    environ: dict[str, Any]

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        if values is None:
            return None
        if len(values) != 1:
            raise InvalidInput(name, values, "give it once")
        return values[0]

    def only_query(self, *names: str) -> None:
        unknown = sorted(set(self.query) - set(names))
        if unknown:
            raise InvalidInput("query", unknown, f"unknown parameters (allowed: {names or '-'})")

    def no_body(self) -> None:
        if self.body not in (None, {}):
            raise InvalidInput("body", self.body, "this request takes no body")


Handler = Callable[["ZvmApi", Request], Any]


class ZvmApi:
    def __init__(
        self,
        backend: GuestBackend | None,
        catalogue: Catalogue,
        store: Store,
        *,
        auth: TokenAuth | None,
        disk_dir: Path,
        bridge: str = "virbr0",
        max_request_bytes: int = 1 << 20,
        host_info: Callable[[], dict[str, Any]] | None = None,
        peers: PeerUids | None = None,
    ) -> None:
        """``backend`` None: the guest manager is not available (guest verbs answer 501);
        ``host_info`` then answers ``host_get_info``. ``auth`` None: noauth. ``peers``: a
        loopback caller running as one of its uids needs no token (``zvm_api_auth = peer-uid``,
        for Nova's zvm driver, which sends none)."""
        self.backend = backend
        self.catalogue = catalogue
        self.store = store
        self.auth = auth
        self.disk_dir = disk_dir
        self.bridge = bridge
        self.max_request_bytes = max_request_bytes
        self.host_info = host_info
        self.peers = peers

    # -- WSGI --------------------------------------------------------------------------------
    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        headers: list[tuple[str, str]] = []
        try:
            status, output, headers = self._handle(environ, method, path)
            body = envelope(output)
        except ApiError as err:
            status, headers = err.status, err.headers
            body = failure(err)
            log = LOG.warning if err.status < 500 else LOG.error
            log("z/VM API: %s %s -> %d: %s", method, path[:120], err.status, err.errmsg)
        except Exception as exc:  # a bug of ours: answered in the envelope, logged whole
            LOG.exception("z/VM API: %s %s failed", method, path[:120])
            status, headers = 500, []
            why = f"Unexpected internal error: {type(exc).__name__}: {exc}"
            body = failure(ApiError(500, 500, 500, 1, None, why))
        data = json.dumps(body).encode()
        start_response(
            f"{status} {REASONS.get(status, 'Error')}",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(data))),
                ("Cache-Control", "no-cache"),
                *headers,
            ],
        )
        return [data]

    def _handle(
        self, environ: dict[str, Any], method: str, path: str
    ) -> tuple[int, Any, list[tuple[str, str]]]:
        handlers, params = match(path)
        if handlers is None:
            raise request_error(404, f"The resource could not be found: {path[:120]}")
        if path == "/token":
            if method != "POST":
                raise _not_allowed(["POST"])
            return self._token(environ)
        if self.auth is not None and not self._authorized(environ):
            raise request_error(401, "Not authorized to execute (X-Auth-Token missing or wrong)")
        handler = handlers.get(method)
        if handler is None:
            raise _not_allowed(sorted(handlers))
        request = Request(method, path, _query(environ), self._body(environ), params, environ)
        try:
            return 200, handler(self, request), []
        except ApiError:
            raise
        except Exception as exc:
            mapped = error_of(exc)
            if mapped is None:
                raise
            raise mapped from None

    def _authorized(self, environ: dict[str, Any]) -> bool:
        assert self.auth is not None
        if self.auth.check(environ.get("HTTP_X_AUTH_TOKEN")):
            return True
        return self.peers is not None and self.peers.allows(
            environ.get("vmt.peer"), environ.get("vmt.local")
        )

    def _token(self, environ: dict[str, Any]) -> tuple[int, Any, list[tuple[str, str]]]:
        if self.auth is None:
            return 200, None, [("X-Auth-Token", "server-auth-closed")]
        token = self.auth.issue(environ.get("HTTP_X_ADMIN_TOKEN"))
        if token is None:
            raise request_error(401, "Not authorized to execute (X-Admin-Token missing or wrong)")
        return 200, None, [("X-Auth-Token", token)]

    def _body(self, environ: dict[str, Any]) -> Any:
        length_text = environ.get("CONTENT_LENGTH") or "0"
        if not length_text.isascii() or not length_text.isdigit():
            raise request_error(
                400, f"content-length header must be an integer: {length_text!r:.40}"
            )
        length = int(length_text)
        if length > self.max_request_bytes:
            raise request_error(
                413, f"body of {length} bytes (max_request_bytes {self.max_request_bytes})"
            )
        if length == 0:
            return None
        try:
            raw = environ["wsgi.input"].read(length)
        except OSError as exc:  # e.g. the client stalled past request_timeout
            raise request_error(400, f"body not received: {exc}") from None
        if len(raw) != length:
            raise request_error(400, f"body of {len(raw)} bytes, Content-Length {length}")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise request_error(400, f"Malformed JSON: {exc}") from None

    # -- helpers -----------------------------------------------------------------------------
    def guests(self) -> GuestBackend:
        if self.backend is None:
            raise not_supported("guests (the guest manager is not running on this node)", MOD_GUEST)
        return self.backend

    def known(self, userid: str) -> str:
        """``userid`` if the guest exists (``GuestNotFound`` otherwise)."""
        if userid not in self.guests().list():
            raise GuestNotFound(userid)
        return userid

    def diskpool(self) -> dict[str, int]:
        where = self.disk_dir
        while not where.exists() and where != where.parent:  # the cache dir is made later
            where = where.parent
        usage = shutil.disk_usage(where)
        gib = 1 << 30
        return {
            "disk_total": usage.total // gib,
            "disk_used": (usage.total - usage.free) // gib,
            "disk_available": usage.free // gib,
        }


def _not_allowed(methods: list[str]) -> ApiError:
    err = request_error(405, "The method specified is not allowed for this resource.")
    err.headers = [("Allow", ", ".join(methods))]
    return err


def _query(environ: dict[str, Any]) -> dict[str, list[str]]:
    text = environ.get("QUERY_STRING", "")
    try:
        return parse_qs(text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=16)
    except ValueError as exc:
        raise request_error(400, f"bad query string: {exc}") from None


# -- guests ----------------------------------------------------------------------------------
def guest_list(api: ZvmApi, req: Request) -> Any:
    req.only_query()
    req.no_body()
    return api.guests().list()


def guest_create(api: ZvmApi, req: Request) -> Any:
    req.only_query()
    body = v.fields(req.body, "body", {"guest"}, {"guest"})
    guest = v.fields(
        body["guest"],
        "guest",
        {
            "userid",
            "vcpus",
            "memory",
            "disk_list",
            "user_profile",
            "max_cpu",
            "max_mem",
            "ipl_from",
            "ipl_param",
            "ipl_loadparam",
            "dedicate_vdevs",
            "loaddev",
            "account",
            "comments",
            "cschedule",
            "cshare",
            "rdomain",
            "pcif",
        },
        {"userid", "vcpus", "memory"},
    )
    userid = v.userid(guest["userid"])
    vcpus = v.integer(guest["vcpus"], "vcpus", 1, v.MAX_VCPUS)
    memory = v.integer(guest["memory"], "memory", 1, v.MAX_MEMORY_MB)
    for key in ("ipl_from", "ipl_param", "ipl_loadparam", "account", "user_profile"):
        value = guest.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > 255):
            raise InvalidInput(key, value, "must be a string of at most 255 characters")
    if guest.get("max_cpu") is not None:
        v.integer(guest["max_cpu"], "max_cpu", vcpus, 64)
    v.optional(guest, "max_mem", v.text, "max_mem", v.MAX_MEM)
    for key in ("cschedule", "cshare", "rdomain", "pcif"):
        v.optional(guest, key, v.text, key, v.WORD)
    comments = guest.get("comments")
    if comments is not None and (
        not isinstance(comments, list)
        or len(comments) > 16
        or not all(isinstance(c, str) and len(c) <= 255 for c in comments)
    ):
        raise InvalidInput("comments", comments, "must be at most 16 strings of 255")
    if guest.get("loaddev") is not None:
        raise not_supported("guest_create with loaddev (SCSI IPL)", MOD_GUEST)
    if guest.get("dedicate_vdevs"):
        raise not_supported("guest_create with dedicate_vdevs", MOD_GUEST)
    disks = guest.get("disk_list") or []
    if not isinstance(disks, list) or len(disks) > 16:
        raise InvalidInput("disk_list", disks, "must be a list of at most 16 disks")
    disk_gb = 0
    for index, disk in enumerate(disks):
        disk = v.fields(
            disk, "disk_list", {"size", "format", "is_boot_disk", "vdev", "disk_pool"}, {"size"}
        )
        size = v.disk_gb(disk["size"], "disk_list.size")
        boot = v.optional(disk, "is_boot_disk", v.boolean, "is_boot_disk")
        if disk.get("format") not in (None, "ext2", "ext3", "ext4", "xfs", "swap", "none"):
            raise InvalidInput("format", disk.get("format"), "ext2 ext3 ext4 xfs swap or none")
        v.optional(disk, "vdev", v.vdev)
        v.optional(disk, "disk_pool", v.text, "disk_pool", v.POOL)
        if boot or (index == 0 and disk_gb == 0):
            disk_gb = size
    api.guests().create(userid, vcpus=vcpus, memory_mb=memory, disk_gb=disk_gb)
    return {"userid": userid, "vcpus": vcpus, "memory": memory, "disk_gb": disk_gb}


def guest_get(api: ZvmApi, req: Request) -> Any:
    req.only_query()
    req.no_body()
    xml = api.guests().definition(v.userid(req.params["userid"]))
    return {"user_direct": xml.splitlines()}


def guest_delete(api: ZvmApi, req: Request) -> Any:
    req.only_query()
    req.no_body()
    userid = v.userid(req.params["userid"])
    api.guests().delete(userid)
    api.store.drop("nics", userid)
    return None


def guest_action(api: ZvmApi, req: Request) -> Any:
    req.only_query()
    userid = v.userid(req.params["userid"])
    body = req.body
    if not isinstance(body, dict) or not isinstance(body.get("action"), str):
        raise InvalidInput("action", body, "the body must be {'action': <name>, ...}")
    action = body["action"]
    guests = api.guests()
    if action in ("start", "pause", "unpause", "reboot", "reset", "get_console_output"):
        allowed = {"action", "timeout"} if action == "start" else {"action"}
        body = v.fields(body, "body", allowed)
        v.optional(body, "timeout", v.integer, "timeout", 0, v.MAX_WAIT_S)
        if action == "get_console_output":
            return guests.console_output(userid)
        getattr(guests, action)(userid)
        return None
    if action in ("stop", "softstop"):
        body = v.fields(body, "body", {"action", "userid", "timeout", "poll_interval"})
        if body.get("userid") is not None and v.userid(body["userid"]) != userid:
            raise InvalidInput("userid", body["userid"], "differs from the path's userid")
        timeout = v.optional(body, "timeout", v.integer, "timeout", 0, v.MAX_WAIT_S)
        poll = v.optional(body, "poll_interval", v.integer, "poll_interval", 0, v.MAX_WAIT_S)
        if action == "stop":
            guests.stop(userid)
        else:
            guests.softstop(
                userid,
                timeout_s=300.0 if timeout is None else float(timeout),
                poll_interval_s=10.0 if not poll else float(poll),
            )
        return None
    if action == "deploy":
        body = v.fields(
            body,
            "body",
            {
                "action",
                "image",
                "transportfiles",
                "remotehost",
                "vdev",
                "hostname",
                "skipdiskcopy",
            },
            {"image"},
        )
        name = body["image"]
        api.catalogue.target_of(name)  # an imported image, or ImageNotFound
        if body.get("transportfiles") is not None and not isinstance(body["transportfiles"], str):
            raise InvalidInput("transportfiles", body["transportfiles"], "must be a path")
        v.optional(body, "remotehost", v.text, "remotehost", v.REMOTE_HOST)
        v.optional(body, "vdev", v.vdev)
        v.optional(body, "hostname", v.text, "hostname", v.HOSTNAME)
        if v.optional(body, "skipdiskcopy", v.boolean, "skipdiskcopy"):
            raise InvalidInput(
                "skipdiskcopy", body["skipdiskcopy"], "a deploy always builds the root disk"
            )
        guests.deploy(userid, name)
        return None
    if action == "capture":
        body = v.fields(
            body, "body", {"action", "image", "capture_type", "compress_level"}, {"image"}
        )
        if body.get("capture_type") not in (None, "rootonly"):
            if body["capture_type"] == "alldisks":
                raise not_supported("capture of all disks (a guest here has one)", MOD_GUEST)
            raise InvalidInput("capture_type", body["capture_type"], "rootonly or alldisks")
        v.optional(body, "compress_level", v.integer, "compress_level", 0, 9)  # raw: unused
        api.catalogue.capture(body["image"], userid, guests.capture)
        return None
    if action in GUEST_ACTIONS_NOT_HERE:
        raise not_supported(f"guest action {action}", MOD_GUEST)
    raise InvalidInput("action", action, "unknown action")


def guest_power_state(api: ZvmApi, req: Request) -> Any:
    req.only_query()
    req.no_body()
    return api.guests().power_state(v.userid(req.params["userid"]))


def guest_info(api: ZvmApi, req: Request) -> Any:
    req.only_query()
    req.no_body()
    return api.guests().info(v.userid(req.params["userid"]))


def guest_user_direct(api: ZvmApi, req: Request) -> Any:
    return guest_get(api, req)


def guest_stats(api: ZvmApi, req: Request) -> Any:
    req.only_query("userid")
    req.no_body()
    ids = v.userids(req.arg("userid"))
    return {u: api.guests().stats(u) for u in ids}


def guest_vnics(api: ZvmApi, req: Request) -> Any:
    req.only_query("userid")
    req.no_body()
    ids = v.userids(req.arg("userid"))
    return {u: api.guests().stats(u).get("nics", []) for u in ids}


def guest_disks_config(api: ZvmApi, req: Request) -> Any:
    """guest_config_minidisks: the root disk is the guest's VMThunder snapshot and data
    disks are formatted by the guest itself; nothing to do on a KVM host (checked, kept)."""
    req.only_query()
    userid = v.userid(req.params["userid"])
    body = v.fields(req.body, "body", {"disk_info"}, {"disk_info"})
    info = v.fields(body["disk_info"], "disk_info", {"disk_list"})
    disks = info.get("disk_list") or []
    if not isinstance(disks, list) or len(disks) > 16:
        raise InvalidInput("disk_list", disks, "must be a list of at most 16 disks")
    for disk in disks:
        disk = v.fields(disk, "disk_list", {"vdev", "format", "mntdir", "size"}, {"format"})
        if disk["format"] not in ("ext2", "ext3", "ext4", "xfs", "swap", "none"):
            raise InvalidInput("format", disk["format"], "ext2 ext3 ext4 xfs swap or none")
        v.optional(disk, "vdev", v.vdev)
        v.optional(disk, "size", v.disk_gb)
        mntdir = disk.get("mntdir")
        if mntdir is not None and (not isinstance(mntdir, str) or not mntdir.startswith("/")):
            raise InvalidInput("mntdir", mntdir, "must be an absolute path")
    api.known(userid)
    return None


# -- network interfaces (recorded on the bridge zvm_bridge) -----------------------------------
NETWORK_KEYS = {
    "ip_addr", "dns_addr", "gateway_addr", "mac_addr", "cidr", "nic_vdev", "nic_id",
    "osa_device", "hostname",
}  # fmt: skip


def _network(item: object) -> dict[str, Any]:
    net = v.fields(item, "guest_networks", NETWORK_KEYS)
    out: dict[str, Any] = {}
    if net.get("ip_addr") is not None:
        out["ip_addr"] = v.ipv4(net["ip_addr"], "ip_addr")
        if net.get("cidr") is None:
            raise InvalidInput("cidr", None, "required with ip_addr")
    if net.get("cidr") is not None:
        out["cidr"] = v.cidr(net["cidr"])
    if net.get("gateway_addr") is not None:
        out["gateway_addr"] = v.ipv4(net["gateway_addr"], "gateway_addr")
    dns = net.get("dns_addr")
    if dns is not None:
        if not isinstance(dns, list) or len(dns) > 8:
            raise InvalidInput("dns_addr", dns, "must be a list of at most 8 IPv4 addresses")
        out["dns_addr"] = [v.ipv4(d, "dns_addr") for d in dns]
    if net.get("mac_addr") is not None:
        out["mac_addr"] = v.mac(net["mac_addr"])
    if net.get("nic_vdev") is not None:
        out["vdev"] = v.vdev(net["nic_vdev"], "nic_vdev")
    if net.get("nic_id") is not None:
        if not isinstance(net["nic_id"], str) or len(net["nic_id"]) > 64:
            raise InvalidInput("nic_id", net["nic_id"], "must be a string of at most 64")
        out["nic_id"] = net["nic_id"]
    if net.get("osa_device") is not None:
        raise not_supported("guest_networks with osa_device", MOD_NETWORK)
    v.optional(net, "hostname", v.text, "hostname", v.HOSTNAME)
    return out


def _add_nics(api: ZvmApi, userid: str, nics: list[dict[str, Any]]) -> dict[str, Any]:
    with api.store.lock:
        recorded: dict[str, Any] = api.store.get("nics", userid) or {}
        wanted = [n["vdev"] for n in nics if "vdev" in n]
        if len(set(wanted)) != len(wanted) or set(wanted) & set(recorded):
            raise ApiError(
                409,
                409,
                409,
                6,
                MOD_NETWORK,
                f"Failed to create nic for guest {userid}, error: vdev already in use",
            )
        taken = set(recorded) | set(wanted)
        for nic in nics:
            if "vdev" not in nic:
                number = NIC_BASE
                while f"{number:04X}" in taken:
                    number += NIC_STEP
                nic["vdev"] = f"{number:04X}"
                taken.add(nic["vdev"])
            recorded[nic["vdev"]] = {**nic, "bridge": api.bridge}
        api.store.put("nics", userid, recorded)
    return recorded


def guest_create_interface(api: ZvmApi, req: Request) -> Any:
    req.only_query()
    userid = v.userid(req.params["userid"])
    body = v.fields(req.body, "body", {"interface"}, {"interface"})
    iface = v.fields(
        body["interface"],
        "interface",
        {"os_version", "guest_networks", "active"},
        {"os_version", "guest_networks"},
    )
    v.os_version(iface["os_version"])
    v.optional(iface, "active", v.boolean, "active")
    networks = iface["guest_networks"]
    if not isinstance(networks, list) or len(networks) > 8:
        raise InvalidInput("guest_networks", networks, "must be a list of at most 8 networks")
    nics = [_network(n) for n in networks]
    api.known(userid)
    return _add_nics(api, userid, nics)


def guest_delete_interface(api: ZvmApi, req: Request) -> Any:
    req.only_query()
    userid = v.userid(req.params["userid"])
    body = v.fields(req.body, "body", {"interface"}, {"interface"})
    iface = v.fields(
        body["interface"], "interface", {"os_version", "vdev", "active"}, {"os_version", "vdev"}
    )
    v.os_version(iface["os_version"])
    v.optional(iface, "active", v.boolean, "active")
    _drop_nic(api, userid, v.vdev(iface["vdev"]))
    return None


def guest_create_nic(api: ZvmApi, req: Request) -> Any:
    req.only_query()
    userid = v.userid(req.params["userid"])
    body = v.fields(req.body, "body", {"nic"}, {"nic"})
    nic_in = v.fields(body["nic"], "nic", {"vdev", "nic_id", "mac_addr", "active"})
    nic: dict[str, Any] = {}
    if nic_in.get("vdev") is not None:
        nic["vdev"] = v.vdev(nic_in["vdev"])
    if nic_in.get("mac_addr") is not None:
        nic["mac_addr"] = v.mac(nic_in["mac_addr"])
    if nic_in.get("nic_id") is not None:
        if not isinstance(nic_in["nic_id"], str) or len(nic_in["nic_id"]) > 64:
            raise InvalidInput("nic_id", nic_in["nic_id"], "must be a string of at most 64")
        nic["nic_id"] = nic_in["nic_id"]
    v.optional(nic_in, "active", v.boolean, "active")
    api.known(userid)
    _add_nics(api, userid, [nic])
    return nic["vdev"]


def guest_delete_nic(api: ZvmApi, req: Request) -> Any:
    req.only_query()
    userid = v.userid(req.params["userid"])
    body = v.fields(req.body or {}, "body", {"active"})
    v.optional(body, "active", v.boolean, "active")
    _drop_nic(api, userid, v.vdev(req.params["vdev"]))
    return None


def _drop_nic(api: ZvmApi, userid: str, vdev: str) -> None:
    api.known(userid)
    with api.store.lock:
        recorded = api.store.get("nics", userid) or {}
        if vdev not in recorded:
            raise ApiError(
                404, 404, 404, 1, MOD_NETWORK, f"NIC {vdev} of guest '{userid}' does not exist."
            )
        del recorded[vdev]
        if recorded:
            api.store.put("nics", userid, recorded)
        else:
            api.store.drop("nics", userid)


def guest_adapters(api: ZvmApi, req: Request) -> Any:
    req.only_query()
    req.no_body()
    userid = api.known(v.userid(req.params["userid"]))
    nics = api.store.get("nics", userid) or {}
    return {"adapters": [{"adapter_address": k, **n} for k, n in sorted(nics.items())]}


def guests_nic_info(api: ZvmApi, req: Request) -> Any:
    req.only_query("userid", "nic_id", "vswitch")
    req.no_body()
    wanted = v.optional({"u": req.arg("userid")}, "u", v.userid)
    nic_id = req.arg("nic_id")
    bridge = req.arg("vswitch")
    rows = []
    for userid, nics in sorted(api.store.all("nics").items()):
        for vdev, nic in sorted(nics.items()):
            row = {
                "userid": userid,
                "interface": vdev,
                "switch": nic.get("bridge"),
                "port": nic.get("nic_id"),
                "comments": None,
            }
            if wanted not in (None, userid) or nic_id not in (None, nic.get("nic_id")):
                continue
            if bridge not in (None, nic.get("bridge")):
                continue
            rows.append(row)
    return rows


# -- host --------------------------------------------------------------------------------------
def host_info(api: ZvmApi, req: Request) -> Any:
    req.only_query()
    req.no_body()
    if api.backend is not None:
        return api.backend.host_info()
    if api.host_info is None:
        raise not_supported("host_get_info without a guest manager", MOD_GUEST)
    return api.host_info()


def host_diskpool(api: ZvmApi, req: Request) -> Any:
    req.only_query("poolname")
    req.no_body()
    name = req.arg("poolname")
    if name is not None:
        v.text(name, "poolname", v.POOL)
    return api.diskpool()


def version(api: ZvmApi, req: Request) -> Any:
    req.only_query()
    return VERSION


def healthy(api: ZvmApi, req: Request) -> Any:
    req.only_query()
    return {"SMAPI": "healthy (no z/VM here: the VMThunder node answers)"}


# -- images ------------------------------------------------------------------------------------
def image_import(api: ZvmApi, req: Request) -> Any:
    req.only_query()
    body = v.fields(req.body, "body", {"image"}, {"image"})
    image = v.fields(
        body["image"],
        "image",
        {"image_name", "url", "image_meta", "remote_host"},
        {"image_name", "url", "image_meta"},
    )
    meta = v.fields(
        image["image_meta"], "image_meta", {"os_version", "md5sum", "disk_type"}, {"os_version"}
    )
    v.os_version(meta["os_version"])
    md5 = meta.get("md5sum")
    if md5 is not None and (
        not isinstance(md5, str)
        or len(md5) != 32
        or not all(c in "0123456789abcdefABCDEF" for c in md5)
    ):
        raise InvalidInput("md5sum", md5, "must be 32 hexadecimal digits")
    if meta.get("disk_type") not in (None, "DASD", "dasd", "SCSI", "scsi"):
        raise InvalidInput("disk_type", meta["disk_type"], "DASD or SCSI")
    if image.get("remote_host") is not None:
        v.text(image["remote_host"], "remote_host", v.REMOTE_HOST)
        # Nova's zvm driver always names itself (user@my_ip); a nova-compute on this node
        # hands a local file: that is a local import. Another host's file is not fetched.
        if not is_this_host(image["remote_host"]):
            raise not_supported("image_import from a remote_host", MOD_IMAGE)
    api.catalogue.import_(image["image_name"], image["url"], meta)
    return None


def is_this_host(remote_host: str) -> bool:
    """``user@address`` names an address of this host (a bind to it succeeds; nothing is
    sent). Host names are not resolved: only addresses count."""
    try:
        address = ipaddress.ip_address(remote_host.rpartition("@")[2])
    except ValueError:
        return False
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


def image_query(api: ZvmApi, req: Request) -> Any:
    req.only_query("imagename")
    req.no_body()
    return api.catalogue.query(req.arg("imagename"))


def image_delete(api: ZvmApi, req: Request) -> Any:
    req.only_query()
    req.no_body()
    api.catalogue.delete(req.params["name"])
    return None


def image_export(api: ZvmApi, req: Request) -> Any:
    req.only_query()
    body = v.fields(req.body, "body", {"location"}, {"location"})
    location = v.fields(body["location"], "location", {"dest_url", "remote_host"}, {"dest_url"})
    if location.get("remote_host") is not None:
        v.text(location["remote_host"], "remote_host", v.REMOTE_HOST)
        raise not_supported("image_export to a remote_host", MOD_IMAGE)
    return api.catalogue.export(req.params["name"], location["dest_url"])


def image_root_disk_size(api: ZvmApi, req: Request) -> Any:
    req.only_query()
    req.no_body()
    return api.catalogue.root_disk_size(req.params["name"])


def _unsupported(what: str, mod: int) -> Handler:
    def handler(api: ZvmApi, req: Request) -> Any:
        raise not_supported(what, mod)

    return handler


FCP = _unsupported("FCP volumes", MOD_VOLUME)
VSWITCH = _unsupported("vswitch administration", MOD_NETWORK)

# One table: path (``{name}`` = one path segment) -> method -> handler.
ROUTES: list[tuple[str, dict[str, Handler]]] = [
    ("/", {"GET": version}),
    ("/token", {"POST": version}),  # answered before routing (the handshake)
    ("/guests", {"GET": guest_list, "POST": guest_create}),
    ("/guests/stats", {"GET": guest_stats}),
    ("/guests/interfacestats", {"GET": guest_vnics}),
    ("/guests/nics", {"GET": guests_nic_info}),
    ("/guests/volumes", {"POST": FCP, "DELETE": FCP}),
    ("/volumes/conn/{userid}", {"GET": FCP}),
    ("/volumes/fcptemplates", {"GET": FCP, "POST": FCP}),
    ("/volumes/fcptemplates/detail", {"GET": FCP}),
    ("/volumes/fcptemplates/{template_id}", {"PUT": FCP, "DELETE": FCP}),
    ("/volumes/fcp/{fcp_id}", {"GET": FCP, "PUT": FCP}),
    ("/volumes/volume_refresh_bootmap", {"PUT": FCP}),
    ("/guests/{userid}", {"GET": guest_get, "DELETE": guest_delete}),
    ("/guests/{userid}/action", {"POST": guest_action}),
    ("/guests/{userid}/power_state", {"GET": guest_power_state}),
    ("/guests/{userid}/power_state_real", {"GET": guest_power_state}),
    ("/guests/{userid}/info", {"GET": guest_info}),
    ("/guests/{userid}/user_direct", {"GET": guest_user_direct}),
    ("/guests/{userid}/adapters", {"GET": guest_adapters}),
    ("/guests/{userid}/nic", {"POST": guest_create_nic}),
    (
        "/guests/{userid}/nic/{vdev}",
        {"DELETE": guest_delete_nic, "PUT": _unsupported("NIC coupling to a vswitch", MOD_NETWORK)},
    ),
    (
        "/guests/{userid}/interface",
        {"POST": guest_create_interface, "DELETE": guest_delete_interface},
    ),
    (
        "/guests/{userid}/disks",
        {
            "POST": _unsupported("minidisk creation", MOD_GUEST),
            "DELETE": _unsupported("minidisk deletion", MOD_GUEST),
            "PUT": guest_disks_config,
        },
    ),
    ("/smapi-healthy", {"GET": healthy}),
    ("/host", {"GET": host_info}),
    ("/host/guests", {"GET": guest_list}),
    ("/host/diskpool", {"GET": host_diskpool}),
    ("/host/diskpool_volumes", {"GET": _unsupported("disk pool volumes", MOD_GUEST)}),
    ("/host/volume", {"GET": _unsupported("host volume info", MOD_GUEST)}),
    ("/host/ssi", {"GET": _unsupported("SSI cluster info", MOD_GUEST)}),
    ("/images", {"GET": image_query, "POST": image_import}),
    ("/images/{name}", {"DELETE": image_delete, "PUT": image_export}),
    ("/images/{name}/root_disk_size", {"GET": image_root_disk_size}),
    (
        "/files",
        {
            "PUT": _unsupported("file import", MOD_FILE),
            "POST": _unsupported("file export", MOD_FILE),
        },
    ),
    ("/vswitches", {"GET": VSWITCH, "POST": VSWITCH}),
    ("/vswitches/{name}", {"GET": VSWITCH, "PUT": VSWITCH, "DELETE": VSWITCH}),
]


def match(path: str) -> tuple[dict[str, Handler] | None, dict[str, str]]:
    """The handlers of ``path`` and its parameters; literal segments win over ``{names}``."""
    parts = path.rstrip("/").split("/") if path != "/" else [""]
    best: tuple[int, dict[str, Handler], dict[str, str]] | None = None
    for template, handlers in ROUTES:
        tparts = template.rstrip("/").split("/") if template != "/" else [""]
        if len(tparts) != len(parts):
            continue
        params: dict[str, str] = {}
        literal = 0
        for want, got in zip(tparts, parts, strict=True):
            if want.startswith("{"):
                if not got:
                    break
                params[want[1:-1]] = got
            elif want != got:
                break
            else:
                literal += 1
        else:
            if best is None or literal > best[0]:
                best = (literal, handlers, params)
    return (None, {}) if best is None else (best[1], best[2])
