"""The ``virtman`` command: call one virtman server (compute node or image server).

Examples::

    virtman --url http://10.0.0.5:7774/RPC2 create vm1 image1 --portal 10.0.0.9:3260
    VIRTMAN_URL=10.0.0.5 VIRTMAN_TOKEN=secret virtman list
    virtman --url https://10.0.0.5 --os-cacert /etc/virtman/ca.pem list
    virtman --url 10.0.0.9 image-create image1 /srv/images/image1.raw

Exit status: 0 success, 1 warning result (already exists / does not exist), 2 failure (a
failure result, a refused token, a bad argument), 3 the server cannot be reached.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from virtmanclient.client import (
    DEFAULT_TIMEOUT,
    Client,
    build_connections,
    normalise_endpoint,
    parse_instance_list,
    parse_target_list,
)
from virtmanclient.exceptions import ConnectionFailed, ResultError, VirtmanError
from virtmanclient.validation import DEFAULT_IQN_PREFIX, ISCSI_PORT
from virtmanclient.validation import image_name as check_image_name
from virtmanclient.validation import iqn as check_iqn
from virtmanclient.validation import lun as check_lun
from virtmanclient.validation import name as check_name
from virtmanclient.validation import portal as check_portal

DEFAULT_URL = "http://127.0.0.1:7774/RPC2"
EXIT_OK, EXIT_WARNING, EXIT_FAILURE, EXIT_UNREACHABLE = 0, 1, 2, 3


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Left-aligned columns separated by two spaces, a header line first."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


# -- commands: each returns the lines to print -------------------------------------------
def do_create(client: Client, args: argparse.Namespace) -> list[str]:
    name = check_name(args.name, "instance name")
    image = check_image_name(args.image)
    portals = [check_portal(p) for p in args.portal]
    check_iqn(args.iqn_prefix + image, "IQN (--iqn-prefix + image)")
    lun = check_lun(args.lun)
    conns = build_connections(portals, image, args.iqn_prefix, lun)
    result = client.create(name, image, conns, args.snapshot_dev, checked=True)
    return [result.info] if result.info else [f"created instance {name}"]


def do_destroy(client: Client, args: argparse.Namespace) -> list[str]:
    name = check_name(args.name, "instance name")
    client.destroy(name, checked=True)
    return [f"destroyed instance {name}"]


def do_list(client: Client, args: argparse.Namespace) -> list[str]:
    instances = parse_instance_list(client.list())
    return format_table(
        ("INSTANCE", "IMAGE", "STATE"),
        [(i.name, i.image, "degraded" if i.degraded else "ok") for i in instances],
    )


def do_image_create(client: Client, args: argparse.Namespace) -> list[str]:
    image = check_image_name(args.name)
    if not args.file.startswith("/"):
        raise ValueError(f"invalid file {args.file!r}: must be an absolute path on the server")
    if args.iqn_prefix is not None:
        check_iqn(args.iqn_prefix + image, "IQN (--iqn-prefix + image)")
    result = client.create_image_target(
        image, args.file, args.loop_dev, args.iqn_prefix, checked=True
    )
    return [result.info] if result.info else [f"created image target {image}"]


def do_image_destroy(client: Client, args: argparse.Namespace) -> list[str]:
    image = check_image_name(args.name)
    client.destroy_image_target(image, checked=True)
    return [f"destroyed image target {image}"]


def do_image_list(client: Client, args: argparse.Namespace) -> list[str]:
    targets = parse_target_list(client.list_image_target())
    return format_table(
        ("IMAGE", "TID", "LOOP_DEV"), [(t.image, t.tid, t.loop_dev) for t in targets]
    )


Command = Callable[[Client, argparse.Namespace], list[str]]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (defaults read from the environment now)."""
    parser = argparse.ArgumentParser(
        prog="virtman",
        description="Create, destroy and list VM instances and image targets on a virtman "
        "server (XML-RPC, port 7774, path /RPC2).",
        epilog="Exit status: 0 success, 1 warning (already exists / does not exist), "
        "2 failure, 3 server unreachable. Run 'virtman COMMAND --help' for a command.",
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("VIRTMAN_URL") or DEFAULT_URL,
        help="The virtman server: a URL or host[:port]; missing port 7774, missing path "
        f"/RPC2 (env VIRTMAN_URL; default {DEFAULT_URL}).",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("VIRTMAN_TOKEN") or None,
        help="Token sent as X-Auth-Token, the server's api_token (env VIRTMAN_TOKEN; "
        "prefer the environment: arguments are visible to other users).",
    )
    parser.add_argument(
        "--os-cacert",
        dest="ca_file",
        default=os.environ.get("VIRTMAN_CACERT") or None,
        help="PEM CA certificate(s) to verify an https:// server with (env VIRTMAN_CACERT; "
        "default: the system's CAs).",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"Seconds to wait for an answer (default {DEFAULT_TIMEOUT:g}).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Command, summary: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=summary, description=summary)
        command.set_defaults(func=func)
        return command

    create = add(
        "create",
        do_create,
        "Create a VM instance (its snapshot device) on an image; prints the instance path.",
    )
    create.add_argument("name", metavar="NAME", help="Instance name.")
    create.add_argument("image", metavar="IMAGE", help="Image name (becomes volume-IMAGE).")
    create.add_argument(
        "--portal",
        action="append",
        required=True,
        metavar="IP[:PORT]",
        help=f"An image server exporting the image (port {ISCSI_PORT} if omitted); repeat "
        "for several paths.",
    )
    create.add_argument(
        "--iqn-prefix",
        default=DEFAULT_IQN_PREFIX,
        help=f"Target IQN = prefix + volume-IMAGE (default {DEFAULT_IQN_PREFIX}).",
    )
    create.add_argument("--lun", default="1", help="Target LUN (default 1).")
    create.add_argument(
        "--snapshot-dev", default=None, help="Block device for the VM's snapshot (optional)."
    )
    destroy = add("destroy", do_destroy, "Destroy a VM instance.")
    destroy.add_argument("name", metavar="NAME", help="Instance name.")
    add("list", do_list, "List the VM instances and their images.")
    image_create = add(
        "image-create",
        do_image_create,
        "Export an image file of the server as an iSCSI target; prints TID:LOOP_DEV.",
    )
    image_create.add_argument("name", metavar="NAME", help="Image name (becomes volume-NAME).")
    image_create.add_argument(
        "file", metavar="FILE", help="Absolute path of the file on the server."
    )
    image_create.add_argument("--loop-dev", default=None, help="Loop device to bind (optional).")
    image_create.add_argument(
        "--iqn-prefix", default=None, help="Target IQN prefix (default: the server's)."
    )
    image_destroy = add("image-destroy", do_image_destroy, "Remove an image target.")
    image_destroy.add_argument("name", metavar="NAME", help="Image name.")
    add("image-list", do_image_list, "List the image targets.")
    return parser


def exit_code(exc: BaseException) -> int:
    """The exit status for an error."""
    if isinstance(exc, ResultError):
        return EXIT_WARNING if exc.code == 1 else EXIT_FAILURE
    if isinstance(exc, ConnectionFailed):
        return EXIT_UNREACHABLE
    return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``virtman``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_FAILURE
    try:
        client = Client(
            normalise_endpoint(args.url),
            token=args.token,
            timeout=args.timeout,
            ca_file=args.ca_file,
        )
        lines = args.func(client, args)
    except (VirtmanError, ValueError) as exc:
        code = exit_code(exc)
        kind = "warning" if code == EXIT_WARNING else "error"
        print(f"virtman: {kind}: {' '.join(str(exc).split())}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return 130
    for line in lines:
        print(line)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
