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


def build_app(
    *,
    state_dir: Path,
    disk_dir: Path,
    virtman: Virtman,
    images: ImageService,
    backend: GuestBackend | None,
    token: str | None,
    token_ttl_s: int = 3600,
    bridge: str = "virbr0",
    max_request_bytes: int = 1 << 20,
) -> ZvmApi:
    store = Store(state_dir / "zvm.json")
    catalogue = Catalogue(store, images, lambda target: instances_on(virtman, target))
    api = ZvmApi(
        backend,
        catalogue,
        store,
        auth=None if token is None else TokenAuth(token, token_ttl_s),
        disk_dir=disk_dir,
        bridge=bridge,
        max_request_bytes=max_request_bytes,
    )
    api.host_info = lambda: local_host_info(api.diskpool)
    return api


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
    """The server of ``zvm_api_*`` options (not started); ``OSError`` if it cannot listen."""
    app = build_app(
        state_dir=state_dir,
        disk_dir=disk_dir,
        virtman=virtman,
        images=images,
        backend=backend,
        token=token,
        token_ttl_s=conf.zvm_api_token_ttl,
        bridge=conf.zvm_bridge,
        max_request_bytes=conf.max_request_bytes,
    )
    return ZvmServer(
        (conf.zvm_api_listen_host, conf.zvm_api_port),
        app,
        connections=conf.zvm_api_connections,
        request_timeout=conf.request_timeout,
        ssl_context=ssl_context,
    )
