"""XML-RPC client of Virtman (``virtmanserver`` on compute nodes and image servers).

Usage::

    client = Client("10.0.0.5", token="secret")          # = http://10.0.0.5:7774/RPC2
    client = Client("https://10.0.0.5", token="secret", ca_file="/etc/virtman/ca.pem")
    conn = build_connection("10.0.0.9:3260", "image1")   # iqn ...:volume-image1, LUN 1
    client.create("vm1", "image1", conn)                 # "0:/dev/..." or "1:..." or "2:..."
    client.create("vm1", "image1", conn, checked=True)   # Result(0, path) or raises
    client.instances()                                   # [Instance("vm1", "volume-image1")]

Every method has the original's name and arguments and returns the raw answer (result strings
``"<code>:<info>"``: 0 success, 1 warning, 2 failure). With ``checked=True`` the result is
parsed: code 0 gives a :class:`Result`, code 1 raises :class:`AlreadyExists` (create) or
:class:`DoesNotExist` (destroy), code 2 raises :class:`Failed`.

The client is thread-safe: each call uses its own connection (``ServerProxy`` is not).
"""

from __future__ import annotations

import http.client
import ssl
import xmlrpc.client
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload
from urllib.parse import urlsplit, urlunsplit
from xml.parsers.expat import ExpatError

from brick import values
from virtmanclient import exceptions
from virtmanclient.validation import DEFAULT_IQN_PREFIX, normalise_image_name

if TYPE_CHECKING:
    from _typeshed import SizedBuffer

_Conn = TypeVar("_Conn", bound=http.client.HTTPConnection)

DEFAULT_PORT = 7774
RPC_PATH = "/RPC2"
DEFAULT_TIMEOUT = 600.0  # a create may build a whole block stack (the original used 600 s)
USER_AGENT = "python-virtmanclient"

Connection = dict[str, Any]
Connections = Connection | Sequence[Connection]
StrList = list[str]  # ``list`` is shadowed inside Client
StrDict = dict[str, str]


# -- results (pure) ----------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    """A parsed result string ``"<code>:<info>"``."""

    code: int
    info: str

    @property
    def ok(self) -> bool:
        """Code 0: success."""
        return self.code == 0

    @property
    def warning(self) -> bool:
        """Code 1: warning (already exists / does not exist)."""
        return self.code == 1

    @property
    def failed(self) -> bool:
        """Any other code: failure."""
        return self.code not in (0, 1)

    def __str__(self) -> str:
        return f"{self.code}:{self.info}"


def parse_result(raw: object) -> Result:
    """Split a result string at its first ``:``; raise InvalidResponse if it is not one."""
    if not isinstance(raw, str):
        raise exceptions.InvalidResponse(
            f"expected a result string '<code>:<info>', got {raw!r:.200}"
        )
    code_text, sep, info = raw.partition(":")
    code_text = code_text.strip()
    if not sep or not (code_text.isascii() and code_text.isdigit()):
        raise exceptions.InvalidResponse(f"not a result string '<code>:<info>': {raw!r:.200}")
    return Result(int(code_text), info)


WARNING_ERRORS: dict[str, type[exceptions.ResultError]] = {
    "create": exceptions.AlreadyExists,
    "create_image_target": exceptions.AlreadyExists,
    "destroy": exceptions.DoesNotExist,
    "destroy_image_target": exceptions.DoesNotExist,
}


def check_result(method: str, raw: object) -> Result:
    """The :class:`Result` of a successful call, or the matching :class:`ResultError`."""
    result = parse_result(raw)
    if result.code == 0:
        return result
    if result.code == 1:
        raise WARNING_ERRORS.get(method, exceptions.Failed)(method, result.code, result.info)
    raise exceptions.Failed(method, result.code, result.info)


DEGRADED_SUFFIX = ":degraded"


@dataclass(frozen=True)
class Instance:
    """One entry of ``list()``: a VM instance and the (normalised) image it runs on;
    ``degraded``: the node keeps the disk but the image's stack is not (fully) up."""

    name: str
    image: str
    degraded: bool = False


@dataclass(frozen=True)
class ImageTarget:
    """One entry of ``list_image_target()``: target id and the exported loop device/file."""

    image: str
    tid: str
    loop_dev: str


def parse_instance_list(raw: object) -> list[Instance]:
    """``["<instance>:<image>", ...]`` as :class:`Instance` objects (an entry
    ``"<instance>:<image>:degraded"`` is an instance of a degraded image)."""
    if not isinstance(raw, list | tuple):
        raise exceptions.InvalidResponse(
            f"expected a list of '<instance>:<image>', got {raw!r:.200}"
        )
    instances = []
    for item in raw:
        name, sep, image = item.partition(":") if isinstance(item, str) else ("", "", "")
        if not (name and sep and image):
            raise exceptions.InvalidResponse(f"not an '<instance>:<image>' entry: {item!r:.200}")
        degraded = image.endswith(DEGRADED_SUFFIX) and len(image) > len(DEGRADED_SUFFIX)
        if degraded:
            image = image[: -len(DEGRADED_SUFFIX)]
        instances.append(Instance(name, image, degraded))
    return instances


def parse_target_list(raw: object) -> list[ImageTarget]:
    """The server's dict ``{"volume-<name>": "<tid>:<loop_dev>"}`` (or the tutorial's list
    ``["volume-<name>:<tid>:<loop_dev>"]``) as :class:`ImageTarget` objects, sorted by image."""
    if isinstance(raw, Mapping):
        pairs = [(str(k), v) for k, v in raw.items()]
    elif isinstance(raw, list | tuple):
        pairs = []
        for item in raw:
            if not isinstance(item, str) or ":" not in item:
                raise exceptions.InvalidResponse(
                    f"not an '<image>:<tid>:<loop_dev>' entry: {item!r:.200}"
                )
            image, _, rest = item.partition(":")
            pairs.append((image, rest))
    else:
        raise exceptions.InvalidResponse(f"expected a dict of image targets, got {raw!r:.200}")
    targets = []
    for image, value in sorted(pairs):
        if not isinstance(value, str):
            raise exceptions.InvalidResponse(
                f"image target {image!r}: not '<tid>:<loop_dev>': {value!r:.200}"
            )
        tid, _, loop_dev = value.partition(":")
        targets.append(ImageTarget(image, tid, loop_dev))
    return targets


InstanceList = list[Instance]  # ``list`` is shadowed inside Client
TargetList = list[ImageTarget]


def build_connection(
    portal: str,
    image_name: str,
    iqn_prefix: str = DEFAULT_IQN_PREFIX,
    lun: int = 1,
) -> Connection:
    """The original's connection dict for an image exported at ``portal`` (``ip:port``)."""
    return _connection(portal, iqn_prefix + normalise_image_name(image_name), lun)


def _connection(portal: str, iqn: str, lun: int) -> Connection:
    return {"target_portal": portal, "target_iqn": iqn, "target_lun": lun}


def build_connections(
    portals: Sequence[str] | str,
    image_name: str,
    iqn_prefix: str = DEFAULT_IQN_PREFIX,
    lun: int = 1,
) -> Connections:
    """One dict for one portal (a string is one portal), a list of dicts (one path each)
    for several; the image name is normalised once for all of them."""
    if isinstance(portals, str):
        portals = [portals] if portals else []
    if not portals:
        raise ValueError("at least one portal is needed")
    iqn = iqn_prefix + normalise_image_name(image_name)
    conns = [_connection(p, iqn, lun) for p in portals]
    return conns[0] if len(conns) == 1 else conns


def normalise_endpoint(endpoint: str) -> str:
    """``host``, ``host:port``, ``[v6]:port`` or a URL -> ``http(s)://host:port/path``.

    A missing scheme becomes ``http``, a missing port 7774, an empty path ``/RPC2``.
    """
    text = endpoint.strip()
    if not text:
        raise ValueError("empty virtman endpoint")
    if any(ch.isspace() or not ch.isprintable() for ch in text):
        raise ValueError(f"invalid virtman endpoint {endpoint!r}: whitespace or control characters")
    shape = f"invalid virtman endpoint {endpoint!r}: use host[:port] or an http URL"
    if "://" not in text:
        # A bare IPv6 address is refused: is ``fd00::1:7774`` a port or the last group?
        try:
            host, port_text = values.Portal.split(text, DEFAULT_PORT)
        except ValueError as err:
            rule = str(err) if "brackets" in str(err) else "use host[:port] or an http URL"
            raise ValueError(f"invalid virtman endpoint {endpoint!r}: {rule}") from None
        text = "http://" + values.join_host_port(
            host, DEFAULT_PORT if port_text is None else port_text
        )
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(shape)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid virtman endpoint {endpoint!r}: bad port") from None
    netloc = parts.netloc
    if port == 0 or (port is None and netloc.endswith(":")):
        raise ValueError(f"invalid virtman endpoint {endpoint!r}: bad port")
    if port is None:
        netloc = f"{netloc}:{DEFAULT_PORT}"
    return urlunsplit((parts.scheme, netloc, parts.path or RPC_PATH, parts.query, ""))


# -- transport ---------------------------------------------------------------------------
class _TimeoutMixin(xmlrpc.client.Transport):
    """A transport with a socket timeout that sends each request once (no silent resend of a
    non-idempotent create after a reset connection)."""

    timeout: float

    def _timed(self, conn: _Conn) -> _Conn:
        conn.timeout = self.timeout
        return conn

    def request(
        self, host: Any, handler: str, request_body: SizedBuffer, verbose: bool = False
    ) -> tuple[Any, ...]:
        return self.single_request(host, handler, request_body, verbose)


class Transport(_TimeoutMixin):
    """HTTP transport with timeout and optional X-Auth-Token header."""

    user_agent = USER_AGENT

    def __init__(self, token: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(headers=[("X-Auth-Token", token)] if token else [])
        self.timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        return self._timed(super().make_connection(host))


class SafeTransport(_TimeoutMixin, xmlrpc.client.SafeTransport):
    """HTTPS transport with timeout and optional X-Auth-Token header; the server's
    certificate is verified with ``context`` (None: against the system's CAs)."""

    user_agent = USER_AGENT

    def __init__(
        self,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(
            headers=[("X-Auth-Token", token)] if token else [],
            context=context or ssl.create_default_context(),
        )
        self.timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPSConnection:
        return self._timed(super().make_connection(host))


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """A client context that verifies servers against ``ca_file`` (None: the system's CAs);
    ``ValueError`` if the file cannot be loaded."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the CA file {ca_file!r}: {exc}") from None


# -- client ------------------------------------------------------------------------------
class Client:
    """Client of one virtman server (one compute node or image server)."""

    def __init__(
        self,
        endpoint: str,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        ca_file: str | None = None,
    ) -> None:
        """``ca_file``: PEM CA certificates that sign an ``https://`` server's certificate
        (None: the system's); ``ValueError`` if it cannot be loaded."""
        self.url = normalise_endpoint(endpoint)
        self.token = token or None
        self.timeout = timeout
        self.ca_file = ca_file or None
        https = self.url.startswith("https:")
        self.ssl_context = tls_context(self.ca_file) if https else None

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def _transport(self) -> xmlrpc.client.Transport:
        if self.url.startswith("https:"):
            return SafeTransport(self.token, self.timeout, self.ssl_context)
        return Transport(self.token, self.timeout)

    def call(self, method: str, *args: Any) -> Any:
        """Call one XML-RPC method on a fresh connection; return the raw answer.

        Raises ConnectionFailed, Unauthorized, RequestFailed, RemoteFault or InvalidResponse.
        """
        try:
            with xmlrpc.client.ServerProxy(
                self.url, transport=self._transport(), allow_none=True
            ) as proxy:
                return getattr(proxy, method)(*args)
        except xmlrpc.client.Fault as exc:
            raise exceptions.RemoteFault(method, exc.faultCode, str(exc.faultString)) from None
        except xmlrpc.client.ProtocolError as exc:
            if exc.errcode == 401:
                raise exceptions.Unauthorized(self.url) from None
            raise exceptions.RequestFailed(self.url, exc.errcode, exc.errmsg) from None
        except TimeoutError:
            raise exceptions.ConnectionFailed(
                self.url, f"no answer within {self.timeout:g} s"
            ) from None
        except OSError as exc:
            raise exceptions.ConnectionFailed(
                self.url, exc.strerror or str(exc) or repr(exc)
            ) from None
        except (xmlrpc.client.ResponseError, ExpatError, http.client.HTTPException) as exc:
            raise exceptions.InvalidResponse(
                f"{method}: unexpected answer from {self.url}: {exc}"
            ) from None

    def _result(self, method: str, checked: bool, *args: Any) -> Any:
        raw = self.call(method, *args)
        return check_result(method, raw) if checked else raw

    # The original's six methods ------------------------------------------------------
    @overload
    def create(
        self,
        instance_name: str,
        image_name: str,
        image_connection: Connections,
        snapshot_dev: str | None = None,
        *,
        checked: Literal[False] = False,
    ) -> str: ...

    @overload
    def create(
        self,
        instance_name: str,
        image_name: str,
        image_connection: Connections,
        snapshot_dev: str | None = None,
        *,
        checked: Literal[True],
    ) -> Result: ...

    def create(
        self,
        instance_name: str,
        image_name: str,
        image_connection: Connections,
        snapshot_dev: str | None = None,
        *,
        checked: bool = False,
    ) -> str | Result:
        """Create VM instance ``instance_name`` on ``image_name``: ``"0:<instance path>"``,
        ``"1:<exists>"``, ``"2:<failure>"``. ``image_connection``: one dict or a list."""
        conns = image_connection if isinstance(image_connection, dict) else list(image_connection)
        return self._result(
            "create", checked, instance_name, image_name, conns, snapshot_dev or None
        )

    @overload
    def destroy(self, instance_name: str, *, checked: Literal[False] = False) -> str: ...

    @overload
    def destroy(self, instance_name: str, *, checked: Literal[True]) -> Result: ...

    def destroy(self, instance_name: str, *, checked: bool = False) -> str | Result:
        """Destroy VM instance ``instance_name``: ``"0:"``, ``"1:<does not exist>"``, ``"2:…"``."""
        return self._result("destroy", checked, instance_name)

    def list(self) -> StrList:
        """``["<instance>:<image>", ...]``."""
        return self.call("list")

    @overload
    def create_image_target(
        self,
        image_name: str,
        file_path: str,
        loop_dev: str | None = None,
        iqn_prefix: str | None = None,
        *,
        checked: Literal[False] = False,
    ) -> str: ...

    @overload
    def create_image_target(
        self,
        image_name: str,
        file_path: str,
        loop_dev: str | None = None,
        iqn_prefix: str | None = None,
        *,
        checked: Literal[True],
    ) -> Result: ...

    def create_image_target(
        self,
        image_name: str,
        file_path: str,
        loop_dev: str | None = None,
        iqn_prefix: str | None = None,
        *,
        checked: bool = False,
    ) -> str | Result:
        """Export ``file_path`` (on the image server) as an iSCSI target: ``"0:<tid>:<dev>"``,
        ``"1:<exists>"``, ``"2:<file missing / failure>"``. None = the server's defaults."""
        return self._result(
            "create_image_target", checked, image_name, file_path, loop_dev, iqn_prefix
        )

    @overload
    def destroy_image_target(self, image_name: str, *, checked: Literal[False] = False) -> str: ...

    @overload
    def destroy_image_target(self, image_name: str, *, checked: Literal[True]) -> Result: ...

    def destroy_image_target(self, image_name: str, *, checked: bool = False) -> str | Result:
        """Remove an image target: ``"0:"``, ``"1:<does not exist>"``, ``"2:<failure>"``."""
        return self._result("destroy_image_target", checked, image_name)

    def list_image_target(self) -> StrDict:
        """``{"volume-<name>": "<tid>:<loop_dev>", ...}``."""
        return self.call("list_image_target")

    # Typed helpers -----------------------------------------------------------------------
    def instances(self) -> InstanceList:
        """``list()`` parsed."""
        return parse_instance_list(self.list())

    def image_targets(self) -> TargetList:
        """``list_image_target()`` parsed."""
        return parse_target_list(self.list_image_target())

    def close(self) -> None:
        """Nothing to close (one connection per call); for symmetry with voltclient."""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
