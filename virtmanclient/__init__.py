"""Client of Virtman's XML-RPC API (port 7774, path /RPC2): Python API and ``virtman`` CLI."""

from virtmanclient.client import (
    Client,
    ImageTarget,
    Instance,
    Result,
    build_connection,
    build_connections,
    check_result,
    parse_instance_list,
    parse_result,
    parse_target_list,
)
from virtmanclient.exceptions import (
    AlreadyExists,
    ConnectionFailed,
    DoesNotExist,
    Failed,
    InvalidResponse,
    RemoteFault,
    RequestFailed,
    ResultError,
    Unauthorized,
    VirtmanError,
)

__all__ = [
    "AlreadyExists",
    "Client",
    "ConnectionFailed",
    "DoesNotExist",
    "Failed",
    "ImageTarget",
    "Instance",
    "InvalidResponse",
    "RemoteFault",
    "RequestFailed",
    "Result",
    "ResultError",
    "Unauthorized",
    "VirtmanError",
    "build_connection",
    "build_connections",
    "check_result",
    "parse_instance_list",
    "parse_result",
    "parse_target_list",
]
