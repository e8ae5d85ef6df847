"""The z/VM API's guest verbs (``/guests``, ``/guests/{userid}/...``): checked field by
field, then handed to the ``GuestBackend``; deploy and capture go through the ``Catalogue``."""

from __future__ import annotations

from typing import Any

from virtman.errors import InvalidInput
from virtman.zvm import validate as v
from virtman.zvm.envelope import MOD_GUEST, not_supported
from virtman.zvm.request import Context, Request

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


def guest_list(api: Context, req: Request) -> Any:
    req.only_query()
    req.no_body()
    return api.guests().list()


def guest_create(api: Context, req: Request) -> Any:
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


def guest_get(api: Context, req: Request) -> Any:
    req.only_query()
    req.no_body()
    xml = api.guests().definition(v.userid(req.params["userid"]))
    return {"user_direct": xml.splitlines()}


def guest_delete(api: Context, req: Request) -> Any:
    req.only_query()
    req.no_body()
    userid = v.userid(req.params["userid"])
    api.guests().delete(userid)
    api.store.drop("nics", userid)
    return None


def guest_action(api: Context, req: Request) -> Any:
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


def guest_power_state(api: Context, req: Request) -> Any:
    req.only_query()
    req.no_body()
    return api.guests().power_state(v.userid(req.params["userid"]))


def guest_info(api: Context, req: Request) -> Any:
    req.only_query()
    req.no_body()
    return api.guests().info(v.userid(req.params["userid"]))


def guest_user_direct(api: Context, req: Request) -> Any:
    return guest_get(api, req)


def guest_stats(api: Context, req: Request) -> Any:
    req.only_query("userid")
    req.no_body()
    ids = v.userids(req.arg("userid"))
    return {u: api.guests().stats(u) for u in ids}


def guest_vnics(api: Context, req: Request) -> Any:
    req.only_query("userid")
    req.no_body()
    ids = v.userids(req.arg("userid"))
    return {u: api.guests().stats(u).get("nics", []) for u in ids}


def guest_disks_config(api: Context, req: Request) -> Any:
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
