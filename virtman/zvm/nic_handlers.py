"""The z/VM API's network interfaces: virtio NICs of the guest on the Linux bridge
``zvm_bridge`` (no vswitch here), vdevs numbered as the connector numbers them. Each is
recorded in the ``Store`` (with the connector's fields) and handed to the guest manager
(``GuestBackend.set_nics``), which puts it in the guest's domain; a NIC given without a MAC
gets a fixed locally administered one (``52:54:00:xx:xx:xx``, QEMU's prefix)."""

from __future__ import annotations

import secrets
from typing import Any

from virtman.errors import InvalidInput
from virtman.zvm import validate as v
from virtman.zvm.envelope import MOD_NETWORK, ApiError, not_supported
from virtman.zvm.request import Context, Request

NIC_BASE, NIC_STEP = 0x1000, 3  # the connector's default NIC vdevs: 1000, 1003, ...

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


def _new_mac() -> str:
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


def _apply(api: Context, userid: str, recorded: dict[str, Any], live: bool) -> None:
    """The guest's domain gets the NICs ``recorded``, then the store does (nothing is
    recorded if the guest manager refuses)."""
    nics = [
        {"vdev": vdev, "bridge": nic["bridge"], "mac_addr": nic["mac_addr"]}
        for vdev, nic in sorted(recorded.items())
    ]
    api.guests().set_nics(userid, nics, live=live)
    if recorded:
        api.store.put("nics", userid, recorded)
    else:
        api.store.drop("nics", userid)


def _add_nics(api: Context, userid: str, nics: list[dict[str, Any]], live: bool) -> dict[str, Any]:
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
            nic.setdefault("mac_addr", _new_mac())
            if nic["mac_addr"] in {n.get("mac_addr") for n in recorded.values()}:
                raise InvalidInput("mac_addr", nic["mac_addr"], "another NIC of the guest has it")
            recorded[nic["vdev"]] = {**nic, "bridge": api.bridge}
        _apply(api, userid, recorded, live)
    return recorded


def guest_create_interface(api: Context, req: Request) -> Any:
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
    live = bool(v.optional(iface, "active", v.boolean, "active"))
    networks = iface["guest_networks"]
    if not isinstance(networks, list) or len(networks) > 8:
        raise InvalidInput("guest_networks", networks, "must be a list of at most 8 networks")
    nics = [_network(n) for n in networks]
    api.known(userid)
    return _add_nics(api, userid, nics, live)


def guest_delete_interface(api: Context, req: Request) -> Any:
    req.only_query()
    userid = v.userid(req.params["userid"])
    body = v.fields(req.body, "body", {"interface"}, {"interface"})
    iface = v.fields(
        body["interface"], "interface", {"os_version", "vdev", "active"}, {"os_version", "vdev"}
    )
    v.os_version(iface["os_version"])
    live = bool(v.optional(iface, "active", v.boolean, "active"))
    _drop_nic(api, userid, v.vdev(iface["vdev"]), live)
    return None


def guest_create_nic(api: Context, req: Request) -> Any:
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
    live = bool(v.optional(nic_in, "active", v.boolean, "active"))
    api.known(userid)
    _add_nics(api, userid, [nic], live)
    return nic["vdev"]


def guest_delete_nic(api: Context, req: Request) -> Any:
    req.only_query()
    userid = v.userid(req.params["userid"])
    body = v.fields(req.body or {}, "body", {"active"})
    live = bool(v.optional(body, "active", v.boolean, "active"))
    _drop_nic(api, userid, v.vdev(req.params["vdev"]), live)
    return None


def _drop_nic(api: Context, userid: str, vdev: str, live: bool) -> None:
    api.known(userid)
    with api.store.lock:
        recorded = api.store.get("nics", userid) or {}
        if vdev not in recorded:
            raise ApiError(
                404, 404, 404, 1, MOD_NETWORK, f"NIC {vdev} of guest '{userid}' does not exist."
            )
        del recorded[vdev]
        _apply(api, userid, recorded, live)


def guest_adapters(api: Context, req: Request) -> Any:
    req.only_query()
    req.no_body()
    userid = api.known(v.userid(req.params["userid"]))
    nics = api.store.get("nics", userid) or {}
    return {"adapters": [{"adapter_address": k, **n} for k, n in sorted(nics.items())]}


def guests_nic_info(api: Context, req: Request) -> Any:
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
