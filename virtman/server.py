"""Virtman's XML-RPC API: the original's six methods on ``/RPC2`` (port 7774).

Threaded (the original served one request at a time, so one slow create blocked every
other call). When ``api_token`` is set, callers must send it as ``X-Auth-Token``.
"""

from __future__ import annotations

import hmac
import logging
import socketserver
from typing import Any
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

from virtman.compute import Virtman
from virtman.imageservice import ImageService

LOG = logging.getLogger(__name__)


class RequestHandler(SimpleXMLRPCRequestHandler):
    rpc_paths = ("/RPC2",)

    def do_POST(self) -> None:
        token = getattr(self.server, "token", None)
        given = self.headers.get("X-Auth-Token", "")
        if token and not hmac.compare_digest(given.encode(), token.encode()):
            LOG.warning("rejected an XML-RPC call from %s: bad token", self.client_address[0])
            self.send_response(401)
            self.send_header("Content-Type", "text/plain")
            body = b"missing or wrong X-Auth-Token\n"
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True  # the request body was not read
            return
        super().do_POST()

    def log_message(self, format: str, *args: Any) -> None:
        LOG.debug("%s %s", self.client_address[0], format % args)


class Server(socketserver.ThreadingMixIn, SimpleXMLRPCServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], token: str | None) -> None:
        super().__init__(address, requestHandler=RequestHandler, allow_none=True, logRequests=False)
        self.token = token


class Methods:
    """The original's method names and results."""

    def __init__(self, virtman: Virtman, images: ImageService) -> None:
        self.virtman = virtman
        self.images = images

    def create(
        self, instance_name: str, image_name: str, image_connection: Any, snapshot_dev: Any = None
    ) -> str:
        return self.virtman.create(instance_name, image_name, image_connection, snapshot_dev)

    def destroy(self, instance_name: str) -> str:
        return self.virtman.destroy(instance_name)

    def list(self) -> list[str]:
        return self.virtman.list()

    def create_image_target(
        self,
        image_name: str,
        file_path: str,
        loop_dev: str | None = None,
        iqn_prefix: str | None = None,
    ) -> str:
        return self.images.create_image_target(image_name, file_path, loop_dev, iqn_prefix)

    def destroy_image_target(self, image_name: str) -> str:
        return self.images.destroy_image_target(image_name)

    def list_image_target(self) -> dict[str, str]:
        return self.images.list_image_target()


def build_server(
    address: tuple[str, int], token: str | None, virtman: Virtman, images: ImageService
) -> Server:
    server = Server(address, token)
    server.register_introspection_functions()
    server.register_instance(Methods(virtman, images))
    return server
