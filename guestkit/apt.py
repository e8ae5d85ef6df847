"""What the guest builders ask apt: the Debian mirror, candidate versions, downloads.

Shared by ``guestkit.build`` (the kernel-test guest) and ``vmt-demo/guestimage.py`` /
``debianguest.py`` (the VM guests of the demo and the benchmarks).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

from brick.exception import NotFound
from brick.executor import execute

SUITE = "bookworm"
FALLBACK_MIRROR = "http://deb.debian.org/debian"
SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
LISTS = Path("/var/lib/apt/lists")
SOURCE_FILES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


def mirror(suite: str = SUITE) -> str:
    """The first ``URIs:`` of this machine's deb822 sources that serves ``suite``."""
    with contextlib.suppress(OSError):
        for stanza in SOURCES.read_text().split("\n\n"):
            fields = dict(
                line.split(":", 1) for line in stanza.splitlines() if re.match(r"^\w[\w-]*:", line)
            )
            uris = fields.get("URIs", "").split()
            if suite in fields.get("Suites", "").split() and uris:
                return uris[0]
    return FALLBACK_MIRROR


def lists_stamp() -> str:
    """A fingerprint of the apt lists and sources: candidate versions stay valid under it."""
    paths = [p for p in LISTS.glob("*") if p.is_file() and p.name != "lock"]
    for top in SOURCE_FILES:
        paths += sorted(top.glob("*")) if top.is_dir() else [top]
    entries = []
    for path in sorted(paths):
        with contextlib.suppress(OSError):
            st = path.stat()
            entries.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def show(packages: Sequence[str]) -> dict[str, dict[str, str]]:
    """The candidate stanza of each package (one ``apt-cache show`` call); ``NotFound`` if
    one is unknown."""
    out = execute(["apt-cache", "show", "--no-all-versions", *packages], timeout_s=120).stdout
    found: dict[str, dict[str, str]] = {}
    for stanza in out.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if ":" in line and not line.startswith(" "):
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        if "Package" in fields and "Version" in fields:
            found.setdefault(fields["Package"], fields)
    for package in packages:
        if package not in found:
            raise NotFound("Debian package", package)
    return found


def download(packages: Sequence[str], dest: Path) -> None:
    """``apt-get download`` of ``packages`` (``name`` or ``name=version``) into ``dest``."""
    argv = ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", *packages]
    execute(["env", "-C", str(dest), *argv], timeout_s=600)
