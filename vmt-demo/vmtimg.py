#!/usr/bin/env python3
"""Create, destroy and list image targets on image servers, as listed in ``image.cfg``.

Lines (whitespace separated; blank lines and ``#`` comments are skipped)::

    + <server_ip> <image> <file>     export <file> of the image server as image <image>
    - <server_ip> <image>            remove the image target
    @ <server_ip>                    list the image targets

Every line is checked before anything is sent. The servers are called concurrently (one
worker per server; the lines of one server run in file order); one line is printed per
action as its result comes in, then a summary. Exit status: 0 when no action failed (warnings
such as "already exists" are not failures), 1 when one did, 2 for a bad file or option.
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
        "+ <server_ip> <image> <file>",
        [
            ("server_ip", validation.ip, "server_ip"),
            ("image", validation.image_name_as_given, "image name"),
            ("file", validation.absolute_path, "file"),
        ],
    ),
    "-": batch.Form(
        "- <server_ip> <image>",
        [
            ("server_ip", validation.ip, "server_ip"),
            ("image", validation.image_name_as_given, "image name"),
        ],
    ),
    "@": batch.Form("@ <server_ip>", [("server_ip", validation.ip, "server_ip")]),
}


@dataclass(frozen=True)
class ImageAction:
    """One line of image.cfg."""

    line: int
    op: str  # + - @
    server_ip: str
    image: str | None = None
    file: str | None = None

    @property
    def node(self) -> str:
        """The server the action is sent to."""
        return self.server_ip


def parse_image_cfg(text: str, source: str = "image.cfg") -> list[ImageAction]:
    """The actions of an image.cfg text; raises ``batch.ConfigError`` listing every error."""
    return [
        ImageAction(number, op, **values)
        for number, op, values in batch.parse_config(text, source, FORMS)
    ]


def describe(action: ImageAction) -> str:
    """The action in words, for the progress lines."""
    if action.op == "+":
        return f"create image target {action.image} from {action.file}"
    if action.op == "-":
        return f"destroy image target {action.image}"
    return "list image targets"


def executor(
    port: int | None = None,
    token: str | None = None,
    timeout: float | None = None,
    ca_file: str | None = None,
) -> Callable[[ImageAction], Any]:
    """A function running one action through vmtapi."""
    options: dict[str, Any] = {"port": port, "token": token, "timeout": timeout}
    options["ca_file"] = ca_file

    def execute(action: ImageAction) -> Any:
        if action.op == "+":
            assert action.image is not None and action.file is not None
            return vmtapi.create_image_target(
                action.server_ip, action.image, action.file, **options
            )
        if action.op == "-":
            assert action.image is not None
            return vmtapi.destroy_image_target(action.server_ip, action.image, **options)
        return vmtapi.list_image_target(action.server_ip, **options)

    return execute


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="vmtimg.py",
        description="Create, destroy and list image targets on image servers, as listed in "
        "a file of lines '+ <server_ip> <image> <file>', '- <server_ip> <image>', "
        "'@ <server_ip>'. Servers are called concurrently; the lines of one server run in "
        "file order.",
        epilog="Exit status: 0 no action failed, 1 some failed, 2 bad file or option.",
    )
    batch.add_options(parser, "image.cfg", vmtapi.PORT, vmtapi.TIMEOUT)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    execute = executor(args.port, args.token, args.timeout, args.ca_file)
    return batch.run_file("vmtimg.py", args, parse_image_cfg, execute, describe)


if __name__ == "__main__":
    sys.exit(main())
