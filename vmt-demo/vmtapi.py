"""VMThunder API for scripts (tutorial §6.2): the six calls of a virtman server by node IP.

Every function takes the IP of the node to call first, then the original's arguments, and
returns virtman's raw answer: ``"0:<info>"`` success, ``"1:<info>"`` warning (exists / does not
exist), ``"2:<info>"`` failure; ``list`` gives ``["<instance>:<image>", ...]`` and
``list_image_target`` ``{"volume-<name>": "<tid>:<loop_dev>", ...}``. A node that cannot be
reached raises ``virtmanclient.ConnectionFailed`` (other transport problems: another
``virtmanclient.VirtmanError``). An address that is neither an IP address nor a host name
raises ``ValueError`` before anything is sent.

The server is ``http://<ip>:PORT/RPC2``. The token (sent as X-Auth-Token) is ``TOKEN`` if set,
else the environment variable ``VMT_TOKEN``. With a CA file (``CA_FILE``, else the environment
variable ``VMT_CACERT``) the server is ``https://<ip>:PORT/RPC2`` (virtmanserver with
``tls_cert_file``) and its certificate must be signed by that CA. Keyword-only ``port``,
``token``, ``timeout`` and ``ca_file`` override the module settings for one call.

    import vmtapi
    vmtapi.create_image_target("10.0.0.9", "image1", "/srv/images/image1.raw")
    vmtapi.create("10.0.0.5", "vm1", "image1", "10.0.0.9")   # -> "0:/dev/mapper/snapshot_vm1"
    vmtapi.list("10.0.0.5")                                   # -> ["vm1:volume-image1"]
"""

from __future__ import annotations

import builtins
import os
import re
from collections.abc import Sequence
from typing import Any

from virtmanclient import validation
from virtmanclient.client import Client, build_connections
from virtmanclient.validation import join_host_port, normalise_image_name

PORT = 7774  # virtman's XML-RPC port
TOKEN: str | None = None  # None: use the environment variable VMT_TOKEN
CA_FILE: str | None = None  # None: the environment variable VMT_CACERT; set: https
TIMEOUT = 600.0
DEFAULT_IQN_PREFIX = "iqn.2010-10.org.openstack:"
HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*")

__all__ = [
    "create",
    "create_image_target",
    "destroy",
    "destroy_image_target",
    "list",
    "list_image_target",
]


def _host(value: object, what: str) -> str:
    """An IP address (canonical text, IPv6 without brackets) or a host name; ``ValueError``
    for anything else (nothing that could change the URL's meaning gets into it)."""
    try:
        return validation.ip(value, what)
    except ValueError:
        if isinstance(value, str) and HOSTNAME.fullmatch(value):
            return value.lower()
    raise ValueError(f"invalid {what} {value!r}: must be an IP address or a host name")


def _client(
    ip: str,
    port: int | None = None,
    token: str | None = None,
    timeout: float | None = None,
    ca_file: str | None = None,
) -> Client:
    """The client of the virtman server at ``ip`` (an IP address or a host name)."""
    address = _host(ip, "node address")
    chosen = token if token is not None else TOKEN
    if chosen is None:
        chosen = os.environ.get("VMT_TOKEN") or None
    ca = ca_file or CA_FILE or os.environ.get("VMT_CACERT") or None
    return Client(
        f"{'https' if ca else 'http'}://{join_host_port(address, port or PORT)}/RPC2",
        token=chosen,
        timeout=timeout if timeout is not None else TIMEOUT,
        ca_file=ca,
    )


def create(
    node_ip: str,
    instance_name: str,
    image_name: str,
    image_server_ip: str | Sequence[str],
    image_server_port: int = 3260,
    iqn_prefix: str = DEFAULT_IQN_PREFIX,
    target_lun: int = 1,
    snapshot_dev: str | None = None,
    *,
    port: int | None = None,
    token: str | None = None,
    timeout: float | None = None,
    ca_file: str | None = None,
) -> str:
    """Create VM instance ``instance_name`` on compute node ``node_ip`` from ``image_name``
    exported by ``image_server_ip`` (a list of IPs: one path per image server).

    Returns ``"0:<instance path>"`` (e.g. ``/dev/mapper/snapshot_vm1``) or ``"1:<exists>"``.
    ``ValueError`` (nothing sent) for a bad address or an empty list of image servers.
    """
    image_name = normalise_image_name(image_name)
    servers = [image_server_ip] if isinstance(image_server_ip, str) else image_server_ip
    if not servers:
        raise ValueError("at least one image server is needed")
    portals = [
        join_host_port(_host(ip, "image server address"), image_server_port) for ip in servers
    ]
    connection: Any = build_connections(portals, image_name, iqn_prefix, target_lun)
    return _client(node_ip, port, token, timeout, ca_file).create(
        instance_name, image_name, connection, snapshot_dev
    )


def destroy(
    node_ip: str,
    instance_name: str,
    *,
    port: int | None = None,
    token: str | None = None,
    timeout: float | None = None,
    ca_file: str | None = None,
) -> str:
    """Destroy VM instance ``instance_name`` on ``node_ip``: ``"0:"`` or ``"1:<not exists>"``."""
    return _client(node_ip, port, token, timeout, ca_file).destroy(instance_name)


def list(
    node_ip: str,
    *,
    port: int | None = None,
    token: str | None = None,
    timeout: float | None = None,
    ca_file: str | None = None,
) -> builtins.list[str]:
    """The VM instances of ``node_ip``: ``["<instance_name>:<image_name>", ...]``."""
    return _client(node_ip, port, token, timeout, ca_file).list()


def create_image_target(
    image_server_ip: str,
    image_name: str,
    file_path: str,
    loop_dev: str | None = None,
    iqn_prefix: str = DEFAULT_IQN_PREFIX,
    *,
    port: int | None = None,
    token: str | None = None,
    timeout: float | None = None,
    ca_file: str | None = None,
) -> str:
    """Export ``file_path`` of ``image_server_ip`` as the iSCSI target of ``image_name``:
    ``"0:<tid>:<loop_dev>"``, ``"1:<exists>"`` or ``"2:<file missing>"``."""
    return _client(image_server_ip, port, token, timeout, ca_file).create_image_target(
        image_name, file_path, loop_dev, iqn_prefix
    )


def destroy_image_target(
    image_server_ip: str,
    image_name: str,
    *,
    port: int | None = None,
    token: str | None = None,
    timeout: float | None = None,
    ca_file: str | None = None,
) -> str:
    """Remove the image target of ``image_name``: ``"0:"`` or ``"1:<not exists>"``."""
    return _client(image_server_ip, port, token, timeout, ca_file).destroy_image_target(image_name)


def list_image_target(
    image_server_ip: str,
    *,
    port: int | None = None,
    token: str | None = None,
    timeout: float | None = None,
    ca_file: str | None = None,
) -> dict[str, str]:
    """The image targets of ``image_server_ip``: ``{"volume-<name>": "<tid>:<loop_dev>"}``."""
    return _client(image_server_ip, port, token, timeout, ca_file).list_image_target()
