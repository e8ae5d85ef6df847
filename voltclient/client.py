"""HTTP client of volt-api's v1 REST API, with the method names of python-voltclient.

Usage::

    client = Client("https://volt-master:7447", token="secret", ca_file="/etc/volt/ca.pem")
    peer_id, parents = client.volumes.get("volume-img1", host="10.0.0.5")
    client.volumes.login("volume-img1", peer_id, "10.0.0.5", 3260, "iqn.2010-10.org:x", 1)
    for entry in client.members.heartbeat(host="10.0.0.5"):
        print(entry["peer_id"], [p.peer_id for p in entry["parents"]])

The endpoint may be a comma-separated list of volt-api URLs (several volt-api processes on
one PostgreSQL, docs/ha.rst): requests go to the one that answered last; on a connection
error, a timeout or a 5xx answer the next is tried (a 4xx answer is final).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import requests

from voltclient import exceptions

LOG = logging.getLogger(__name__)
QUERY_FIELDS = ("host", "port", "iqn", "lun", "peer_id")
FAILOVER_CONNECT_TIMEOUT = 3.0  # seconds to connect to one of several endpoints
# Aliases: the managers' ``list`` methods shadow the builtin inside their classes.
Records = list[dict[str, Any]]
# What volt-api's cluster controller accepts (docs/cluster.rst), checked before sending.
CLUSTER_IMAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
CLUSTER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,55}")
CLUSTER_LIMITS = {"count": (1, 256), "vcpus": (1, 256), "memory_mb": (16, 1 << 24)}


@dataclass
class Volume:
    """A node of an image's tree as volt-api identifies it (the original's identity dict).

    ``status`` is ``"OK"`` (the node relays) or ``"pending"`` (not yet: readers skip it).
    In the "not placeable, retry" answer of :meth:`VolumeManager.get` every field is None.
    """

    host: str | None = None
    port: str | None = None
    iqn: str | None = None
    lun: str | None = None
    status: str | None = None
    peer_id: str | None = None
    nbd_port: str | None = None  # extension: an NBD export of the same relay, if registered

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Volume:
        """Build from an identity dict; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, str | None]:
        """The identity dict: host, port, iqn, lun, status, peer_id (and nbd_port if set)."""
        identity = dataclasses.asdict(self)
        if identity["nbd_port"] is None:
            del identity["nbd_port"]
        return identity

    @property
    def ready(self) -> bool:
        """True when the node relays (status OK)."""
        return self.status == "OK"


Parents = list[Volume]


def _segment(value: object, name: str) -> str:
    """One URL-quoted path component (peer ids contain ':' and maybe '[' ']')."""
    text = str(value) if value is not None else ""
    if not text:
        raise ValueError(f"{name} must not be empty")
    return quote(text, safe="")


def _peer_path(session_name: str, peer_id: str) -> str:
    volume = _segment(session_name, "session_name")
    return f"/v1/volumes/{volume}/{_segment(peer_id, 'peer_id')}"


def _volume_list(body: Any) -> list[Volume]:
    if not isinstance(body, list) or not all(isinstance(item, dict) for item in body):
        raise TypeError("expected a list of identities")
    return [Volume.from_dict(item) for item in body]


def parse_endpoints(endpoints: str) -> list[str]:
    """The volt-api URLs of a comma-separated list, each checked: http or https (the
    default when no scheme is given: http), a host, a valid port, no query or fragment.
    Raises ValueError naming the bad one."""
    found: list[str] = []
    for item in endpoints.split(","):
        text = item.strip()
        if not text:
            raise ValueError(f"empty volt-api URL in {endpoints!r}")
        if "://" not in text:
            text = "http://" + text
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"invalid volt-api URL {item.strip()!r}: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"volt-api URL {item.strip()!r}: scheme must be http or https")
        if not parts.hostname:
            raise ValueError(f"volt-api URL {item.strip()!r} has no host")
        if parts.query or parts.fragment or "@" in parts.netloc:
            raise ValueError(f"volt-api URL {item.strip()!r}: only scheme://host:port[/path]")
        if port == 0:
            raise ValueError(f"volt-api URL {item.strip()!r}: port 0")
        text = text.rstrip("/")
        if text not in found:
            found.append(text)
    return found


class HTTPClient:
    """One requests Session to volt-api; JSON in, JSON out, errors as exceptions.

    ``endpoint``: one URL or a comma-separated list of them (tried in order, see above)."""

    def __init__(
        self,
        endpoint: str,
        token: str | None = None,
        timeout: float = 30.0,
        ca_file: str | None = None,
    ) -> None:
        self.endpoints = parse_endpoints(endpoint)
        self._current = 0  # index of the endpoint that answered last
        self._lock = threading.Lock()
        self.timeout = timeout
        # https:// endpoints: trust this CA bundle (default: the system's). Passed with each
        # request: requests lets REQUESTS_CA_BUNDLE override a session's verify.
        self.ca_file = ca_file
        self.session = requests.Session()
        self.session.headers["Accept"] = "application/json"
        if token:
            self.session.headers["X-Auth-Token"] = token

    @property
    def endpoint(self) -> str:
        """The endpoint requests go to first (the one that answered last)."""
        return self.endpoints[self._current]

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request; return the parsed JSON answer (None for an empty body).

        ``path`` is already URL-quoted; errors show it unquoted, as volt-api logs it. With
        several endpoints, a connection error, timeout or 5xx answer moves on to the next
        one; the last one's error is raised when none answers.
        """
        with self._lock:
            first = self._current
        count = len(self.endpoints)
        for step in range(count):
            index = (first + step) % count
            endpoint = self.endpoints[index]
            try:
                answer = self._request_one(endpoint, method, path, body)
            except exceptions.VoltClientError as exc:
                final = exc.status is not None and exc.status < 500
                if final or step == count - 1:
                    if not final and count > 1:
                        LOG.error("no volt-api of %s answered: %s", ", ".join(self.endpoints), exc)
                    raise
                LOG.warning(
                    "volt-api %s failed (%s); failing over to %s",
                    endpoint,
                    exc,
                    self.endpoints[(index + 1) % count],
                )
                continue
            if index != first:
                with self._lock:
                    self._current = index
                LOG.warning("volt-api %s answered: using it from now on", endpoint)
            return answer
        raise AssertionError("unreachable")  # pragma: no cover

    def _request_one(self, endpoint: str, method: str, path: str, body: Any) -> Any:
        url, path = endpoint + path, unquote(path)
        timeout: float | tuple[float, float] = self.timeout
        if len(self.endpoints) > 1:  # a dead host should not hold the others back
            timeout = (min(self.timeout, FAILOVER_CONNECT_TIMEOUT), self.timeout)
        kwargs: dict[str, Any] = {"timeout": timeout}
        if self.ca_file:
            kwargs["verify"] = self.ca_file
        if body is not None:
            kwargs["json"] = body
        try:
            resp = self.session.request(method, url, **kwargs)
        except requests.Timeout:
            raise exceptions.ConnectionFailed(
                f"no answer from {endpoint} within {self.timeout:g}s",
                method=method,
                path=path,
            ) from None
        except requests.RequestException as exc:
            raise exceptions.ConnectionFailed(
                f"cannot reach {endpoint}: {_reason(exc)}", method=method, path=path
            ) from exc
        request_id = resp.headers.get("X-Request-Id")
        if resp.status_code >= 400:
            raise exceptions.from_response(method, path, resp.status_code, resp.content, request_id)
        if not resp.content:
            return None
        try:
            return json.loads(resp.content)
        except (ValueError, UnicodeDecodeError):
            raise exceptions.InvalidResponse(
                resp.status_code,
                None,
                "answer is not JSON: " + resp.content[:200].decode("utf-8", "replace"),
                request_id,
                method=method,
                path=path,
            ) from None

    def close(self) -> None:
        self.session.close()


def _reason(exc: BaseException) -> str:
    """The innermost OS-level reason of a requests error (e.g. "Connection refused")."""
    seen: set[int] = set()
    queue: list[BaseException] = [exc]
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        nested = [a for a in current.args if isinstance(a, BaseException)]
        for attr in ("reason", "__cause__", "__context__"):
            value = getattr(current, attr, None)
            if isinstance(value, BaseException):
                nested.append(value)
        queue.extend(nested)
    return str(exc)


class VolumeManager:
    """Image trees: join (``get``), register (``login``), leave (``logout``), inspect."""

    def __init__(self, api: HTTPClient) -> None:
        self.api = api

    def get(self, session_name: str, **fields: Any) -> tuple[str | None, Parents]:
        """Place the caller in the tree of ``session_name``; returns (peer_id, parents).

        ``fields``: ``host`` (the node; default: the request's source address), ``port``,
        ``iqn``, ``lun``, ``peer_id``. Parents are ordered: the first carries the reads, the
        others are standby paths; skip those whose status is ``"pending"``. An empty list
        means "read from the image server". When the node cannot be placed yet the answer
        is ``(None, [Volume(peer_id=None)])``: retry later.
        """
        for name in fields:
            if name not in QUERY_FIELDS:
                raise TypeError(f"get() got an unexpected keyword argument {name!r}")
        body = {k: v for k, v in fields.items() if v is not None}
        path = f"/v1/volumes/query/{_segment(session_name, 'session_name')}"
        answer = self.api.request("GET", path, body)
        try:
            return answer["peer_id"], _volume_list(answer["parents"])
        except (TypeError, KeyError) as exc:
            raise _unexpected("GET", path, answer) from exc

    def login(
        self,
        session_name: str,
        peer_id: str,
        host: str,
        port: int | str,
        iqn: str,
        lun: int | str,
        nbd_port: int | str | None = None,
    ) -> Volume:
        """Register the node's relay target; it becomes a parent for others (status OK).
        ``nbd_port``: the relay is also exported over NBD there (an extension)."""
        return self.login_with_parents(session_name, peer_id, host, port, iqn, lun, nbd_port)[0]

    def login_with_parents(
        self,
        session_name: str,
        peer_id: str,
        host: str,
        port: int | str,
        iqn: str,
        lun: int | str,
        nbd_port: int | str | None = None,
        *,
        place: bool = False,
    ) -> tuple[Volume, Parents | None]:
        """:meth:`login`, and the node's parents now (ordered as :meth:`get` answers them),
        or None from a volt-api that does not answer them (the original's). ``place``: a
        peer not in the tree yet is placed first (no query before; 409
        ``volt.peer.not_placeable`` when it cannot be placed yet)."""
        path = _peer_path(session_name, peer_id)
        body: dict[str, Any] = {"host": host, "port": port, "iqn": iqn, "lun": lun}
        if nbd_port is not None:
            body["nbd_port"] = nbd_port
        if place:
            body["place"] = True
        answer = self.api.request("POST", path, body)
        if not isinstance(answer, dict):
            raise _unexpected("POST", path, answer)
        parents = answer.get("parents")
        try:
            return Volume.from_dict(answer), None if parents is None else _volume_list(parents)
        except (TypeError, KeyError) as exc:
            raise _unexpected("POST", path, answer) from exc

    def logout(self, session_name: str, peer_id: str) -> None:
        """Take the node out of the tree (its children get new parents)."""
        path = _peer_path(session_name, peer_id)
        self.api.request("DELETE", path)

    def report_dead_parent(self, session_name: str, peer_id: str, parent: str) -> str:
        """Tell Volt that ``parent`` stopped serving the node ``peer_id`` (a node token
        reports for its own peers only); Volt checks it itself before it evicts anyone.
        Returns what Volt did with it: ``checking``, ``alive`` or ``gone``."""
        path = _peer_path(session_name, peer_id) + "/dead-parent"
        answer = self.api.request("POST", path, {"parent": parent})
        return str(answer.get("result")) if isinstance(answer, dict) else ""

    def list(self, volume_id: str | None = None) -> Records:
        """Without ``volume_id``: ``[{"id", "count"}]`` of every tree. With it: the tree's
        nodes breadth first, each an identity plus ``parent``, ``depth`` and ``parents``
        (the peer ids it would be sent now)."""
        path = "/v1/volumes"
        if volume_id is not None:
            path += f"/{_segment(volume_id, 'volume_id')}"
        answer = self.api.request("GET", path)
        if not isinstance(answer, list):
            raise _unexpected("GET", path, answer)
        return answer

    def delete(self, volume_id: str) -> None:
        """Forget the whole tree of ``volume_id``."""
        self.api.request("DELETE", f"/v1/volumes/{_segment(volume_id, 'volume_id')}")


class MemberManager:
    """Hosts running nodes: heartbeats and liveness."""

    def __init__(self, api: HTTPClient) -> None:
        self.api = api

    def heartbeat(
        self,
        host: str | None = None,
        bytes_read: Records | None = None,
        api_port: int | None = None,
    ) -> Records:
        """Refresh the host's liveness; returns ``[{"peer_id", "parents": [Volume]}]``,
        the current parents of each of its nodes (empty when the host has none).
        ``bytes_read``: the nodes' read counters, ``[{"peer_id", "source", "bytes"}]``;
        ``api_port``: the node daemon's own port, which Volt only probes for liveness
        (extensions of this Volt's; a Volt without them answers 400 naming the field)."""
        path = "/v1/members/heartbeat"
        body: dict[str, Any] = {"host": host} if host else {}
        if bytes_read is not None:
            body["bytes_read"] = bytes_read
        if api_port is not None:
            if isinstance(api_port, bool) or not isinstance(api_port, int):
                raise ValueError(f"api_port must be an integer 1-65535, got {api_port!r}")
            if not 1 <= api_port <= 65535:
                raise ValueError(f"api_port must be an integer 1-65535, got {api_port!r}")
            body["api_port"] = api_port
        answer = self.api.request("PUT", path, body or None)
        try:
            return [
                {"peer_id": item["peer_id"], "parents": _volume_list(item["parents"])}
                for item in answer
            ]
        except (TypeError, KeyError) as exc:
            raise _unexpected("PUT", path, answer) from exc

    def list(self) -> Records:
        """``[{"host", "seconds_since_heartbeat", "peer_ids"}]`` of every host."""
        answer = self.api.request("GET", "/v1/members")
        if not isinstance(answer, list):
            raise _unexpected("GET", "/v1/members", answer)
        return answer


class ClusterManager:
    """Bursts of VMs through volt-api's cluster controller (docs/cluster.rst): one request
    places and starts a whole burst; its task is then followed until it is done.

    Every argument is checked before anything is sent (``ValueError`` naming the field)."""

    def __init__(self, api: HTTPClient) -> None:
        self.api = api

    def create(
        self,
        image: str,
        count: int,
        vcpus: int,
        memory_mb: int,
        *,
        name: str | None = None,
        nodes: Sequence[str] | None = None,
    ) -> str:
        """Start ``count`` VMs of ``image`` (``name``-0, ``name``-1, ...; default name: the
        image), on ``nodes`` only if given; returns the task id. A burst larger than the
        free room is refused whole (:class:`~voltclient.exceptions.Conflict`)."""
        body: dict[str, Any] = {
            "image": _matching(image, CLUSTER_IMAGE_RE, "image"),
            "count": _bounded(count, "count"),
            "flavor": {
                "vcpus": _bounded(vcpus, "vcpus"),
                "memory_mb": _bounded(memory_mb, "memory_mb"),
            },
        }
        if name is not None:
            body["name"] = _matching(name, CLUSTER_NAME_RE, "name")
        if nodes is not None:
            if (
                isinstance(nodes, str)
                or not nodes
                or not all(isinstance(n, str) and n for n in nodes)
            ):
                raise ValueError("nodes must be a non-empty list of node ids")
            body["nodes"] = list(nodes)
        answer = self.api.request("POST", "/v1/clusters", body)
        if not isinstance(answer, dict) or not isinstance(answer.get("task"), str):
            raise _unexpected("POST", "/v1/clusters", answer)
        return str(answer["task"])

    def get(self, task_id: str) -> dict[str, Any]:
        """``{"task", "status", "vms": [...]}``; status ``IN_PROGRESS``, ``DONE``, ``FAILED``,
        ``DELETING`` or ``DELETED``; each VM's status ``PENDING`` ... ``RUNNING`` or ``ERROR``."""
        path = _task_path(task_id)
        answer = self.api.request("GET", path)
        if not isinstance(answer, dict) or not isinstance(answer.get("vms"), list):
            raise _unexpected("GET", path, answer)
        return answer

    def delete(self, task_id: str) -> None:
        """Destroy every VM of a finished task (in the background: follow it with get)."""
        self.api.request("DELETE", _task_path(task_id))

    def nodes(self) -> Records:
        """The controller's nodes: ``[{"id", "status", "capacity", "used", "vms", ...}]``;
        only those ``up`` and not ``stale`` get VMs."""
        answer = self.api.request("GET", "/v1/nodes")
        if not isinstance(answer, list):
            raise _unexpected("GET", "/v1/nodes", answer)
        return answer


def _matching(value: object, pattern: re.Pattern[str], field: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"{field} must match {pattern.pattern}, not {value!r}")
    return value


def _bounded(value: object, field: str) -> int:
    low, high = CLUSTER_LIMITS[field]
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{field} must be an integer in [{low}, {high}], not {value!r}")
    return value


def _task_path(task_id: object) -> str:
    try:
        text = str(uuid.UUID(str(task_id)))
    except ValueError:
        raise ValueError(f"task_id must be a UUID, not {task_id!r}") from None
    return f"/v1/clusters/{text}"


def _unexpected(method: str, path: str, answer: Any) -> exceptions.InvalidResponse:
    text = json.dumps(answer)[:200]
    return exceptions.InvalidResponse(
        200, None, f"unexpected answer: {text}", method=method, path=path
    )


class Client:
    """Client of volt-api: ``client.volumes``, ``client.members`` and ``client.clusters``.

    ``endpoint``: ``http://`` or ``https://`` URL, or several comma-separated (volt-api
    processes sharing one PostgreSQL store: failover, see above); ``ca_file``: PEM CA
    bundle that signs an https volt-api's certificate. ``token``: the admin token or a node token.
    """

    def __init__(
        self,
        endpoint: str,
        token: str | None = None,
        timeout: float = 30.0,
        ca_file: str | None = None,
    ) -> None:
        self.http_client = HTTPClient(endpoint, token, timeout, ca_file)
        self.volumes = VolumeManager(self.http_client)
        self.members = MemberManager(self.http_client)
        self.clusters = ClusterManager(self.http_client)

    def close(self) -> None:
        """Close the pooled connections."""
        self.http_client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
