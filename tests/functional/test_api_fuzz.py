"""Fuzz a real volt-api from the OpenAPI document it serves (schemathesis + Hypothesis).

Every operation of /openapi.json gets schemathesis' coverage cases (boundary values, missing
and wrong-typed fields, a missing token, undeclared methods) and Hypothesis-generated cases in
the positive mode (schema-valid: the server must accept them) and the negative mode
(schema-invalid: the server must reject them with a 4xx). Every answer must conform to the
document: a documented status, the documented content type, a body that matches the schema,
the documented headers; and no answer may be a 5xx. Hand-written probes add what the
generators do not send: no token or a wrong one on every operation, every undeclared method on
every path (405 and ``Allow``), bodies that are too large, not JSON, or nested too deep.

The same generators then run twice more with credentials that may change nothing: a node
token of a host that is in no tree, whose every request names another host (403), and no
credential at all (401 on /v1 and /metrics). Both must leave every tree and member exactly
as they found them.

Generation is seeded (``VOLT_FUZZ_SEED``) so that a failure reproduces; run with other seeds
and more examples (``VOLT_FUZZ_POSITIVE``, ``VOLT_FUZZ_NEGATIVE`` per operation) to
explore further.
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import hypothesis
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core import NotSet
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    missing_required_header,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from tests.functional.voltproc import VoltProcess
from volt.api.app import TAKES_BODY, cluster_routes, route_table
from volt.auth import node_token

# Fuzzing and probe requests of the three runs (admin, wrong-host node token, none); the
# seeding requests and the schema fetches do not count. The defaults keep CI's run short;
# raise VOLT_FUZZ_POSITIVE/NEGATIVE/RESTRICTED (e.g. 100/80/125: 5,461 requests) for a deeper one.
MIN_REQUESTS = int(os.environ.get("VOLT_FUZZ_MIN_REQUESTS", "3000"))
NODE_SECRET = "fuzz-node-secret"
WRONG_HOST = "10.99.0.1"  # the restricted runs' node token: a host in no tree
SEED = int(os.environ.get("VOLT_FUZZ_SEED", "20240601"))
# Hypothesis examples per operation with path parameters or a body, per generation mode.
EXAMPLES = {
    GenerationMode.POSITIVE: int(os.environ.get("VOLT_FUZZ_POSITIVE", "60")),
    GenerationMode.NEGATIVE: int(os.environ.get("VOLT_FUZZ_NEGATIVE", "50")),
}
# Positive examples aimed at the seeded tree, so that register, leave, show and delete
# answer their 200s too (random ids rarely name an existing tree or node).
SEEDED_EXAMPLES = 25
# Examples per operation and mode in the wrong-host and no-credential runs.
RESTRICTED_EXAMPLES = int(os.environ.get("VOLT_FUZZ_RESTRICTED", "75"))

CONFORMANCE = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
ALL_CHECKS = [
    *CONFORMANCE,
    negative_data_rejection,
    positive_data_acceptance,
    missing_required_header,
    unsupported_method,
]
# Rules that tie two inputs together, which a JSON schema cannot state (the document describes
# them): a schema-valid request may break them and is rightly answered 400.
CROSS_FIELD_400 = (
    "names volume",
    "for this caller",
    "is not a node of host",
    "is not a parent of",  # dead-parent: the tree decides who is whose parent
    "is the reporter itself",
    "serves no target yet",
)
QUERY_PATH = "/v1/volumes/query/{volume_id}"
PEER_PATH = "/v1/volumes/{volume_id}/{peer_id}"

SEED_VOLUME = "volume-img1"  # the document's example volume id and peer id
SEED_PEER = f"10.0.0.5:{SEED_VOLUME}"
SEED_HOSTS = ["10.0.0.5", "10.0.0.6", "10.0.0.7", "fd00::5", "node-1.example"]
SEED_TARGET = {"port": 3260, "iqn": "iqn.2010-10.org.openstack:volume-img1", "lun": 1}

HYPOTHESIS_SETTINGS = settings(
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.generate],
    verbosity=hypothesis.Verbosity.quiet,
)


def _routes() -> list[tuple[str, set[str]]]:
    """(template, methods) in volt-api's routing order, from the code's own route table (the
    fuzzed volt-api has no cluster controller: docs/cluster.rst)."""
    app = mock.Mock(cluster=None)
    return [(t, set(methods)) for t, methods in route_table(mock.Mock(), app)]


def _match(template: str, path: str) -> bool:
    want, got = template.strip("/").split("/"), path.strip("/").split("/")
    if len(want) != len(got) or (template == "/" and path != "/"):
        return False
    return all((w.startswith("{") and g) or w == g for w, g in zip(want, got, strict=True))


def _header(headers: Any, name: str) -> str | None:
    """A header of a requests response, or of a schemathesis one (lower-case names, lists)."""
    value = headers.get(name) or headers.get(name.lower())
    return value[0] if isinstance(value, list) else value


def _path_names(operation: Any) -> set[str]:
    return {p.name for p in operation.iter_parameters() if p.location == "path"}


def _align_peer(case: Case, align: bool) -> Case:
    """Give the peer id the case's volume id (it must name it), for half of the cases."""
    params = case.path_parameters or {}
    if align and "peer_id" in params and "volume_id" in params:
        peer = urllib.parse.unquote(str(params["peer_id"]))
        end = peer.find("]:") + 1 if peer.startswith("[") else peer.find(":")
        if end > 0:
            volume = urllib.parse.unquote(str(params["volume_id"]))
            params["peer_id"] = urllib.parse.quote(f"{peer[:end]}:{volume}", safe="")
    return case


class Fuzzer:
    """Sends the requests, counts them, and collects every failed check."""

    def __init__(self, volt: VoltProcess, schema: Any, token: str | None = None) -> None:
        self.volt = volt
        self.schema = schema
        self.token = token if token is not None else str(volt.token)
        self.session = requests.Session()
        self.routes = _routes()
        self.sent: Counter[str] = Counter()
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.failures: list[str] = []

    # -- sending -------------------------------------------------------------------------
    def call(self, case: Case, tag: str, *, real_token: bool = True) -> Any:
        """Send ``case``. A token the generators made up becomes the real one; a case without
        the header (the "missing header" scenarios) is sent without."""
        self.sent[tag] += 1
        if real_token and case.headers and "X-Auth-Token" in case.headers:
            if self.token:
                case.headers["X-Auth-Token"] = self.token
            else:
                del case.headers["X-Auth-Token"]
        response = case.call(base_url=self.volt.url, session=self.session, timeout=10)
        self.statuses[(case.operation.label, response.status_code)] += 1
        return response

    def raw(
        self, tag: str, method: str, path: str, *, token: bool = True, **kwargs: Any
    ) -> requests.Response:
        self.sent[tag] += 1
        headers = {**({"X-Auth-Token": self.token} if token else {}), **kwargs.pop("headers", {})}
        return self.session.request(
            method, self.volt.url + path, headers=headers, timeout=10, **kwargs
        )

    def oversized(self, method: str, path: str, payload: bytes) -> requests.Response:
        """On a connection of its own: volt-api answers 413 without reading the body, and
        the HTTP server then drops the connection (as RFC 9112 allows), which could break
        the next request of a keep-alive session."""
        self.sent["bodies"] += 1
        headers = {
            "X-Auth-Token": self.token,
            "Content-Type": "application/json",
            "Connection": "close",
        }
        return requests.request(
            method, self.volt.url + path, headers=headers, data=payload, timeout=10
        )

    def seed_tree(self) -> None:
        """A tree with pending and registered nodes, so requests can hit real resources."""
        for host in SEED_HOSTS:
            status, _ = self.volt.request("GET", f"/v1/volumes/query/{SEED_VOLUME}", {"host": host})
            self.sent["seed"] += 1
            assert status == 200, status
        for host in SEED_HOSTS[:2]:
            path = f"/v1/volumes/{SEED_VOLUME}/{host}:{SEED_VOLUME}"
            status, body = self.volt.request("POST", path, {"host": host, **SEED_TARGET})
            self.sent["seed"] += 1
            assert status == 200, (status, body)

    # -- checking ------------------------------------------------------------------------
    def fail(self, case: Case | None, message: str) -> None:
        label = case.operation.label if case is not None else "-"
        self.failures.append(f"{label}: {message}")

    def routed_elsewhere(self, case: Case, response: Any) -> bool:
        """Whether volt-api routed the request to another template than the case's: a path
        parameter that is empty, a dot segment, or holds a (percent-encoded) '/'."""
        raw_path = urllib.parse.urlsplit(response.request.url).path
        path = urllib.parse.unquote(raw_path, errors="replace")
        method = case.method.upper()
        for template, methods in self.routes:
            if _match(template, path) and method in methods:
                return template != case.operation.path
        return True  # no template at all: 404 or 405

    def check(self, case: Case, response: Any, checks: list[Callable[..., Any]]) -> None:
        if response.status_code >= 500:
            self.fail(
                case, f"{response.status_code} {response.text[:300]}\n{case.as_curl_command()}"
            )
            return
        if self.routed_elsewhere(case, response):
            # Another route's answer (negative cases only): at least a proper error document.
            if response.status_code >= 400 and case.method.upper() != "HEAD":
                self.check_error(case, response.status_code, response.json(), response.headers)
            return
        try:
            case.validate_response(response, checks=checks)
        except FailureGroup as group:
            for failure in group.exceptions:
                if not self.excused(case, response, failure):
                    message = f"{failure.title}: {failure.message}"
                    self.fail(case, f"{message}\n{case.as_curl_command()}")

    @staticmethod
    def excused(case: Case, response: Any, failure: Exception) -> bool:
        name = type(failure).__name__
        if name == "RejectedPositiveData" and response.status_code == 400:
            return any(rule in response.text for rule in CROSS_FIELD_400)
        if name == "AcceptedNegativeData" and response.status_code == 413:
            return True  # a body over MAX_BODY_BYTES is refused before it is read
        if name == "AcceptedNegativeData" and response.status_code == 200:
            # "Not JSON" bodies of only JSON whitespace: documented as no body, and these
            # operations take an optional one.
            sent = response.request.body or b""
            sent = sent.encode() if isinstance(sent, str) else sent
            return not sent.strip(b" \t\r\n")
        if name == "UnsupportedMethodResponse" and case.operation.path == QUERY_PATH:
            # /v1/volumes/query/X is also /v1/volumes/{volume_id}/{peer_id} with the volume
            # "query": POST and DELETE there are register and leave, not undeclared methods.
            return case.method.upper() in ("POST", "DELETE")
        return False

    def check_error(
        self, case: Case | None, status: int, body: Any, headers: Any, code: str | None = None
    ) -> None:
        """The error document of app.py: one error, consistent with the answer."""
        try:
            (error,) = body["errors"]
            assert set(error) == {"status", "code", "title", "detail", "request_id"}, error
            assert error["status"] == status, error
            assert error["request_id"] == _header(headers, "X-Request-Id"), error
            assert error["code"] == code if code else error["code"].startswith("volt."), error
        except (AssertionError, KeyError, TypeError, ValueError) as exc:
            self.fail(case, f"bad error document for {status}: {body!r} ({exc!r})")

    # -- generators ----------------------------------------------------------------------
    def coverage(self, operation: Any) -> None:
        config = self.schema.config.generation_for(operation=operation, phase="coverage")
        for case in self.schema.iter_coverage_cases(
            operation,
            generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
            generation_config=config,
        ):
            self.check(case, self.call(case, "coverage"), ALL_CHECKS)

    def fuzz(
        self,
        operation: Any,
        mode: GenerationMode,
        count: int,
        *,
        tag: str | None = None,
        before: Callable[[], None] | None = None,
        **fixed: Any,
    ) -> None:
        strategy = operation.as_strategy(generation_mode=mode, **fixed)
        if mode is GenerationMode.POSITIVE and not fixed:
            strategy = st.builds(_align_peer, strategy, st.booleans())

        @hypothesis.seed(SEED)
        @settings(HYPOTHESIS_SETTINGS, max_examples=count)
        @given(case=strategy)
        def run(case: Case) -> None:
            if before is not None:
                before()
            self.check(case, self.call(case, tag or mode.value), ALL_CHECKS)

        run()


def _schema(served: dict[str, Any], volt: VoltProcess, token: str | None) -> Any:
    schema = schemathesis.openapi.from_dict(served, config=schemathesis.Config())
    schema.config.update(base_url=volt.url, headers={"X-Auth-Token": token} if token else {})
    return schema


def _state(volt: VoltProcess) -> Any:
    """Every tree with its nodes, and the members without their clocks (read as admin)."""
    status, volumes = volt.request("GET", "/v1/volumes")
    assert status == 200, volumes
    trees = {v["id"]: volt.request("GET", f"/v1/volumes/{v['id']}")[1] for v in volumes}
    status, members = volt.request("GET", "/v1/members")
    assert status == 200, members
    return trees, [{k: v for k, v in m.items() if k != "seconds_since_heartbeat"} for m in members]


def test_fuzz_volt_api_from_its_openapi_document(volt_factory: Any) -> None:
    # node_timeout: the runs take minutes on a loaded machine; an eviction of the trees
    # seeded before the restricted runs would read as their side effect
    volt = volt_factory(auth__node_secret=NODE_SECRET, node_timeout=3600)
    started = time.monotonic()
    # The document as volt-api serves it (from_url would leave out GET /openapi.json).
    status, served = volt.request("GET", "/openapi.json", token="")
    assert status == 200
    packaged = json.loads((Path(__file__).parents[2] / "volt/api/openapi.json").read_text())
    assert served == packaged, "volt-api does not serve volt/api/openapi.json"
    fuzzer = Fuzzer(volt, _schema(served, volt, str(volt.token)))
    fuzzer.sent["schema"] += 1
    _admin_run(fuzzer)

    # Credentials that may change nothing: the state before and after must be equal.
    fuzzer.seed_tree()
    before = _state(volt)
    wrong_host = node_token(NODE_SECRET, WRONG_HOST)
    restricted = [
        Fuzzer(volt, _schema(served, volt, wrong_host), token=wrong_host),
        Fuzzer(volt, _schema(served, volt, None), token=""),
    ]
    for other in restricted:
        _restricted_run(other)
        after = _state(volt)
        changed = {v for v in {*before[0], *after[0]} if before[0].get(v) != after[0].get(v)}
        assert after == before, (other.token[:20], changed)

    runs = [fuzzer, *restricted]
    failures = [f for run in runs for f in run.failures]
    sent = sum((run.sent for run in runs), Counter())
    total = sum(sent.values())
    print(f"\nvolt-api fuzz: {total} requests in {time.monotonic() - started:.1f}s", sent)
    assert not failures, f"{len(failures)} failures:\n\n" + "\n\n".join(failures[:30])
    assert total - sent["seed"] - sent["schema"] >= MIN_REQUESTS, sent
    # The generators got past validation: trees were created, read, changed and deleted.
    # (The seeded streams of operations without a body are a single request each.)
    for label in (
        "GET /v1/volumes/query/{volume_id}",
        "GET /v1/volumes/{volume_id}",
        "HEAD /v1/volumes/{volume_id}",
        "DELETE /v1/volumes/{volume_id}",
        "POST /v1/volumes/{volume_id}/{peer_id}",
        "DELETE /v1/volumes/{volume_id}/{peer_id}",
        "PUT /v1/members/heartbeat",
    ):
        assert fuzzer.statuses[(label, 200)] > 0, (label, fuzzer.statuses)
    # The restricted runs were refused: 403 for the node token, 401 without a credential.
    assert sum(n for (_, code), n in restricted[0].statuses.items() if code == 403) > 100
    assert sum(n for (_, code), n in restricted[1].statuses.items() if code == 401) > 100

    # volt-api survived it all and still answers.
    assert volt.proc is not None and volt.proc.poll() is None, volt.log()[-3000:]
    fuzzer.seed_tree()
    status, volumes = volt.request("GET", "/v1/volumes")
    assert status == 200 and {"id": SEED_VOLUME, "count": len(SEED_HOSTS)} in volumes
    assert volt.request("GET", "/")[0] == 300
    log = volt.log()
    assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:5000]


def _operations(fuzzer: Fuzzer) -> list[Any]:
    documented = [result.ok() for result in fuzzer.schema.get_all_operations()]
    routed = {template for template, _ in fuzzer.routes}
    # the document also describes the cluster controller's routes, which this volt-api has not
    cluster = {template for template, _ in cluster_routes(mock.Mock())}
    assert {op.path for op in documented} - routed == cluster
    operations = [op for op in documented if op.path in routed]
    assert len(operations) == sum(len(methods) for _, methods in fuzzer.routes)
    # Deleting the seeded tree early would leave nothing for the others to find.
    operations.sort(key=lambda op: op.method.upper() == "DELETE")
    return operations


def _admin_run(fuzzer: Fuzzer) -> None:
    """Everything, with the admin token: coverage, generated cases, hand-written probes."""
    operations = _operations(fuzzer)
    for operation in operations:
        fuzzer.seed_tree()
        fuzzer.coverage(operation)
        names = _path_names(operation)
        if not names and not operation.body:
            continue  # nothing to generate: the coverage cases were all there is
        for mode, count in EXAMPLES.items():
            fuzzer.fuzz(operation, mode, count)
        if names:
            fixed = {"volume_id": SEED_VOLUME, "peer_id": SEED_PEER}
            fuzzer.seed_tree()
            fuzzer.fuzz(
                operation,
                GenerationMode.POSITIVE,
                SEEDED_EXAMPLES,
                tag="positive, seeded tree",
                before=fuzzer.seed_tree if operation.method == "delete" else None,
                path_parameters={k: v for k, v in fixed.items() if k in names},
            )
    fuzzer.seed_tree()
    _probe_auth(fuzzer, operations)
    _probe_methods(fuzzer)
    _probe_bodies(fuzzer, operations)


def _name_another_host(case: Case) -> Case:
    """In the wrong-host run a query without a host would act for the token's own host
    (and place it): name another one, so that every request is one the token may not make."""
    if case.operation.path != QUERY_PATH:
        return case
    body = case.body
    empty = isinstance(body, bytes | str) and not body.strip()  # JSON whitespace: no body
    if body is None or isinstance(body, NotSet) or empty:
        case.body = {"host": SEED_HOSTS[0]}
    elif isinstance(body, dict) and not body.get("host") and not body.get("peer_id"):
        case.body = {**body, "host": SEED_HOSTS[0]}
    return case


def _restricted_run(fuzzer: Fuzzer) -> None:
    """Generated cases (both modes) on every operation, with a credential that may change
    nothing. Answers must conform to the document; no 2xx on /v1 without a credential."""
    node = bool(fuzzer.token)
    tag = "wrong host" if node else "no credential"
    for operation in _operations(fuzzer):
        guarded = operation.path.startswith("/v1/") or operation.path == "/metrics"
        generated = bool(_path_names(operation) or operation.body)  # else one case only
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if generated else ():
            strategy = operation.as_strategy(generation_mode=mode)
            if node:
                strategy = strategy.map(_name_another_host)

            @hypothesis.seed(SEED)
            @settings(HYPOTHESIS_SETTINGS, max_examples=RESTRICTED_EXAMPLES)
            @given(case=strategy)
            def run(case: Case) -> None:
                response = fuzzer.call(case, tag)
                fuzzer.check(case, response, CONFORMANCE)
                if not node and guarded and response.status_code < 300:  # noqa: B023
                    fuzzer.fail(case, f"answered {response.status_code} without a credential")

            run()
        if node and generated:
            continue
        forged = {"X-Auth-Token": "node:" + WRONG_HOST}
        for headers in [{"X-Auth-Token": fuzzer.token}] if node else [{}, forged]:
            params = {"volume_id": SEED_VOLUME, "peer_id": SEED_PEER}
            names = _path_names(operation)
            case = operation.Case(
                path_parameters={k: v for k, v in params.items() if k in names}, headers=headers
            )
            response = fuzzer.call(case, tag, real_token=False)
            fuzzer.check(case, response, CONFORMANCE)


def _probe_auth(fuzzer: Fuzzer, operations: list[Any]) -> None:
    """No token, an empty one, a wrong one or a forged node token: 401 on every /v1
    operation and /metrics, before anything else is looked at; the open operations do not
    care."""
    ids = {"volume_id": SEED_VOLUME, "peer_id": SEED_PEER}
    forged = node_token("not-the-secret", SEED_HOSTS[0])
    for operation in operations:
        params = {k: v for k, v in ids.items() if k in _path_names(operation)}
        for headers in (
            {},
            {"X-Auth-Token": ""},
            {"X-Auth-Token": "wrong-" + fuzzer.token},
            {"X-Auth-Token": forged},
        ):
            case = operation.Case(path_parameters=params, headers=headers)
            if operation.method == "post":
                case.body = {"host": "10.9.9.9", **SEED_TARGET}
            response = fuzzer.call(case, "auth", real_token=False)
            fuzzer.check(case, response, CONFORMANCE)
            if operation.path in ("/", "/openapi.json"):
                if response.status_code >= 400:
                    fuzzer.fail(case, f"open operation answered {response.status_code}")
            elif response.status_code != 401:
                fuzzer.fail(case, f"token {headers}: {response.status_code}, want 401")
            elif operation.method != "head":
                body, code = response.json(), "volt.unauthenticated"
                fuzzer.check_error(case, 401, body, response.headers, code)


def _probe_methods(fuzzer: Fuzzer) -> None:
    """Every undeclared method on every path: 405 (before authentication), ``Allow`` lists
    the methods of every template the path matches, and the error document."""
    examples = {"{volume_id}": "vol-405", "{peer_id}": "10.0.0.9:vol-405"}
    for template, _ in fuzzer.routes:
        path = "/".join(examples.get(part, part) for part in template.split("/")) or "/"
        allowed = {m for t, methods in fuzzer.routes if _match(t, path) for m in methods}
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"):
            if method in allowed:
                continue
            for token in (True, False):
                response = fuzzer.raw("405", method, path, token=token)
                if response.status_code != 405:
                    fuzzer.fail(None, f"{method} {path}: {response.status_code}, want 405")
                    continue
                got = set(response.headers.get("Allow", "").split(", "))
                if got != allowed:
                    fuzzer.fail(None, f"{method} {path}: Allow {got}, want {allowed}")
                if method != "HEAD":
                    body, code = response.json(), "volt.method_not_allowed"
                    fuzzer.check_error(None, 405, body, response.headers, code)


def _probe_bodies(fuzzer: Fuzzer, operations: list[Any]) -> None:
    """Bodies the generators never send: too large, not JSON, not UTF-8, nested too deep.
    Query, register and heartbeat must refuse them; every other operation never reads a
    body: it answers as if there were none, and closes the connection."""
    bodies = {
        413: [b'{"host": "' + b"a" * (64 * 1024) + b'"}', b" " * (64 * 1024 + 1)],
        400: [
            b"{",
            b"\xff\xfe{}",
            b'{"host": "10.0.0.1"',
            # 30000 nested arrays fit in 64 KiB but not in the JSON parser's recursion limit.
            b"[" * 30000 + b"]" * 30000,
            b'{"a":' * 10000 + b"1" + b"}" * 10000,
        ],
    }
    ids = {"volume_id": SEED_VOLUME, "peer_id": SEED_PEER}
    for operation in operations:
        params = {k: v for k, v in ids.items() if k in _path_names(operation)}
        case = operation.Case(path_parameters=params)
        path = operation.path.format(**params)
        method = operation.method.upper()
        reads = (method, operation.path) in TAKES_BODY
        for status, payloads in bodies.items():
            for payload in payloads:
                if status == 413:
                    response = fuzzer.oversized(method, path, payload)
                else:
                    headers = {"Content-Type": "application/json"}
                    response = fuzzer.raw("bodies", method, path, data=payload, headers=headers)
                fuzzer.statuses[(operation.label, response.status_code)] += 1
                if not reads:
                    if response.status_code in (400, 413) or response.status_code >= 500:
                        got = f"{response.status_code} from an operation that takes no body"
                        fuzzer.fail(case, f"{len(payload)}-byte body {payload[:20]!r}: {got}")
                    elif response.headers.get("Connection", "").lower() != "close":
                        fuzzer.fail(case, "an unread body left the connection open")
                    continue
                if response.status_code != status:
                    got = f"{response.status_code}, want {status}"
                    fuzzer.fail(case, f"{len(payload)}-byte body {payload[:20]!r}: {got}")
                    continue
                fuzzer.check(case, response, CONFORMANCE)
                if method != "HEAD":
                    code = "volt.body_too_large" if status == 413 else "volt.malformed_body"
                    fuzzer.check_error(case, status, response.json(), response.headers, code)
