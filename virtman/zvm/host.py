"""``host_get_info`` from the node's own files, for when no guest manager answers it (the
guest manager's ``host_info`` asks libvirt instead and counts its guests' vCPUs and memory)."""

from __future__ import annotations

import os
import platform
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HOST_INFO_KEYS = (
    "hypervisor_hostname",
    "hypervisor_type",
    "hypervisor_version",
    "vcpus",
    "vcpus_used",
    "memory_mb",
    "memory_mb_used",
    "disk_total",
    "disk_used",
    "disk_available",
    "cpu_info",
    "ipl_time",
)


def local_host_info(diskpool: Callable[[], dict[str, int]]) -> dict[str, Any]:
    meminfo = _meminfo()
    total_mb = meminfo.get("MemTotal", 0) // 1024
    available_mb = meminfo.get("MemAvailable", 0) // 1024
    release = platform.release().split("-")[0].split(".")
    version = int(release[0]) * 1000 + int(release[1]) if len(release) > 1 else 0
    boot = time.time() - float(Path("/proc/uptime").read_text().split()[0])
    return {
        "hypervisor_hostname": socket.gethostname(),
        "hypervisor_type": "kvm",
        "hypervisor_version": version,
        "vcpus": os.cpu_count() or 1,
        "vcpus_used": 0,
        "memory_mb": total_mb,
        "memory_mb_used": total_mb - available_mb,
        **diskpool(),
        "cpu_info": {"architecture": platform.machine(), "cec_model": "none"},
        "ipl_time": "IPL at " + time.strftime("%m/%d/%y %H:%M:%S %Z", time.localtime(boot)),
    }


def _meminfo() -> dict[str, int]:
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[key] = int(fields[0])
    return values
