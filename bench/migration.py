"""Bytes a live migration moves against what the guest wrote (docs/cluster.rst).

Runs ``tests/functional/test_cluster_migration.py`` (two nodes, their own libvirtds, one
guest that writes N MiB and is migrated through ``POST /v1/vms/{id}/migrate``) once per
``--writes`` value, one run at a time, and prints per run the disk and memory bytes moved,
what the guest wrote, the overlay's allocation and the disk's virtual size, as the test
measured them (libvirt's job statistics). Last line::

    migration: writes <N,...> MiB -> disk moved <D,...> MiB (virtual <V> MiB), memory <M,...> MiB

Exit status 0 if every run passed. Needs root and what the functional tests need.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST = "tests/functional/test_cluster_migration.py"
LINE = re.compile(
    r"disk (?P<disk>[\d.]+) MiB \(guest wrote (?P<wrote>[\d.]+) MiB.*?overlay "
    r"(?P<overlay>[\d.]+) MiB\), memory (?P<memory>[\d.]+) MiB, total (?P<total>[\d.]+) MiB, "
    r"disk virtual size (?P<virtual>\d+) MiB"
)


def run(write_mib: int) -> dict[str, str] | None:
    env = {**os.environ, "VMT_MIGRATE_WRITE_MIB": str(write_mib)}
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-s", TEST]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    found = LINE.search(done.stdout)
    if done.returncode != 0 or found is None:
        print(done.stdout[-3000:], done.stderr[-2000:], sep="\n", file=sys.stderr)
        return None
    return found.groupdict()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", default="0,8,24", help="MiB the guest writes, per run")
    args = parser.parse_args()
    sizes = [int(n) for n in args.writes.split(",")]
    results = []
    for size in sizes:
        figures = run(size)
        if figures is None:
            print(f"migration: the run writing {size} MiB failed", file=sys.stderr)
            return 1
        print(f"writes {size:3d} MiB: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
        results.append(figures)
    print(
        f"migration: writes {','.join(map(str, sizes))} MiB -> disk moved "
        f"{','.join(r['disk'] for r in results)} MiB (virtual {results[0]['virtual']} MiB), "
        f"memory {','.join(r['memory'] for r in results)} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
