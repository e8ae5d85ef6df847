"""``python -m guestkit build | run | cleanup``: the guest kit's command line.

- ``build``: build (or find cached) the guest; prints its paths and key as JSON.
- ``run --nodes NAME:MEM:IDX ... --payload DIR``: build if needed, boot the nodes, print a
  summary; exit status 0 only if every guest's run.sh exited 0.
- ``cleanup``: remove what killed runs left behind (namespaces, taps, QEMU processes).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from guestkit.build import build_guest, default_cache_dir
from guestkit.run import CPU, Node, cleanup_stale, run_guests


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through run_guests' teardown


def _build(args: argparse.Namespace) -> int:
    started = time.monotonic()
    guest = build_guest(
        args.cache_dir, multipath_tools=args.multipath_tools, extra_packages=args.package
    )
    shown = {k: str(v) for k, v in vars(guest).items()}
    shown["seconds"] = f"{time.monotonic() - started:.2f}"
    json.dump(shown, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


def _run(args: argparse.Namespace) -> int:
    nodes = [Node.parse(spec) for spec in args.nodes]
    guest = build_guest(
        args.cache_dir, multipath_tools=args.multipath_tools, extra_packages=args.package
    )
    result = run_guests(
        guest,
        nodes,
        args.payload,
        timeout_s=args.timeout,
        bridges=args.bridges,
        work_dir=args.work_dir,
        cache_dir=args.cache_dir,
        append=args.append,
        coldplug=args.coldplug,
        cpu=args.cpu,
    )
    print(result.summary())
    return 0 if result.ok else 1


def _cleanup(args: argparse.Namespace) -> int:
    cleaned = cleanup_stale(args.cache_dir)
    print(f"cleaned up {len(cleaned)} run(s): {' '.join(cleaned)}".rstrip(": "))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guestkit", description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, help=f"default {default_cache_dir()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "run"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--multipath-tools", action="store_true", help="add multipath-tools")
        cmd.add_argument("--package", action="append", default=[], help="another Debian package")
    run = sub.choices["run"]
    run.add_argument("--nodes", nargs="+", required=True, metavar="NAME:MEM:IDX")
    run.add_argument("--payload", type=Path, required=True, help="folder with run.sh")
    run.add_argument("--timeout", type=float, default=300.0, help="wall-clock limit, seconds")
    run.add_argument("--bridges", type=int, default=1, choices=(1, 2))
    run.add_argument("--work-dir", type=Path, help="logs and results (default: in the cache)")
    run.add_argument("--append", action="append", default=[], help="more kernel arguments")
    run.add_argument("--coldplug", action="store_true", help="udev coldplug at boot (+~4 s)")
    run.add_argument(
        "--cpu", default=CPU, help=f"QEMU -cpu model (default {CPU}; max is slow under TCG)"
    )
    sub.add_parser("cleanup")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(message)s",
        stream=sys.stderr,
    )
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    handler = {"build": _build, "run": _run, "cleanup": _cleanup}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
