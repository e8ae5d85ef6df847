"""vmtburst.py against a stand-in controller: one POST for the whole burst, a progress line
per change, the result file, the exit status, and the delete."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

VMT_DEMO = Path(__file__).resolve().parents[3] / "vmt-demo"
if str(VMT_DEMO) not in sys.path:
    sys.path.insert(0, str(VMT_DEMO))

import vmtburst  # noqa: E402

TASK = "0b1e6a52-5f4e-4c8e-9d55-0e1c2f3a4b5c"


def view(status: str, *states: str) -> dict[str, Any]:
    vms = [
        {"name": f"vm-{i}", "userid": f"V{i}", "node": f"n{i % 2 + 1}", "status": s, "error": None}
        for i, s in enumerate(states)
    ]
    for vm in vms:
        if vm["status"] == "ERROR":
            vm["error"] = "guest_deploy on n1: no room"
    return {"task": TASK, "status": status, "vms": vms}


class Clusters:
    """The controller as client.clusters sees it: the views in turn, then the last."""

    def __init__(self, views: list[dict[str, Any]], nodes_up: int = 2) -> None:
        self.views = views
        self.up = nodes_up
        self.posts: list[tuple[Any, ...]] = []
        self.deleted: list[str] = []

    def nodes(self) -> list[dict[str, Any]]:
        return [{"id": f"n{i + 1}", "status": "up", "stale": False} for i in range(self.up)]

    def create(self, *args: Any, **kwargs: Any) -> str:
        self.posts.append((*args, kwargs))
        return TASK

    def get(self, task: str) -> dict[str, Any]:
        assert task == TASK
        return self.views.pop(0) if len(self.views) > 1 else self.views[0]

    def delete(self, task: str) -> None:
        self.deleted.append(task)


class FakeClient:
    def __init__(self, clusters: Clusters) -> None:
        self.clusters = clusters
        self.closed = False

    def close(self) -> None:
        self.closed = True


def run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, clusters: Clusters, *argv: str
) -> tuple[int, FakeClient]:
    client = FakeClient(clusters)
    tokens: list[str] = []

    def make(url: str, token: str) -> FakeClient:
        assert url == "http://10.0.0.1:7447"
        tokens.append(token)
        return client

    monkeypatch.setattr(vmtburst, "Client", make)
    token_file = tmp_path / "token"
    token_file.write_text("secret\n")
    code = vmtburst.main(["--volt", "http://10.0.0.1:7447", "--token-file", str(token_file), *argv])
    assert tokens == ["secret"] and client.closed
    return code, client


def test_progress_counts_each_column() -> None:
    line = vmtburst.progress(
        view("IN_PROGRESS", "PENDING", "CREATING", "DEPLOYING", "STARTING", "RUNNING", "ERROR")
    )
    assert line == "6 VMs: 1 placed, 3 deploying, 1 running, 1 failed"
    assert vmtburst.progress(view("DELETING", "DELETING", "DELETED")) == (
        "2 VMs: 0 placed, 0 deploying, 0 running, 0 failed, 1 deleted, 1 deleting"
    )


def test_start_sends_one_post_prints_each_change_and_writes_the_task(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    views = [
        view("IN_PROGRESS", "PENDING", "PENDING"),
        view("IN_PROGRESS", "PENDING", "PENDING"),
        view("IN_PROGRESS", "DEPLOYING", "CREATING"),
        view("IN_PROGRESS", "RUNNING", "STARTING"),
        view("DONE", "RUNNING", "RUNNING"),
    ]
    clusters = Clusters(views)
    result = tmp_path / "burst.json"
    code, _ = run(
        monkeypatch, tmp_path, clusters, "start", "image1", "--count", "2", "--name", "vm",
        "--nodes-up", "2", "--result", str(result),
    )  # fmt: skip
    assert code == 0
    assert clusters.posts == [("image1", 2, 1, 128, {"name": "vm"})]
    lines = [line.rsplit(" (", 1)[0] for line in capsys.readouterr().out.splitlines()]
    assert lines == [
        "vmtburst: the controller sees 2 nodes up: n1, n2",
        f"vmtburst: POST /v1/clusters: 2 VMs of image1, task {TASK}",
        "vmtburst: 2 VMs: 2 placed, 0 deploying, 0 running, 0 failed",
        "vmtburst: 2 VMs: 0 placed, 2 deploying, 0 running, 0 failed",
        "vmtburst: 2 VMs: 0 placed, 1 deploying, 1 running, 0 failed",
        "vmtburst: 2 VMs: 0 placed, 0 deploying, 2 running, 0 failed",
        f"vmtburst: task {TASK} DONE",
    ]
    written = json.loads(result.read_text())
    assert written["task"] == TASK and written["status"] == "DONE"
    assert [vm["node"] for vm in written["vms"]] == ["n1", "n2"]
    assert isinstance(written["posted_at"], float)


def test_a_failed_burst_exits_1_naming_the_failed_vm(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clusters = Clusters([view("FAILED", "RUNNING", "ERROR")])
    result = tmp_path / "burst.json"
    code, _ = run(
        monkeypatch, tmp_path, clusters, "start", "image1", "--count", "2",
        "--result", str(result),
    )  # fmt: skip
    assert code == 1
    out = capsys.readouterr().out
    assert "vmtburst: vm-1 (V1) failed on n2: guest_deploy on n1: no room" in out
    assert json.loads(result.read_text())["status"] == "FAILED"


def test_a_refused_argument_is_exit_2_and_nothing_is_posted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class Refusing(Clusters):
        def create(self, *args: Any, **kwargs: Any) -> str:
            raise ValueError("count must be an integer in [1, 256], not 0")

    clusters = Refusing([view("DONE")])
    code, _ = run(
        monkeypatch, tmp_path, clusters, "start", "image1", "--count", "0",
        "--result", str(tmp_path / "r.json"),
    )  # fmt: skip
    assert code == 2
    assert "vmtburst: FAILED: count must be" in capsys.readouterr().out
    assert not (tmp_path / "r.json").exists()


def test_delete_waits_until_every_vm_is_deleted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clusters = Clusters([view("DELETING", "DELETING", "DELETED"), view("DELETED", "DELETED")])
    code, _ = run(monkeypatch, tmp_path, clusters, "delete", TASK)
    assert code == 0 and clusters.deleted == [TASK]
