"""client.clusters: what it sends for a burst, how it reads the task, what it refuses unsent."""

from __future__ import annotations

import json
from typing import Any

import pytest

from voltclient import Client, exceptions
from voltclient.client import CLUSTER_LIMITS

TASK = "0b1e6a52-5f4e-4c8e-9d55-0e1c2f3a4b5c"


class Response:
    def __init__(self, status: int, body: Any) -> None:
        self.status_code = status
        self.content = json.dumps(body).encode() if body is not None else b""
        self.headers: dict[str, str] = {}


class Session:
    """Records each request and answers the next of ``answers``."""

    def __init__(self, *answers: tuple[int, Any]) -> None:
        self.answers = list(answers)
        self.sent: list[tuple[str, str, Any]] = []
        self.headers: dict[str, str] = {}

    def request(self, method: str, url: str, **kwargs: Any) -> Response:
        self.sent.append((method, url, kwargs.get("json")))
        return Response(*self.answers.pop(0))

    def close(self) -> None:
        pass


def client(*answers: tuple[int, Any]) -> tuple[Client, Session]:
    made = Client("http://10.0.0.1:7447", token="t")
    session = made.http_client.session = Session(*answers)  # type: ignore[assignment]
    return made, session


def test_create_sends_one_post_with_the_flavor_and_returns_the_task() -> None:
    api, session = client((202, {"task": TASK, "href": f"/v1/clusters/{TASK}"}))
    task = api.clusters.create("image1", 6, 1, 128, name="vm", nodes=["n1", "n2"])
    assert task == TASK
    assert session.sent == [
        (
            "POST",
            "http://10.0.0.1:7447/v1/clusters",
            {
                "image": "image1",
                "count": 6,
                "flavor": {"vcpus": 1, "memory_mb": 128},
                "name": "vm",
                "nodes": ["n1", "n2"],
            },
        )
    ]


def test_create_leaves_out_what_is_not_given() -> None:
    api, session = client((202, {"task": TASK}))
    api.clusters.create("tiny", 1, 2, 256)
    assert session.sent[0][2] == {
        "image": "tiny",
        "count": 1,
        "flavor": {"vcpus": 2, "memory_mb": 256},
    }


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        (("", 1, 1, 128), {}, "image"),
        (("a/b", 1, 1, 128), {}, "image"),
        (("img", 0, 1, 128), {}, "count"),
        (("img", 257, 1, 128), {}, "count"),
        (("img", True, 1, 128), {}, "count"),
        (("img", 1, 0, 128), {}, "vcpus"),
        (("img", 1, 1, 8), {}, "memory_mb"),
        (("img", 1, 1, 128.0), {}, "memory_mb"),
        (("img", 1, 1, 128), {"name": "-x"}, "name"),
        (("img", 1, 1, 128), {"name": "x" * 57}, "name"),
        (("img", 1, 1, 128), {"nodes": []}, "nodes"),
        (("img", 1, 1, 128), {"nodes": "n1"}, "nodes"),
        (("img", 1, 1, 128), {"nodes": ["n1", ""]}, "nodes"),
    ],
)
def test_create_refuses_bad_arguments_before_sending(
    args: tuple[Any, ...], kwargs: dict[str, Any], field: str
) -> None:
    api, session = client()
    with pytest.raises(ValueError, match=f"^{field} "):
        api.clusters.create(*args, **kwargs)
    assert session.sent == []


def test_a_burst_too_large_is_a_conflict_with_volt_api_s_numbers() -> None:
    detail = "4 VMs (4 vcpus, 512 MB) do not fit"
    api, _ = client(
        (409, {"errors": [{"code": "volt.cluster.insufficient_capacity", "detail": detail}]})
    )
    with pytest.raises(exceptions.Conflict, match="do not fit") as caught:
        api.clusters.create("img", 4, 1, 128)
    assert caught.value.code == "volt.cluster.insufficient_capacity"


def test_get_delete_and_nodes_address_the_controller() -> None:
    view = {"task": TASK, "status": "IN_PROGRESS", "vms": [{"name": "vm-0", "status": "PENDING"}]}
    nodes = [{"id": "n1", "status": "up", "stale": False}]
    api, session = client((200, view), (202, {"task": TASK}), (200, nodes))
    assert api.clusters.get(TASK.upper()) == view
    api.clusters.delete(TASK)
    assert api.clusters.nodes() == nodes
    assert [(m, u) for m, u, _ in session.sent] == [
        ("GET", f"http://10.0.0.1:7447/v1/clusters/{TASK}"),
        ("DELETE", f"http://10.0.0.1:7447/v1/clusters/{TASK}"),
        ("GET", "http://10.0.0.1:7447/v1/nodes"),
    ]


@pytest.mark.parametrize("bad", ["", "../volumes", "1234", None])
def test_get_refuses_a_task_id_that_is_no_uuid(bad: Any) -> None:
    api, session = client()
    with pytest.raises(ValueError, match=r"^task_id "):
        api.clusters.get(bad)
    assert session.sent == []


def test_an_answer_without_vms_is_invalid() -> None:
    api, _ = client((200, {"task": TASK}))
    with pytest.raises(exceptions.InvalidResponse):
        api.clusters.get(TASK)


def test_what_the_client_sends_is_what_volt_api_accepts() -> None:
    """The client's checks and volt-api's agree at the edges (no drift between the two)."""
    from volt.cluster.api import MAX_COUNT, cluster_request

    assert CLUSTER_LIMITS["count"] == (1, MAX_COUNT)
    api, session = client((202, {"task": TASK}), (202, {"task": TASK}))
    api.clusters.create("i" * 255, MAX_COUNT, 256, 1 << 24, name="n" * 56, nodes=["n1"])
    api.clusters.create("i", 1, 1, 16, name="n")
    for _, _, body in session.sent:
        specs, nodes = cluster_request(body)
        assert len(specs) == body["count"] and nodes == body.get("nodes")
