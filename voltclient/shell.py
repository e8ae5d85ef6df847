"""The ``volt`` command: look at and manage the trees of volt-api.

Examples::

    volt volume-list
    volt --endpoint http://master:7447 --token SECRET volume-show volume-img1
    volt --endpoint https://master:7447 --os-cacert ca.pem --token SECRET node-list
    volt node-list
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from brick import values
from voltclient.client import Client
from voltclient.exceptions import VoltClientError

DEFAULT_ENDPOINT = "http://127.0.0.1:7447"
ROOT_LABEL = "image server"


# -- formatting (pure) -------------------------------------------------------------------
def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Left-aligned columns separated by two spaces, a header line first."""
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


def format_volumes(volumes: Sequence[dict[str, Any]]) -> list[str]:
    """The ``volume-list`` table."""
    return format_table(("ID", "COUNT"), [(v.get("id"), v.get("count")) for v in volumes])


def format_members(members: Sequence[dict[str, Any]]) -> list[str]:
    """The ``node-list`` table: one row per host."""
    rows = []
    for m in members:
        seconds = m.get("seconds_since_heartbeat")
        age = f"{seconds:.1f}" if isinstance(seconds, int | float) else "-"
        rows.append((m.get("host"), age, ", ".join(m.get("peer_ids") or []) or "-"))
    return format_table(("HOST", "SECONDS SINCE HEARTBEAT", "NODES"), rows)


def format_address(host: str | None, port: str | int | None) -> str | None:
    """``host:port`` (``[v6]:port`` for IPv6), or None when the node has no port yet."""
    if not host or port in (None, ""):
        return None
    return values.join_host_port(host, port)


def describe_node(node: dict[str, Any]) -> str:
    """One tree line: peer id, status, relay address, and where it reads from.

    ``parents`` is what volt-api would send the node now: the first carries the reads, the
    others are standby paths. The first is only shown when it is not the tree parent.
    """
    parts = [str(node.get("peer_id")), str(node.get("status"))]
    address = format_address(node.get("host"), node.get("port"))
    if address:
        parts.append(address)
    parents = list(node.get("parents") or [])
    reading = parents[0] if parents else None
    if reading != node.get("parent"):
        parts.append(f"reads from: {reading or ROOT_LABEL}")
    if len(parents) > 1:
        parts.append("standby: " + ", ".join(parents[1:]))
    return "  ".join(parts)


def format_tree(volume_id: str, nodes: Sequence[dict[str, Any]]) -> list[str]:
    """The ``volume-show`` tree: the image server first, each node under its tree parent.

    ``nodes`` are the entries of ``GET /v1/volumes/<id>`` (breadth first, so children come
    in slot order).
    """
    count = len(nodes)
    lines = [f"{ROOT_LABEL} ({volume_id}, {count} node{'' if count == 1 else 's'})"]
    known = {n.get("peer_id") for n in nodes}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for node in nodes:
        parent = node.get("parent")
        # A parent the listing does not contain cannot happen; show such nodes at the top.
        children.setdefault(parent if parent in known else None, []).append(node)
    stack: list[tuple[dict[str, Any], str, bool]] = []

    def push_children(parent_id: str | None, prefix: str) -> None:
        kids = children.get(parent_id, [])
        for i, kid in reversed(list(enumerate(kids))):
            stack.append((kid, prefix, i == len(kids) - 1))

    push_children(None, "")
    while stack:  # each node is in exactly one children list: no node is visited twice
        node, prefix, last = stack.pop()
        lines.append(prefix + ("`-- " if last else "|-- ") + describe_node(node))
        push_children(node.get("peer_id"), prefix + ("    " if last else "|   "))
    return lines


# -- commands ----------------------------------------------------------------------------
def do_volume_list(client: Client, args: argparse.Namespace) -> list[str]:
    return format_volumes(client.volumes.list())


def do_volume_show(client: Client, args: argparse.Namespace) -> list[str]:
    return format_tree(args.volume_id, client.volumes.list(args.volume_id))


def do_volume_delete(client: Client, args: argparse.Namespace) -> list[str]:
    client.volumes.delete(args.volume_id)
    return [f"deleted the tree of volume {args.volume_id}"]


def do_node_list(client: Client, args: argparse.Namespace) -> list[str]:
    return format_members(client.members.list())


Command = Callable[[Client, argparse.Namespace], list[str]]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (defaults read from the environment now)."""
    parser = argparse.ArgumentParser(
        prog="volt",
        description="Inspect and manage the image trees of volt-api, the VMThunder master.",
        epilog="Run 'volt COMMAND --help' for the options of a command.",
    )
    parser.add_argument(
        "--endpoint",
        default=os.environ.get("VOLT_URL") or DEFAULT_ENDPOINT,
        help="URL of volt-api, or several comma-separated (tried in order, failing over on "
        f"connection errors and 5xx answers; env VOLT_URL; default {DEFAULT_ENDPOINT}).",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("VOLT_TOKEN") or None,
        help="Token sent in X-Auth-Token: volt-api's admin [auth] token (needed by "
        "volume-show, volume-delete and node-list) or a node token (env VOLT_TOKEN).",
    )
    parser.add_argument(
        "--os-cacert",
        "--cacert",
        dest="cacert",
        default=os.environ.get("VOLT_CACERT") or None,
        help="PEM CA bundle that signs an https volt-api's certificate (env VOLT_CACERT).",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="Seconds to wait for an answer (default 30).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Command, summary: str, description: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=summary, description=description)
        command.set_defaults(func=func)
        return command

    add(
        "volume-list",
        do_volume_list,
        "List the image trees and their node counts.",
        "List every image (volume) that has a tree, with the number of nodes in it.",
    )
    show = add(
        "volume-show",
        do_volume_show,
        "Show the tree of one image.",
        "Print the tree of an image: the image server first, then each node indented "
        "under its tree parent with its peer id, status (OK, or pending: not relaying "
        "yet), relay address (host:port, once registered), the parent it reads from when "
        "that is not its tree parent, and its standby parents.",
    )
    show.add_argument("volume_id", metavar="ID", help="The image (volume) id.")
    delete = add(
        "volume-delete",
        do_volume_delete,
        "Forget the whole tree of one image.",
        "Forget the tree of an image and all its nodes. Nodes still running will be "
        "placed in a new tree when they query again.",
    )
    delete.add_argument("volume_id", metavar="ID", help="The image (volume) id.")
    add(
        "node-list",
        do_node_list,
        "List the hosts running nodes.",
        "List every host that runs nodes: seconds since its last heartbeat (or query) "
        "and the peer ids of its nodes. Hosts silent for node_timeout are evicted.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``volt``; returns the exit status (0 ok, 1 error, 2 usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        with Client(
            args.endpoint, token=args.token, timeout=args.timeout, ca_file=args.cacert
        ) as client:
            lines = args.func(client, args)
    except (VoltClientError, ValueError) as exc:
        message = " ".join(str(exc).split())
        print(f"volt: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
