"""A stand-in virtmanserver guest API (XML-RPC, in memory) for controller tests that need
no real guests: ``python -m tests.functional.fakenode PORT [VCPUS MEMORY_MB [HOST]]`` (HOST:
an address in 127.0.0.0/8, default 127.0.0.1)."""

from __future__ import annotations

import sys
from typing import Any
from xmlrpc.server import SimpleXMLRPCServer


class Guests:
    def __init__(self, vcpus: int, memory_mb: int) -> None:
        self.vcpus, self.memory_mb = vcpus, memory_mb
        self.guests: dict[str, dict[str, Any]] = {}

    def guest_host_info(self) -> dict[str, Any]:
        return {"hypervisor_hostname": "fakenode", "vcpus": self.vcpus,
                "memory_mb": self.memory_mb, "vcpus_used": 0, "memory_mb_used": 0}  # fmt: skip

    def guest_create(self, userid: str, vcpus: int, memory_mb: int, disk_gb: int = 0) -> bool:
        self.guests[userid] = {"state": "off"}
        return True

    def guest_deploy(self, userid: str, image: str) -> bool:
        self.guests[userid]["image"] = image
        return True

    def guest_action(self, userid: str, action: str, options: Any = None) -> bool:
        self.guests[userid]["state"] = "on" if action == "start" else "off"
        return True

    def guest_delete(self, userid: str) -> bool:
        del self.guests[userid]
        return True

    def guest_list(self) -> list[str]:
        return sorted(self.guests)

    # live migration: the destination's side, then the source's (each node in its process)
    def guest_migrate_prepare(self, userid: str, vcpus: int, memory_mb: int, image: str) -> dict:
        self.guests[userid] = {"state": "incoming", "image": image}
        return {"disk": f"/fake/{userid}.qcow2"}

    def guest_migrate(self, userid: str, incoming: dict[str, Any]) -> dict[str, Any]:
        del self.guests[userid]
        return {"disk_bytes": str(16 << 20), "memory_bytes": str(90 << 20)}

    def guest_migrate_finish(self, userid: str) -> bool:
        self.guests[userid]["state"] = "on"
        return True

    def guest_migrate_abort(self, userid: str) -> str:
        if self.guests.get(userid, {}).get("state") == "incoming":
            del self.guests[userid]
        return "removed"


def main() -> None:
    port = int(sys.argv[1])
    vcpus, memory = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (4, 4096)
    host = sys.argv[4] if len(sys.argv) > 4 else "127.0.0.1"
    server = SimpleXMLRPCServer((host, port), logRequests=False, allow_none=True)
    server.register_instance(Guests(vcpus, memory))
    print("fakenode ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
