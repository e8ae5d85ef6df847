#!/usr/bin/env python3
"""Create, destroy and list VM instances on compute nodes, as listed in ``nodelist.cfg``.

Lines (whitespace separated; blank lines and ``#`` comments are skipped)::

    + <node_ip> <vm> <server_ip> <image>   create VM instance <vm> on compute node <node_ip>
                                           from image <image> of image server <server_ip>
    - <node_ip> <vm>                       destroy the VM instance
    @ <node_ip>                            list the VM instances of the node

Every line is checked before anything is sent. The nodes are called concurrently (one worker
per node; the lines of one node run in file order); one line is printed per action as its
result comes in, then a summary. Exit status: 0 when no action failed (warnings such as
"already exists" are not failures), 1 when one did, 2 for a bad file or option.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # vmtapi lives next to this script
    sys.path.insert(0, HERE)

import vmtapi  # noqa: E402

from virtmanclient import batch, validation  # noqa: E402

FORMS = {
    "+": batch.Form(
        "+ <node_ip> <vm> <server_ip> <image>",
        [
            ("node_ip", validation.ip, "node_ip"),
            ("vm", validation.name, "vm name"),
            ("server_ip", validation.ip, "server_ip"),
            ("image", validation.image_name_as_given, "image name"),
        ],
    ),
    "-": batch.Form(
        "- <node_ip> <vm>",
        [("node_ip", validation.ip, "node_ip"), ("vm", validation.name, "vm name")],
    ),
    "@": batch.Form("@ <node_ip>", [("node_ip", validation.ip, "node_ip")]),
}


@dataclass(frozen=True)
class NodeAction:
    """One line of nodelist.cfg."""

    line: int
    op: str  # + - @
    node_ip: str
    vm: str | None = None
    server_ip: str | None = None
    image: str | None = None

    @property
    def node(self) -> str:
        """The compute node the action is sent to."""
        return self.node_ip


def parse_nodelist(text: str, source: str = "nodelist.cfg") -> list[NodeAction]:
    """The actions of a nodelist.cfg text; raises ``batch.ConfigError`` listing every error."""
    return [
        NodeAction(number, op, **values)
        for number, op, values in batch.parse_config(text, source, FORMS)
    ]


def describe(action: NodeAction) -> str:
    """The action in words, for the progress lines."""
    if action.op == "+":
        return f"create {action.vm} from {action.image} on {action.server_ip}"
    if action.op == "-":
        return f"destroy {action.vm}"
    return "list"


def executor(
    port: int | None = None,
    token: str | None = None,
    timeout: float | None = None,
    ca_file: str | None = None,
) -> Callable[[NodeAction], Any]:
    """A function running one action through vmtapi."""
    options: dict[str, Any] = {"port": port, "token": token, "timeout": timeout}
    options["ca_file"] = ca_file

    def execute(action: NodeAction) -> Any:
        if action.op == "+":
            assert action.vm and action.image and action.server_ip
            return vmtapi.create(
                action.node_ip, action.vm, action.image, action.server_ip, **options
            )
        if action.op == "-":
            assert action.vm
            return vmtapi.destroy(action.node_ip, action.vm, **options)
        return vmtapi.list(action.node_ip, **options)

    return execute


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="vmtrun.py",
        description="Create, destroy and list VM instances on compute nodes, as listed in a "
        "file of lines '+ <node_ip> <vm> <server_ip> <image>', '- <node_ip> <vm>', "
        "'@ <node_ip>'. Nodes are called concurrently; the lines of one node run in file "
        "order.",
        epilog="Exit status: 0 no action failed, 1 some failed, 2 bad file or option.",
    )
    batch.add_options(parser, "nodelist.cfg", vmtapi.PORT, vmtapi.TIMEOUT)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    execute = executor(args.port, args.token, args.timeout, args.ca_file)
    return batch.run_file("vmtrun.py", args, parse_nodelist, execute, describe)


if __name__ == "__main__":
    sys.exit(main())
