"""An XML-RPC call to a node's virtmanserver with the cluster's auth token.

Imported by ``cluster.ControlRpc`` (calls from threads in the control namespace), and run as
a script by ``LocalCluster.rpc`` (one client process per call)::

    python rpcclient.py URL TOKEN METHOD JSON-ARGS [CA-FILE]

prints the answer as JSON. Standard library only: the script starts fast.
"""

from __future__ import annotations

import json
import ssl
import sys
import xmlrpc.client
from typing import Any


def call(
    url: str,
    token: str,
    method: str,
    args: list[Any] | tuple[Any, ...],
    ca: str | None = None,
    timeout: float | None = None,
) -> Any:
    """``method(*args)`` on ``url``; ``ca`` is the CA to trust for an https URL."""
    https = url.startswith("https:")
    base = xmlrpc.client.SafeTransport if https else xmlrpc.client.Transport

    class Transport(base):  # type: ignore[misc,valid-type]
        def send_headers(self, connection: Any, headers: Any) -> None:
            super().send_headers(connection, headers)
            if token:
                connection.putheader("X-Auth-Token", token)

        def make_connection(self, host: Any) -> Any:
            connection = super().make_connection(host)
            connection.timeout = timeout
            return connection

    transport = Transport(context=ssl.create_default_context(cafile=ca)) if https else Transport()
    with xmlrpc.client.ServerProxy(url, transport=transport, allow_none=True) as proxy:
        return getattr(proxy, method)(*args)


if __name__ == "__main__":
    url, token, method, args = sys.argv[1:5]
    print(json.dumps(call(url, token, method, json.loads(args), *sys.argv[5:6])))
