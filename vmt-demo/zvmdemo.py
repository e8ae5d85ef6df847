#!/usr/bin/env python3
"""One guest through a node's z/VM Cloud Connector-shaped API, with the connector's own client.

Run inside the node's network namespace (the API listens on its loopback): imports the image
file (``file://``), creates, deploys (a VMThunder snapshot) and starts guest ``ZVMDEMO``, waits
until its console shows the boot marker, then deletes the guest and the image. Prints one
line ``zvmdemo: ...`` per step; exits 0 only if the marker was seen and everything was removed.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from zvmconnector import restclient

from brick.wait import wait_until

USERID, IMAGE = "ZVMDEMO", "zvmdemo"


def say(message: str) -> None:
    print(f"zvmdemo: {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zvmdemo.py", description=__doc__)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--token-file", required=True, help="A file holding the api_token.")
    parser.add_argument("--image-file", required=True)
    parser.add_argument("--marker", required=True, help="What the console shows once booted.")
    parser.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    client = restclient.RESTClient("127.0.0.1", args.port, token_path=args.token_file, auth="token")

    def call(verb: str, *params: Any, **kwargs: Any) -> Any:
        result = client.call(verb, *params, **kwargs)
        if result.get("overallRC") != 0:
            raise RuntimeError(f"{verb}: {result}")
        return result["output"]

    started = time.monotonic()
    created = imported = False
    try:
        call("image_import", IMAGE, f"file://{args.image_file}", {"os_version": "rhel8"})
        imported = True
        call("guest_create", USERID, 1, 128)
        created = True
        call("guest_deploy", USERID, IMAGE)
        call("guest_start", USERID)
        say(f"image imported, guest {USERID} created, deployed and started")
        wait_until(
            lambda: args.marker in call("guest_get_console_output", USERID),
            timeout_s=args.timeout,
            what=f"the boot marker on {USERID}'s console",
            max_interval_s=0.3,
        )
        booted = time.monotonic() - started
        say(f"{USERID} booted ({call('guest_get_power_state', USERID)}): console shows the marker")
    finally:
        if created:
            call("guest_delete", USERID)
        if imported:
            # 409 while the node's own stack of the image is torn down (its next heartbeat
            # after the guest's disk went; readers get a grace period): retried
            def delete_image() -> dict[str, Any] | None:
                result: dict[str, Any] = client.call("image_delete", IMAGE)
                return None if result.get("overallRC") == 409 else result

            result = wait_until(
                delete_image, timeout_s=90, what=f"image {IMAGE} free", max_interval_s=1.0
            )
            if result.get("overallRC") != 0:
                raise RuntimeError(f"image_delete: {result}")
    say(
        f"import + create + deploy + start + boot {booted:.1f} s through the z/VM API; "
        "guest and image deleted"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
