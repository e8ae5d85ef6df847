"""The z/VM API's host verbs (``/host``, the version, health) and image verbs (``/images``,
through the ``Catalogue``)."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from virtman.errors import InvalidInput
from virtman.zvm import validate as v
from virtman.zvm.envelope import MOD_GUEST, MOD_IMAGE, not_supported
from virtman.zvm.request import Context, Request

VERSION = {"api_version": "1.0", "min_version": "1.0", "max_version": "1.0", "version": "1.6.3"}


# -- host --------------------------------------------------------------------------------------
def host_info(api: Context, req: Request) -> Any:
    req.only_query()
    req.no_body()
    if api.backend is not None:
        return api.backend.host_info()
    if api.host_info is None:
        raise not_supported("host_get_info without a guest manager", MOD_GUEST)
    return api.host_info()


def host_diskpool(api: Context, req: Request) -> Any:
    req.only_query("poolname")
    req.no_body()
    name = req.arg("poolname")
    if name is not None:
        v.text(name, "poolname", v.POOL)
    return api.diskpool()


def version(api: Context, req: Request) -> Any:
    req.only_query()
    return VERSION


def healthy(api: Context, req: Request) -> Any:
    req.only_query()
    return {"SMAPI": "healthy (no z/VM here: the VMThunder node answers)"}


# -- images ------------------------------------------------------------------------------------
def image_import(api: Context, req: Request) -> Any:
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


def image_query(api: Context, req: Request) -> Any:
    req.only_query("imagename")
    req.no_body()
    return api.catalogue.query(req.arg("imagename"))


def image_delete(api: Context, req: Request) -> Any:
    req.only_query()
    req.no_body()
    api.catalogue.delete(req.params["name"])
    return None


def image_export(api: Context, req: Request) -> Any:
    req.only_query()
    body = v.fields(req.body, "body", {"location"}, {"location"})
    location = v.fields(body["location"], "location", {"dest_url", "remote_host"}, {"dest_url"})
    if location.get("remote_host") is not None:
        v.text(location["remote_host"], "remote_host", v.REMOTE_HOST)
        # Nova's zvm driver names itself (user@my_ip) in its snapshot's export too: a
        # nova-compute on this node reads a local file. Another host's is not written.
        if not is_this_host(location["remote_host"]):
            raise not_supported("image_export to a remote_host", MOD_IMAGE)
    return api.catalogue.export(req.params["name"], location["dest_url"])


def image_root_disk_size(api: Context, req: Request) -> Any:
    req.only_query()
    req.no_body()
    return api.catalogue.root_disk_size(req.params["name"])
