"""Real VM boots for ``bench/provision.py --real-boots K``: the calibration of the replay.

Each of K nodes creates its VMThunder snapshot of the image through its virtmanserver (the
``create`` RPC, as every VMThunder variant does) and boots one real guest on it under
libvirt/QEMU (TCG, in the root mount namespace where the node's export is visible); a
boot is timed from the burst's start to the guest's marker on its serial console. The
libvirt daemons are the functional tests' shared ones (``/run/vmt-test-libvirt``): a
running test session's are used and left running, ours are stopped by PID by the last user.

The pure part (``calibration_line``, ``calibration_json``) is what ``tests/unit`` checks.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import guestimage
from cluster import LocalCluster

from brick.libvirtd import LibvirtDaemons
from brick.wait import wait_until
from virtman.guest.domains import VirtualMachines

LIBVIRT_RUN = Path("/run/vmt-test-libvirt")  # shared with tests/functional/vmfixtures.py
MEMORY_MIB = 256  # what bench/boottrace.py records the boot with
PANIC = "Kernel panic"


def calibration_json(
    nodes: int, real_p99: float, replay_p99: float, sim_p99: float
) -> dict[str, Any]:
    """The three figures of a calibration, with the ratios the model is judged by."""
    return {
        "nodes": nodes,
        "real_p99": real_p99,
        "replay_p99": replay_p99,
        "simulated_p99": sim_p99,
        "real_over_replay": real_p99 / replay_p99 if replay_p99 > 0 else None,
        "real_over_simulated": real_p99 / sim_p99 if sim_p99 > 0 else None,
    }


def calibration_line(calibrated: dict[str, Any]) -> str:
    """The one line that puts the three figures side by side."""
    return (
        f"provision: calibration nodes {calibrated['nodes']} real p99 "
        f"{calibrated['real_p99']:.1f} s, replay p99 {calibrated['replay_p99']:.1f} s, "
        f"simulated p99 {calibrated['simulated_p99']:.1f} s"
    )


class RealBoots:
    """One real guest per node on the node's snapshot; ``close`` removes every domain it
    booted (even after a failure), then lets go of the libvirt daemons."""

    def __init__(
        self,
        cluster: LocalCluster,
        guest: guestimage.GuestImage,
        workdir: Path,
        prefix: str,
        timeout_s: float,
    ) -> None:
        self.cluster = cluster
        self.guest = guest
        self.workdir = workdir
        self.timeout_s = timeout_s
        self.daemons = LibvirtDaemons(LIBVIRT_RUN, fix_kvm_device=True, shared=True)
        # checks the prefix and connects lazily: nothing to undo if it refuses
        self.vms = VirtualMachines(self.daemons.uri, prefix=prefix)
        self.daemons.start()
        self.lock = threading.Lock()  # one libvirt call at a time on the shared connection
        self.booted: list[str] = []
        self.closing = threading.Event()  # ends the waits of a burst that is torn down

    def boot(self, node: str, instance: str, volume: str, image: str) -> float:
        """Create ``instance``'s snapshot on ``node``, boot a VM on it, and return the seconds
        until its console showed the guest's marker."""
        started = time.monotonic()
        answer = str(self.cluster.rpc(node, "create", instance, image,
                                      self.cluster.connection(volume)))  # fmt: skip
        if not answer.startswith("0:"):
            raise RuntimeError(f"create on {node}: {answer}")
        console = self.workdir / f"{instance}.console"
        with self.lock:
            if self.closing.is_set():
                raise RuntimeError(f"the real VM on {node}: the benchmark is shutting down")
            self.booted.append(instance)
            self.vms.boot(
                instance, answer[2:], kernel=self.guest.kernel, initrd=self.guest.initrd,
                cmdline=self.guest.cmdline, console_log=console, memory_mib=MEMORY_MIB,
            )  # fmt: skip
        fields = wait_until(
            lambda: self._marker(console),
            timeout_s=self.timeout_s,
            what=f"the real VM on {node} to print its marker",
            max_interval_s=0.2,
            sleep=self.closing.wait,
        )
        elapsed = time.monotonic() - started
        if not self.guest.marker_matches(fields):
            raise RuntimeError(f"the real VM on {node} read the wrong disk: {fields}")
        return elapsed

    def _marker(self, console: Path) -> dict[str, str] | None:
        """The marker's fields, None while booting; a failed guest, or ``close``, raises at
        once (the burst's threads must not outlive the teardown)."""
        if self.closing.is_set():
            raise RuntimeError("the benchmark is shutting down")
        text = console.read_text(errors="replace") if console.exists() else ""
        fields = guestimage.parse_marker(text)
        if fields is None and (guestimage.FAIL_MARKER in text or PANIC in text):
            raise RuntimeError(f"the guest failed; console {console}:\n{text[-800:]}")
        return fields

    def destroy_vms(self) -> list[str]:
        """Power off and undefine every domain booted here; the errors, as text."""
        errors = []
        with self.lock:
            for instance in self.booted:
                try:
                    self.vms.destroy(instance)
                except Exception as exc:  # the others still go
                    errors.append(f"{instance}: {exc}")
            self.booted.clear()
        return errors

    def close(self) -> list[str]:
        self.closing.set()
        errors = self.destroy_vms()
        self.vms.close()
        try:
            self.daemons.stop()
        except Exception as exc:
            errors.append(f"libvirt daemons: {exc}")
        return errors
