"""What the tests of vmt-demo/vmt-initenv.py share: the script loaded once as a module, the
tools it looks for, and a stand-in for their lookup and for the host-IP detection."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
VMT_DEMO = REPO / "vmt-demo"
TOOLS = ["qemu-storage-daemon", "qemu-img", "tgtd", "tgtadm", "fusermount3"]
WANTS = "etc/systemd/system/multi-user.target.wants"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("vmt_initenv", VMT_DEMO / "vmt-initenv.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


initenv = _load()


def fake_tools(monkeypatch: pytest.MonkeyPatch, present: set[str]) -> None:
    """``present`` (a set the test may change) on PATH; detecting the host IP fails the
    test (every test gives ``--host-ip``)."""
    monkeypatch.setattr(
        initenv.shutil, "which", lambda tool: f"/usr/bin/{tool}" if tool in present else None
    )

    def no_detection() -> str:
        raise AssertionError("detect_host_ip called although --host-ip was given")

    monkeypatch.setattr(initenv.virtman_conf, "detect_host_ip", no_detection)
