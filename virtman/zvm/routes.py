"""The z/VM API's route table: path template and method -> handler, and the verbs this
Linux/KVM node answers as not implemented (FCP volumes, vswitches, files, minidisks)."""

from __future__ import annotations

from typing import Any

from virtman.zvm.envelope import MOD_FILE, MOD_GUEST, MOD_NETWORK, MOD_VOLUME, not_supported
from virtman.zvm.guest_handlers import (
    guest_action,
    guest_create,
    guest_delete,
    guest_disks_config,
    guest_get,
    guest_info,
    guest_list,
    guest_power_state,
    guest_stats,
    guest_user_direct,
    guest_vnics,
)
from virtman.zvm.host_handlers import (
    healthy,
    host_diskpool,
    host_info,
    image_delete,
    image_export,
    image_import,
    image_query,
    image_root_disk_size,
    version,
)
from virtman.zvm.nic_handlers import (
    guest_adapters,
    guest_create_interface,
    guest_create_nic,
    guest_delete_interface,
    guest_delete_nic,
    guests_nic_info,
)
from virtman.zvm.request import Context, Handler, Request


def _unsupported(what: str, mod: int) -> Handler:
    def handler(api: Context, req: Request) -> Any:
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
