"""Where a guest's deploy reads its image from: the connection(s) given to ``Virtman.create``.

An image this node exports itself (``create_image_target``, z/VM ``image_import``) is read
locally: no relay, no Volt. Any other image is read from the image servers of
``guest_image_servers``, through Volt's tree of the image like every instance (parents,
relay, cache): a burst dispatched by the cluster controller then fetches the image once per
tree, not once per node.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from brick import values
from virtman.errors import InvalidInput

ISCSI_PORT = 3260
Exports = Callable[[], dict[str, Any]]  # image name -> this node's export record


def parse_image_servers(entries: Sequence[str]) -> list[values.Portal]:
    """The portals of ``guest_image_servers`` (``host`` or ``host:port``, default port 3260);
    ``ValueError`` naming the bad entry."""
    portals = []
    for entry in entries:
        try:
            portals.append(values.Portal.parse(entry.strip(), ISCSI_PORT, names=True))
        except ValueError as exc:
            raise ValueError(f"guest_image_servers: {entry!r}: {exc}") from None
    return portals


def image_source(
    exports: Exports,
    local_portal: values.Portal,
    image_servers: Sequence[values.Portal],
    iqn_prefix: str,
) -> Callable[[str], Any]:
    """``connection(image)``: this node's export of ``image`` if it has one, else one path
    per image server (a dict for one, a list for several); ``InvalidInput`` if neither."""

    def connection(image: str) -> Any:
        record = exports().get(image)
        if record is not None and isinstance(record.get("iqn"), str):
            return {
                "target_portal": str(local_portal),
                "target_iqn": record["iqn"],
                "target_lun": 1,
            }
        if not image_servers:
            raise InvalidInput(
                "image", image, "not exported by this node (create_image_target) and no "
                "guest_image_servers to read it from",
            )  # fmt: skip
        paths = [
            {"target_portal": str(p), "target_iqn": iqn_prefix + image, "target_lun": 1}
            for p in image_servers
        ]
        return paths[0] if len(paths) == 1 else paths

    return connection
