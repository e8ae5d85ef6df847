#!/usr/bin/env python3
"""A burst of VMs through volt-api's cluster controller: one request for the whole burst.

``start`` waits until the controller sees ``--nodes-up`` nodes up, sends one
``POST /v1/clusters``, then follows the task, printing a line whenever the VMs' states
change (``vmtburst: 6 VMs: 0 placed, 4 deploying, 2 running, 0 failed (3.1 s)``) until every
VM is running or failed. ``--result`` gets ``{"task", "posted_at"}`` (epoch seconds of the
POST's answer) at once, then the final task (``GET /v1/clusters/{task}``) with
``posted_at``. ``delete`` destroys a finished task's VMs and waits until they are gone.
Exit status: 0 done, 1 failed (the failed VMs' errors are printed), 2 bad options.
docs/cluster.rst.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from brick.exception import Timeout
from brick.wait import wait_until
from voltclient import Client
from voltclient.exceptions import VoltClientError

POLL_S = 0.5
# A VM's controller state -> the progress column it is counted in (docs/cluster.rst).
COLUMNS = {
    "PENDING": "placed",
    "CREATING": "deploying",
    "DEPLOYING": "deploying",
    "STARTING": "deploying",
    "RUNNING": "running",
    "ERROR": "failed",
}


def say(message: str) -> None:
    print(f"vmtburst: {message}", flush=True)


def progress(view: dict[str, Any]) -> str:
    """The task's VMs counted per column: ``6 VMs: 1 placed, 3 deploying, 2 running, 0
    failed`` (a VM in any other state, e.g. being deleted, under its own name)."""
    counts = Counter(COLUMNS.get(vm["status"], vm["status"].lower()) for vm in view["vms"])
    columns = ["placed", "deploying", "running", "failed"]
    columns += sorted(set(counts) - set(columns))
    return f"{len(view['vms'])} VMs: " + ", ".join(f"{counts[c]} {c}" for c in columns)


def follow(client: Client, task: str, until: Sequence[str], timeout_s: float) -> dict[str, Any]:
    """Poll the task, printing its progress when it changes, until its status is in
    ``until``; the last view."""
    started = time.monotonic()
    shown = ""

    def finished() -> dict[str, Any] | None:
        nonlocal shown
        view = client.clusters.get(task)
        line = progress(view)
        if line != shown:
            shown = line
            say(f"{line} ({time.monotonic() - started:.1f} s)")
        return view if view["status"] in until else None

    return wait_until(
        finished, timeout_s=timeout_s, what=f"cluster task {task}", max_interval_s=POLL_S
    )


def start(client: Client, args: argparse.Namespace) -> int:
    def enough_up() -> list[str] | None:
        up = [n["id"] for n in client.clusters.nodes() if n["status"] == "up" and not n["stale"]]
        return up if len(up) >= args.nodes_up else None

    up = wait_until(enough_up, timeout_s=60, what=f"{args.nodes_up} nodes up", max_interval_s=0.3)
    say(f"the controller sees {len(up)} nodes up: {', '.join(up)}")
    task = client.clusters.create(
        args.image, args.count, args.vcpus, args.memory_mb, name=args.name
    )
    posted_at = time.time()
    args.result.write_text(json.dumps({"task": task, "posted_at": posted_at}) + "\n")
    say(f"POST /v1/clusters: {args.count} VMs of {args.image}, task {task}")
    view = follow(client, task, ("DONE", "FAILED"), args.timeout)
    args.result.write_text(json.dumps({**view, "posted_at": posted_at}, indent=1) + "\n")
    for vm in view["vms"]:
        if vm["status"] == "ERROR":
            say(f"{vm['name']} ({vm['userid']}) failed on {vm['node']}: {vm['error']}")
    say(f"task {task} {view['status']}")
    return 0 if view["status"] == "DONE" else 1


def delete(client: Client, args: argparse.Namespace) -> int:
    client.clusters.delete(args.task)
    view = follow(client, args.task, ("DELETED", "FAILED", "DONE"), args.timeout)
    say(f"task {args.task} {view['status']}")
    return 0 if view["status"] == "DELETED" else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmtburst.py", description=__doc__.split("\n")[0])
    parser.add_argument("--volt", required=True, help="volt-api's URL.")
    parser.add_argument(
        "--token-file", type=Path, required=True, help="A file holding the admin token."
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="Seconds for the task.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    burst = verbs.add_parser("start", help="Start a burst and follow it until it is done.")
    burst.add_argument("image")
    burst.add_argument("--count", type=int, required=True)
    burst.add_argument("--vcpus", type=int, default=1)
    burst.add_argument("--memory-mb", type=int, default=128)
    burst.add_argument("--name", help="The VMs' name prefix (default: the image).")
    burst.add_argument("--nodes-up", type=int, default=1, help="Nodes to wait for first.")
    burst.add_argument("--result", type=Path, required=True, help="Where the final task goes.")
    gone = verbs.add_parser("delete", help="Destroy a finished task's VMs and wait.")
    gone.add_argument("task")
    args = parser.parse_args(argv)
    client = Client(args.volt, token=args.token_file.read_text().strip())
    try:
        return start(client, args) if args.verb == "start" else delete(client, args)
    except (ValueError, VoltClientError, Timeout) as exc:
        say(f"FAILED: {exc}")
        return 2 if isinstance(exc, ValueError) else 1
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
