"""What a master says of the cluster, as JSON on stdout: every tree (peer id -> tree parent
and the parents it would send the node) and every member host (seconds since its last
heartbeat). Run in a guest of test_deploy_guests.py with the venv's Python; VOLT_URL names
one master, VOLT_TOKEN is the admin token."""

from __future__ import annotations

import json
import os
import sys

from voltclient.client import Client


def main() -> int:
    with Client(os.environ["VOLT_URL"], os.environ["VOLT_TOKEN"], timeout=60.0) as client:
        trees = {}
        for volume in client.volumes.list():
            nodes = client.volumes.list(str(volume["id"]))
            trees[str(volume["id"])] = {
                str(n["peer_id"]): {"parent": n.get("parent"), "parents": n.get("parents")}
                for n in nodes
            }
        members = {str(m["host"]): m.get("seconds_since_heartbeat") for m in client.members.list()}
    json.dump({"trees": trees, "members": members}, sys.stdout, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
