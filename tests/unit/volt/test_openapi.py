"""volt/api/openapi.json: a valid OpenAPI 3.0.3 document that matches the code it documents.

The route table of ``volt.api.app`` is the single list of the API: the document must have
exactly its (path, method) pairs, so neither can drift from the other (the table of a
volt-api with the cluster controller, which routes every path). The input patterns
must accept exactly what ``volt.validation`` accepts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from volt import validation
from volt.api.app import VoltApp, route_table
from volt.api.handlers import Handlers
from volt.api.request import Request
from volt.cluster.api import CLUSTER_KEYS
from volt.cluster.controller import ACTIONS, Controller
from volt.errors import InvalidInput
from volt.service import VoltService
from volt.store import Store
from volt.topology import load_executor

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
OPEN_PATHS = {"/", "/openapi.json", "/status", "/status/{name}"}  # the page holds no data
# Statuses an operation can answer (besides 405, which no declared method answers). Only
# query, register and heartbeat read a body (400 for a bad one, 413, 408).
EXPECTED_STATUSES = {
    ("/", "get"): {"300"},
    ("/metrics", "get"): {"200", "401"},
    ("/openapi.json", "get"): {"200"},
    ("/v1/volumes", "get"): {"200", "401"},
    ("/v1/volumes/query/{volume_id}", "get"): {"200", "400", "401", "403", "408", "413", "503"},
    ("/v1/volumes/{volume_id}", "get"): {"200", "400", "401", "403", "404"},
    ("/v1/volumes/{volume_id}", "head"): {"200", "400", "401", "403", "404"},
    ("/v1/volumes/{volume_id}", "delete"): {"200", "400", "401", "403", "404", "503"},
    ("/v1/volumes/{volume_id}/{peer_id}", "post"): {
        *("200", "400", "401", "403", "404", "408", "409", "413", "503"),
    },
    ("/v1/volumes/{volume_id}/{peer_id}", "delete"): {"200", "400", "401", "403", "404", "503"},
    ("/v1/volumes/{volume_id}/{peer_id}/dead-parent", "post"): {
        *("202", "400", "401", "403", "404", "408", "413", "503"),
    },
    ("/v1/members", "get"): {"200", "401", "403"},
    ("/v1/members/heartbeat", "put"): {"200", "400", "401", "403", "408", "413"},
    ("/v1/clusters", "post"): {"202", "400", "401", "403", "408", "409", "413"},
    ("/v1/clusters/{task_id}", "get"): {"200", "400", "401", "403", "404"},
    ("/v1/clusters/{task_id}", "delete"): {"202", "400", "401", "403", "404", "409"},
    ("/v1/vms/{vm_id}", "get"): {"200", "400", "401", "403", "404"},
    ("/v1/vms/{vm_id}/action", "post"): {"202", "400", "401", "403", "404", "408", "409", "413"},
    ("/v1/vms/{vm_id}/migrate", "post"): {"202", "400", "401", "403", "404", "408", "409", "413"},
    ("/v1/nodes", "get"): {"200", "401", "403"},
    ("/groupmanager", "post"): {"200", "400", "401", "403", "404", "408", "409", "413"},
    ("/bootstrap", "get"): {"200", "401", "403", "404"},
    ("/bootstrap", "post"): {"200", "400", "401", "403", "404", "408", "409", "413"},
    ("/v1/status", "get"): {"200", "401", "403"},
    ("/status", "get"): {"200"},
    ("/status/{name}", "get"): {"200", "404"},
}
SNOOZE_PATHS = {"/groupmanager", "/bootstrap"}


def load() -> dict[str, Any]:
    """The document as packaged (volt-api reads it with importlib.resources too)."""
    raw = resources.files("volt.api").joinpath("openapi.json").read_text(encoding="utf-8")
    parsed: dict[str, Any] = json.loads(raw)
    return parsed


DOC = load()


@pytest.fixture
def doc() -> dict[str, Any]:
    return load()


@pytest.fixture
def app(tmp_path: Path) -> Iterator[VoltApp]:
    store = Store(f"sqlite:///{tmp_path / 'volt.sqlite'}")
    service = VoltService(store, load_executor("balanced"), node_timeout=60)
    cluster = Controller(store, [])
    yield VoltApp(service, auth_token="t", cluster=cluster)
    cluster.close()
    store.dispose()


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def node_ref_parts(ref: str) -> list[str]:
    assert ref.startswith("#/"), ref
    return ref[2:].split("/")


def deref(doc: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        target: Any = doc
        for part in node_ref_parts(node["$ref"]):
            target = target[part]
        node = target
    return node


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def test_the_document_is_openapi_3_0_3(doc: dict[str, Any]) -> None:
    assert doc["openapi"] == "3.0.3"
    assert doc["info"]["title"] and doc["info"]["version"] and doc["info"]["description"]
    schemathesis = pytest.importorskip("schemathesis")
    schemathesis.openapi.from_dict(doc).validate()  # the OpenAPI 3.0 meta-schema


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    found = set(refs(doc))
    assert found
    for ref in found:
        deref(doc, {"$ref": ref})


def test_the_paths_and_methods_are_the_route_table(doc: dict[str, Any], app: VoltApp) -> None:
    routes = route_table(Handlers(app.service), app)
    in_code = {(path, method.lower()) for path, methods in routes for method in methods}
    in_doc = {(path, method) for path, method, _ in operations(doc)}
    assert in_doc == in_code
    assert in_code == set(EXPECTED_STATUSES)


def test_every_routed_path_is_documented(doc: dict[str, Any], app: VoltApp) -> None:
    routed = {template for template, _, _ in app.routes}
    assert routed - set(doc["paths"]) == set()
    assert {"/v1/clusters", "/v1/vms/{vm_id}/action", "/groupmanager"} <= routed


def test_volt_api_serves_this_document(doc: dict[str, Any], app: VoltApp) -> None:
    request = Request("GET", "/openapi.json", {}, "127.0.0.1", {})
    response = app.openapi(request)
    assert response.status == 200 and response.content_type == "application/json"
    assert response.raw is not None and json.loads(response.raw) == doc


def test_every_status_is_documented(doc: dict[str, Any]) -> None:
    for path, method, operation in operations(doc):
        assert set(operation["responses"]) == EXPECTED_STATUSES[(path, method)], (path, method)
        assert operation["operationId"] and operation["description"], (path, method)


def test_responses_have_the_right_content_and_headers(doc: dict[str, Any]) -> None:
    for path, method, operation in operations(doc):
        for status, response in operation["responses"].items():
            response = deref(doc, response)
            assert "X-Request-Id" in response["headers"], (path, method, status)
            content = response.get("content", {})
            if method == "head" or (status == "200" and method == "delete"):
                assert not content, (path, method, status)  # empty bodies
            elif path == "/metrics" and status == "200":
                assert list(content) == ["text/plain"]
            elif path == "/status" and status == "200":
                assert list(content) == ["text/html"]
            elif path == "/status/{name}" and status == "200":
                assert list(content) == ["text/javascript", "text/css"]
            elif path == "/groupmanager" and status == "200":  # a task id is text/plain
                assert list(content) == ["application/json", "text/plain"]
            else:
                assert list(content) == ["application/json"], (path, method, status)
            if int(status) >= 400 and content:
                schema = content["application/json"]["schema"]
                assert {"$ref": "#/components/schemas/Error"} in schema["allOf"]
                (item,) = [s for s in schema["allOf"] if "$ref" not in s]
                codes = item["properties"]["errors"]["items"]["properties"]
                assert codes["status"]["enum"] == [int(status)], (path, method, status)
    not_allowed = doc["components"]["responses"]["MethodNotAllowed"]
    assert "Allow" in not_allowed["headers"]


def test_the_token_guards_v1_and_metrics(doc: dict[str, Any]) -> None:
    scheme = doc["components"]["securitySchemes"]["token"]
    assert scheme == {**scheme, "type": "apiKey", "in": "header", "name": "X-Auth-Token"}
    assert "security" not in doc
    for path, method, operation in operations(doc):
        if path in OPEN_PATHS:
            assert "security" not in operation and "401" not in operation["responses"]
        else:
            assert path.startswith("/v1/") or path in {"/metrics", *SNOOZE_PATHS}
            assert operation["security"] == [{"token": []}], (path, method)
            assert "401" in operation["responses"]


def test_request_bodies(doc: dict[str, Any]) -> None:
    bodies = {
        (path, method): deref(doc, op["requestBody"]["content"]["application/json"]["schema"])
        for path, method, op in operations(doc)
        if "requestBody" in op
    }
    assert set(bodies) == {
        ("/v1/volumes/query/{volume_id}", "get"),
        ("/v1/volumes/{volume_id}/{peer_id}", "post"),
        ("/v1/volumes/{volume_id}/{peer_id}/dead-parent", "post"),
        ("/v1/members/heartbeat", "put"),
        ("/v1/clusters", "post"),
        ("/v1/vms/{vm_id}/action", "post"),
        ("/v1/vms/{vm_id}/migrate", "post"),
        ("/groupmanager", "post"),
        ("/bootstrap", "post"),
    }
    register = bodies[("/v1/volumes/{volume_id}/{peer_id}", "post")]
    assert register["required"] == ["host", "port", "iqn", "lun"]
    query = bodies[("/v1/volumes/query/{volume_id}", "get")]
    assert "required" not in query
    assert set(query["properties"]) == {"host", "port", "iqn", "lun", "peer_id"}
    action = bodies[("/v1/vms/{vm_id}/action", "post")]
    assert action["required"] == ["action"]
    assert set(action["properties"]["action"]["enum"]) == ACTIONS
    assert set(bodies[("/v1/clusters", "post")]["properties"]) == CLUSTER_KEYS
    assert bodies[("/v1/vms/{vm_id}/migrate", "post")]["required"] == ["destination"]
    assert bodies[("/v1/volumes/{volume_id}/{peer_id}/dead-parent", "post")]["required"] == [
        "parent"
    ]
    for where, body in bodies.items():
        if where[0] not in SNOOZE_PATHS:  # Snooze's bodies are its own
            assert body["additionalProperties"] is False


# -- the patterns agree with volt.validation ------------------------------------------------
def python_pattern(schema: dict[str, Any]) -> re.Pattern[str]:
    pattern = schema["pattern"]
    assert pattern.startswith("^") and pattern.endswith("$")
    return re.compile(pattern[:-1] + r"\Z")  # ECMA "$" is the end, Python's allows a "\n"


def schema_accepts(doc: dict[str, Any], name: str, value: object) -> bool:
    schema = doc["components"]["schemas"][name]
    variants = schema.get("oneOf", [schema])
    for variant in variants:
        if variant["type"] == "integer" and type(value) is int:
            if variant["minimum"] <= value <= variant["maximum"]:
                return True
        elif (
            variant["type"] == "string"
            and isinstance(value, str)
            and len(value) <= variant["maxLength"]
            and python_pattern(variant).match(value)
        ):
            return True
    return False


def server_accepts(check: Any, value: object) -> bool:
    try:
        check(value)
    except InvalidInput:
        return False
    return True


VALIDATORS = {
    "VolumeId": validation.volume_id,
    "Host": validation.host,
    "PeerId": validation.split_peer_id,
    "Port": validation.port,
    "Lun": validation.lun,
    "Iqn": validation.iqn,
}
EXAMPLES: dict[str, list[object]] = {
    "VolumeId": [
        "v",
        "volume-img1",
        "pool:img.1_x",
        "a" * 255,
        "a" * 256,
        "",
        "-a",
        "a/b",
        "a b",
        "é",
        "a\n",
    ],
    "Host": [
        "10.0.0.5",
        "255.255.255.255",
        "256.1.1.1",
        "01.2.3.4",
        "1.2.3",
        "fd00::5",
        "[fd00::5]",
        "[10.0.0.5]",
        "::ffff:10.0.0.5",
        "1:2:3:4:5:6:1.2.3.4",
        "fe80::1%eth0",
        "node-3.Example",
        "-a",
        "a-",
        "a" * 63,
        "a" * 64,
        ".".join(["a" * 63] * 4),
        ".".join(["a" * 63] * 3 + ["b" * 61]),
        "a..b",
        "[fd00::5",
        "",
        "host\n",
        "x_y",
    ],
    "PeerId": [
        "10.0.0.5:img1",
        "10.0.0.5:pool:img1",
        "[fd00::5]:img1",
        "fd00::5:img1",
        "[10.0.0.5]:img1",
        "[a]:img1",
        "node-3.example:img1",
        "1.2.3:img1",
        "10.0.0.5:",
        ":img1",
        "10.0.0.5",
        "[fe80::1%eth0]:img1",
        "[::ffff:1.2.3.4]:v",
        ".".join(["a" * 63] * 3 + ["b" * 61]) + ":v",
        ".".join(["a" * 63] * 3 + ["b" * 62]) + ":v",
        "h:" + "v" * 255,
        "h:" + "v" * 256,
    ],
    "Port": [
        1,
        65535,
        0,
        65536,
        "3260",
        "03260",
        "000001",
        "0000001",
        "0",
        "-1",
        "3260 ",
        "٣٢٦٠",
        True,
        3260.0,
        None,
    ],
    "Lun": [0, 16383, 16384, -1, "0", "000000", "16383", "16384", "1e3", False],
    "Iqn": [
        "iqn.2010-10.org.openstack:volume-img1",
        "iqn.2010-10.org",
        "iqn.2010-13.org",
        "iqn.2010-10.Org",
        "iqn.2010-10.org..x",
        "iqn.2010-10.org-.x",
        "iqn.٢٠١٠-10.org",
        "eui.0123456789ABCDEF",
        "eui.0123",
        "naa." + "f" * 32,
        "naa." + "f" * 24,
        "iqn.2010-10.o:" + "x" * 208,
        "iqn.2010-10.o:" + "x" * 209,
    ],
}


@pytest.mark.parametrize("name", sorted(VALIDATORS))
def test_patterns_accept_what_the_server_accepts(doc: dict[str, Any], name: str) -> None:
    for value in EXAMPLES[name]:
        expected = server_accepts(VALIDATORS[name], value)
        assert schema_accepts(doc, name, value) == expected, (name, value, expected)


PIECES = [
    "1.2.3.4",
    "255",
    "256",
    "01",
    "::",
    "::1",
    "fd00",
    "ffff",
    "%",
    "[",
    "]",
    ":",
    ".",
    "-",
    "a",
    "Z",
    "0",
    "9",
    "x" * 63,
    "vol",
    "_",
    " ",
    "\n",
    "é",
]


@settings(max_examples=500, deadline=None)
@given(parts=st.lists(st.sampled_from(PIECES), max_size=8))
def test_host_and_peer_id_patterns_match_the_server(parts: list[str]) -> None:
    value = "".join(parts)
    for name in ("Host", "PeerId", "VolumeId"):
        expected = server_accepts(VALIDATORS[name], value)
        assert schema_accepts(DOC, name, value) == expected, (name, value, expected)
