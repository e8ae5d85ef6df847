"""Assemble the z/VM-shaped API of a virtmanserver from its configuration."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from virtman.compute import Virtman
from virtman.imageservice import ImageService
from virtman.zvm.app import ZvmApi
from virtman.zvm.auth import TokenAuth
from virtman.zvm.backend import GuestBackend
from virtman.zvm.host import local_host_info
from virtman.zvm.images import Catalogue
from virtman.zvm.peer import PeerUids, is_loopback, resolve_uids
from virtman.zvm.server import ZvmServer
from virtman.zvm.store import Store


def instances_on(virtman: Virtman, target: str) -> list[str]:
    """The instances of this node whose image is ``target`` (``volume-<name>``)."""
    found = []
    for entry in virtman.list():
        instance, _, image = entry.partition(":")
        if image in (target, target.removeprefix("volume-")):
            found.append(instance)
    return sorted(found)


def build_server(
    conf: Any,
    *,
    state_dir: Path,
    disk_dir: Path,
    virtman: Virtman,
    images: ImageService,
    backend: GuestBackend | None,
    token: str | None,
    ssl_context: ssl.SSLContext | None,
) -> ZvmServer:
    """The server of ``zvm_api_*`` options (not started); ``OSError`` if it cannot listen,
    ``ValueError`` if ``zvm_api_auth`` cannot be honoured."""
    peers = peer_auth(conf) if token is not None else None  # refused before any state is read
    store = Store(state_dir / "zvm.json")
    catalogue = Catalogue(
        store,
        images,
        lambda target: instances_on(virtman, target),
        virtman.drop_idle_image,
        max_import_bytes=conf.zvm_image_import_max_gib << 30,
        url_prefixes=conf.zvm_image_import_url_prefixes,
    )
    api = ZvmApi(
        backend,
        catalogue,
        store,
        auth=None if token is None else TokenAuth(token, conf.zvm_api_token_ttl),
        disk_dir=disk_dir,
        bridge=conf.zvm_bridge,
        max_request_bytes=conf.max_request_bytes,
        peers=peers,
    )
    api.host_info = lambda: local_host_info(api.diskpool)
    return ZvmServer(
        (conf.zvm_api_listen_host, conf.zvm_api_port),
        api,
        connections=conf.zvm_api_connections,
        request_timeout=conf.request_timeout,
        ssl_context=ssl_context,
    )


def peer_auth(conf: Any) -> PeerUids | None:
    """``zvm_api_auth = peer-uid``: loopback callers running as ``zvm_api_peer_users`` need no
    token (Nova's zvm driver sends none). Only on a loopback listener, never for nobody."""
    if conf.zvm_api_auth == "token":
        return None
    if not is_loopback(conf.zvm_api_listen_host):
        raise ValueError(
            f"zvm_api_auth = peer-uid needs zvm_api_listen_host on loopback (127.0.0.1 or "
            f"::1), not {conf.zvm_api_listen_host}: a remote caller's user cannot be known"
        )
    if not conf.zvm_api_peer_users:
        raise ValueError("zvm_api_auth = peer-uid needs zvm_api_peer_users (e.g. nova)")
    return PeerUids(resolve_uids(conf.zvm_api_peer_users))
