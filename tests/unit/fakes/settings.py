"""Virtman settings for tests: every directory under a temporary one, Volt unreachable, the
heartbeat an hour apart (tests call ``heartbeat()`` themselves); and an image connection."""

from __future__ import annotations

from pathlib import Path

from virtman.conf import Settings

CONN = {
    "target_portal": "10.0.0.1:3260",
    "target_iqn": "iqn.2010-10.org.openstack:volume-img",
    "target_lun": 1,
}


def settings(tmp_path: Path, host_ip: str = "10.0.0.9") -> Settings:
    return Settings(
        host_ip=host_ip,
        master_url="http://127.0.0.1:1",
        master_token=None,
        heartbeat_interval=3600,
        state_dir=tmp_path,
        cache_dir=tmp_path / "cache",
        instances_dir=tmp_path / "instances",
        run_dir=tmp_path / "run",
    )
