"""guestkit.deploy's cache key follows the wheel's content, not its timestamps; a
deployment run may let guests reboot, the other runs may not."""

from __future__ import annotations

import zipfile
from pathlib import Path

from guestkit.build import Guest
from guestkit.deploy import deploy_key, wheel_digest
from guestkit.run import Node, _qemu_argv


def make_wheel(path: Path, files: dict[str, bytes], date: tuple[int, ...]) -> Path:
    with zipfile.ZipFile(path, "w") as whl:
        for name, data in files.items():
            whl.writestr(zipfile.ZipInfo(name, date_time=date), data)  # type: ignore[arg-type]
    return path


def test_the_key_ignores_timestamps_and_follows_the_bytes(tmp_path: Path) -> None:
    files = {"volt/__init__.py": b"x = 1\n", "vmthunder-0.1.0.dist-info/RECORD": b"r\n"}
    one = make_wheel(tmp_path / "1.whl", files, (2026, 1, 1, 0, 0, 0))
    two = make_wheel(tmp_path / "2.whl", dict(reversed(files.items())), (2026, 6, 6, 6, 6, 6))
    changed = make_wheel(
        tmp_path / "3.whl", {**files, "volt/__init__.py": b"x = 2\n"}, (2026, 1, 1, 0, 0, 0)
    )
    assert wheel_digest(one) == wheel_digest(two)
    assert wheel_digest(one) != wheel_digest(changed)
    assert deploy_key("base", one) == deploy_key("base", two)
    assert deploy_key("base", one) != deploy_key("other base", one)


def test_reboots_end_qemu_unless_allowed(tmp_path: Path) -> None:
    guest = Guest(*(tmp_path / n for n in ("k", "i", "r")), "key", "6.1", tmp_path / "m")
    common = dict(run_id="abc123", node_dir=tmp_path, payload=tmp_path / "p", taps=["t0"])
    argv = _qemu_argv(
        "qemu", guest, Node("A", 256, 1), append=(), coldplug=False, tb_size_mib=None, **common
    )  # type: ignore[arg-type]
    assert "-no-reboot" in argv
    argv = _qemu_argv(
        "qemu",
        guest,
        Node("A", 256, 1),
        append=(),
        coldplug=False,
        tb_size_mib=None,
        allow_reboot=True,
        **common,
    )  # type: ignore[arg-type]
    assert "-no-reboot" not in argv
