#!/usr/bin/env python3
"""One guest through a node's z/VM Cloud Connector-shaped API, with the connector's own client.

Run inside the node's network namespace (the API listens on its loopback): imports the image
file (``file://``), creates, deploys (a VMThunder snapshot) and starts guest ``ZVMDEMO``, waits
until its console shows the boot marker, then deletes the guest and the image. With
``--capture NAME`` the running guest is first captured (paused for the copy) into the new
base image ``NAME``, which this node exports and keeps, so that other nodes boot it through
the tree; ``--delete-image NAME`` (alone) deletes such an image once nothing reads it. Prints
one line ``zvmdemo: ...`` per step; exits 0 only if the marker was seen and everything but
the captured image was removed.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from zvmconnector import restclient

from brick.wait import wait_until

USERID, IMAGE = "ZVMDEMO", "zvmdemo"
FREE_TIMEOUT_S = 90.0


def say(message: str) -> None:
    print(f"zvmdemo: {message}", flush=True)


class Api:
    """The connector's client; ``call`` raises unless the answer's overallRC is 0."""

    def __init__(self, port: int, token_file: str) -> None:
        self.client = restclient.RESTClient("127.0.0.1", port, token_path=token_file, auth="token")

    def call(self, verb: str, *params: Any, **kwargs: Any) -> Any:
        result = self.client.call(verb, *params, **kwargs)
        if result.get("overallRC") != 0:
            raise RuntimeError(f"{verb}: {result}")
        return result["output"]

    def delete_image(self, name: str) -> None:
        """``image_delete``, retried while it answers 409: the node's own idle stack of the
        image, or another node reading it, goes on a heartbeat (readers get a grace)."""

        def attempt() -> dict[str, Any] | None:
            result: dict[str, Any] = self.client.call("image_delete", name)
            return None if result.get("overallRC") == 409 else result

        result = wait_until(
            attempt, timeout_s=FREE_TIMEOUT_S, what=f"image {name} free", max_interval_s=1.0
        )
        if result.get("overallRC") != 0:
            raise RuntimeError(f"image_delete: {result}")


def run(api: Api, args: argparse.Namespace) -> None:
    started = time.monotonic()
    created = imported = False
    try:
        api.call("image_import", IMAGE, f"file://{args.image_file}", {"os_version": "rhel8"})
        imported = True
        api.call("guest_create", USERID, 1, 128)
        created = True
        api.call("guest_deploy", USERID, IMAGE)
        api.call("guest_start", USERID)
        say(f"image imported, guest {USERID} created, deployed and started")
        wait_until(
            lambda: args.marker in api.call("guest_get_console_output", USERID),
            timeout_s=args.timeout,
            what=f"the boot marker on {USERID}'s console",
            max_interval_s=0.3,
        )
        booted = time.monotonic() - started
        state = api.call("guest_get_power_state", USERID)
        say(f"{USERID} booted ({state}): console shows the marker")
        if args.capture:
            api.call("guest_capture", USERID, args.capture)
            [image] = api.call("image_query", imagename=args.capture)
            state = api.call("guest_get_power_state", USERID)
            say(
                f"{USERID} captured into the new base image {args.capture} "
                f"({image['image_size_in_bytes']} bytes; {USERID} paused for the copy, now "
                f"{state}); exported by this node"
            )
    finally:
        if created:
            api.call("guest_delete", USERID)
        if imported:
            api.delete_image(IMAGE)
    kept = f"; image {args.capture} kept for other nodes" if args.capture else ""
    say(
        f"import + create + deploy + start + boot {booted:.1f} s through the z/VM API; "
        f"guest and image deleted{kept}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zvmdemo.py", description=__doc__)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--token-file", required=True, help="A file holding the api_token.")
    parser.add_argument("--image-file", help="The image to import (not with --delete-image).")
    parser.add_argument("--marker", help="What the console shows once booted.")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--capture", metavar="NAME", help="Capture the guest into image NAME.")
    parser.add_argument("--delete-image", metavar="NAME", help="Only delete image NAME.")
    args = parser.parse_args(argv)
    if args.delete_image:
        if args.image_file or args.capture:
            parser.error("--delete-image goes alone")
    elif not (args.image_file and args.marker):
        parser.error("--image-file and --marker are required")
    api = Api(args.port, args.token_file)
    if args.delete_image:
        api.delete_image(args.delete_image)
        say(f"image {args.delete_image} deleted")
    else:
        run(api, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
