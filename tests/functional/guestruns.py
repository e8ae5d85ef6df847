"""Boot guestkit guests that run a script of tests/functional/guestside/ (see common.py).

Every guest suite (a module using ``module_fixtures``) boots its guests once, when its first
test needs them, and waits for them; no other test runs meanwhile. One suite at a time:
both suites side by side (eight TCG guests on this 2-core machine) took 23.7 min in CI on
2026-12-07; one after the other they took 7.5 + 4.7 min (2026-12-08, CPU model ``max``),
and 5.7 + 3.4 min with guestkit's ``qemu64`` (``guestkit.run.CPU``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from guestkit import Node, RunResult, build_guest, run_guests

GUESTSIDE = Path(__file__).resolve().parent / "guestside"
# One suite alone takes 3-6 min here (four TCG guests on this 2-core machine, nothing else
# running). The bound detects a hang; a test's own bound covers its suite's boot.
SUITE_TIMEOUT_S = 1800.0
TEST_TIMEOUT_S = 2100
RUN_SH = """#!/bin/sh
mkdir -p /etc/rtslib-fb-target
modprobe fuse
[ "$CI_role" = S ] || iscsid || exit 1
exec python3 -u /ci/guestside/{script}
"""
# guestside.common.kernel_state() on a dm node that destroyed everything and stopped
NOTHING_LEFT = {
    "dm": ["No devices found"],
    "sessions": [],
    "lio": [],
    "lio_storage": [],
    "loops": [],
    "bcache_sets": [],
}


def run_guest_script(
    payload: Path,
    nodes: list[Node],
    script: str,
    *,
    work_dir: Path,
    size_mib: int,
    timeout_s: float,
    files: Sequence[Path] = (),
) -> RunResult:
    """Boot ``nodes``, each running ``guestside/<script>`` with role = its name. ``files``
    are copied to ``/ci/<name>`` in the guests (a benchmark of ``bench/``, say)."""
    guest = build_guest()
    (payload / "run.sh").write_text(RUN_SH.format(script=script))
    (payload / "run.sh").chmod(0o755)
    shutil.copytree(GUESTSIDE, payload / "guestside", ignore=shutil.ignore_patterns("__py*"))
    for path in files:
        shutil.copy(path, payload / path.name)
    shutil.rmtree(work_dir, ignore_errors=True)
    return run_guests(
        guest,
        nodes,
        payload,
        timeout_s=timeout_s,
        append=[f"ci.size={size_mib}"],
        work_dir=work_dir,
        fail_grace_s=30,
    )


def show(result: RunResult) -> None:
    """Print the summary (with the wall time) and the consoles of the guests that failed."""
    print(result.summary())
    for node in result.nodes.values():
        if not node.ok:
            print(f"--- {node.node.name} console ---\n{node.console_text()[-20000:]}")


def reports(run: RunResult) -> dict[str, dict[str, Any]]:
    """Each guest's /ci/out/result.json ({} when it wrote none)."""
    found = {}
    for name, node in run.nodes.items():
        try:
            found[name] = json.loads(node.result_text("result.json"))
        except (OSError, ValueError, TypeError):
            found[name] = {}
    return found


def assert_every_guest_passed(run: RunResult, report: dict[str, dict[str, Any]]) -> None:
    for name in run.nodes:
        steps = report[name].get("steps", [])
        print(name, [(s["step"][:40], s["ok"], s["s"]) for s in steps])
    assert run.ok, run.summary() + "".join(
        f"\n{n}: {r.get('error', '')}" for n, r in report.items() if r.get("error")
    )


def module_fixtures(
    module: str,
    nodes: list[Node],
    script: str,
    *,
    work_dir: Path,
    size_mib: int,
    timeout_s: float = SUITE_TIMEOUT_S,
    files: Sequence[Path] = (),
) -> tuple[Callable[..., RunResult], Callable[..., dict[str, dict[str, Any]]]]:
    """The ``run`` and ``report`` fixtures of guest test module ``module``: one boot of
    ``nodes`` for the module, and each node's result.json."""

    def boot(payload: Path) -> RunResult:
        return run_guest_script(
            payload,
            nodes,
            script,
            work_dir=work_dir,
            size_mib=size_mib,
            timeout_s=timeout_s,
            files=files,
        )

    @pytest.fixture(scope="module")
    def run(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
        result = boot(tmp_path_factory.mktemp(f"payload-{module.rsplit('.', 1)[-1]}"))
        show(result)
        return result

    @pytest.fixture(scope="module")
    def report(run: RunResult) -> dict[str, dict[str, Any]]:
        return reports(run)

    return run, report
