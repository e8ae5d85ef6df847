"""vSphere backend: settings checks, the generated WSDL, the undo of a failed boot."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from virtman.guest import vimwsdl
from virtman.guest.domains import InvalidVMInput
from virtman.guest.vcenter import VCenterMachines, VCenterSettings, VCenterTaskFailed

GOOD = dict(host="127.0.0.1", username="u", password="p")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"password": ""}, "vcenter.password"),
        ({"username": None}, "vcenter.username"),
        ({"host": "192.0.2.1", "scheme": "http"}, "vcenter.scheme"),
    ],
)
def test_bad_settings_name_the_option(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidVMInput) as err:
        VCenterSettings(**{**GOOD, **changes})
    assert err.value.field == field


def test_http_to_loopback_and_https_anywhere_are_accepted() -> None:
    assert VCenterSettings(**GOOD, scheme="http", port=8989).endpoint == "http://127.0.0.1:8989"
    assert VCenterSettings(**{**GOOD, "host": "vc.example"}).endpoint == "https://vc.example:443"


def test_wsdl_declares_every_call(tmp_path: Path) -> None:
    url = vimwsdl.write(tmp_path / "vim.wsdl")
    assert url == (tmp_path / "vim.wsdl").as_uri()
    root = ET.parse(tmp_path / "vim.wsdl").getroot()
    ns = {"w": "http://schemas.xmlsoap.org/wsdl/"}
    ops = [op.get("name") for op in root.findall("w:portType/w:operation", ns)]
    assert ops == list(vimwsdl.METHODS)
    assert {"CreateVM_Task", "FindByUuid", "Destroy_Task", "Login"} <= set(ops)
    imports = [
        i.get("schemaLocation") for i in root.iter("{http://www.w3.org/2001/XMLSchema}import")
    ]
    assert all(Path(i.removeprefix("file://")).is_file() for i in imports if i)


def test_power_on_failure_destroys_the_new_vm() -> None:
    """Only the ordering is faked here; the real calls run in tests/functional."""
    calls: list[str] = []
    vms = object.__new__(VCenterMachines)
    vms.prefix = "vmt-"
    existing: list[str] = []

    def run_task(call: str, target: str, start: Any) -> Any:
        calls.append(call)
        existing.append("g1")
        return "vm-1"

    def task(call: str, target: str, moref: Any, **kw: Any) -> None:
        calls.append(call)
        raise VCenterTaskFailed(call, target, "boom")

    def destroy(instance: str) -> None:
        calls.append(f"destroy {instance}")
        existing.remove(instance)

    vms._owned = lambda instance: None  # type: ignore[method-assign]
    vms._inv = lambda: SimpleNamespace(vm_folder="f", pool="p")  # type: ignore[method-assign]
    vms._config_spec = lambda i, c, m: SimpleNamespace(name=f"vmt-{i}")  # type: ignore[method-assign]
    vms._run_task = run_task  # type: ignore[method-assign]
    vms._task = task  # type: ignore[method-assign]
    vms.destroy = destroy  # type: ignore[method-assign]
    with pytest.raises(VCenterTaskFailed, match="PowerOnVM_Task for vmt-g1 failed: boom"):
        vms.boot("g1")
    assert calls == ["CreateVM_Task", "PowerOnVM_Task", "destroy g1"]
    assert existing == []


@pytest.mark.parametrize(
    ("field", "value"), [("vcpus", 0), ("memory_mb", True), ("instance_name", "a b")]
)
def test_bad_boot_input_names_the_field(field: str, value: object) -> None:
    vms = object.__new__(VCenterMachines)
    vms.prefix = "vmt-"
    args: dict[str, Any] = {"instance_name": "g", "vcpus": 1, "memory_mb": 64, field: value}
    with pytest.raises(InvalidVMInput) as err:
        vms.boot(**args)
    assert err.value.field == field
