#!/usr/bin/env python3
"""Prepare a compute node or image server for virtman (the original's ``vmt-initenv.sh``).

Run it once on every compute node and image server (as root), then start the node with the
command it prints::

    vmt-initenv.py --master-ip 10.0.0.1 --token "$VOLT_TOKEN"
    virtmanserver --config-file /etc/virtman/virtman.conf

What it does, in this order (nothing is written until every check has passed):

1. checks every argument: IP addresses (``ipaddress``; no unspecified, multicast or scoped
   addresses), tokens (1-1024 printable ASCII characters: no whitespace, no newline), the
   CHAP account (both ``--chap-user`` and ``--chap-password`` or neither, then one is
   generated; the rules of ``brick.tgt.Chap``: user 1-64 of ``A-Za-z0-9._:-``, password
   12-64 printable ASCII characters without spaces), ``--nbd-psk-file`` (QEMU's keys.psk
   format ``identity:hexkey``, mode 0600), test image names (the image-name rules of image.cfg) and
   sizes, and the free space they need;
2. checks that the tools the driver runs are on PATH, and names the package of a missing
   one (qemu driver: qemu-storage-daemon from qemu-system-common, qemu-img from
   qemu-utils, tgtd and tgtadm from tgt, fusermount3 from fuse3);
3. refuses to replace an existing ``etc/virtman/virtman.conf`` (or test image) unless
   ``--force`` is given;
4. creates virtman's directories (state_dir ``/var/lib/virtman`` with ``cache`` and
   ``instances``, run_dir ``/run/virtman``; mode 0700, missing parents 0755, existing ones
   are left alone);
5. with ``--test-image NAME:MIB`` (repeatable) writes a file of MIB MiB of random bytes,
   ``/var/lib/virtman/images/NAME.raw``, to export with a line of image.cfg (the original's
   commented-out part made such files under /root/blocks);
6. puts the NBD relays' pre-shared key in ``/etc/virtman/nbd.psk`` (mode 0600): a copy of
   ``--nbd-psk-file``, else the file already there, else a new random 256-bit key;
7. writes ``/etc/virtman/virtman.conf`` last (mode 0600: it holds the tokens): host_ip,
   master_ip, master_token (``--token``, or with ``--node-secret`` this host's node token:
   see ``volt-manage node-token``), api_token (the token XML-RPC callers such as
   vmtimg.py/vmtrun.py must send; the same token unless ``--api-token``), driver, the CHAP
   account and nbd_psk_file; every other option keeps its default and is listed commented
   out.

Every node of a cluster needs the same CHAP account and key: run it on the first node
without them, then copy ``chap_user``/``chap_password`` and ``nbd.psk`` (or pass them with
``--chap-user``/``--chap-password``/``--nbd-psk-file``) to the others.

``--root DIR`` writes everything under DIR instead of ``/`` (like DESTDIR: the paths inside
the config stay those of the target system). The network checks (host_ip is an address of
this machine, virtman's ports are free, /dev/fuse exists) only warn, and only for ``/``.

The original's other steps are gone: virtman runs its own tgtd (so the tgt package's own
service must not hold port 3260; a warning says so), there is no targets.conf to edit and no
snapshot or cache files to make in advance.

Exit status: 0 done; 1 refused (an existing file without ``--force``) or a write failed;
2 bad arguments or missing tools (then nothing was written).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import ipaddress
import os
import re
import secrets
import shutil
import socket
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brick import psk
from brick.exception import InvalidArgument
from brick.fileio import atomic_replace
from brick.tgt import Chap
from virtman import conf as virtman_conf
from virtmanclient import validation
from volt.auth import node_token

PROG = "vmt-initenv.py"
CONFIG = Path("etc/virtman/virtman.conf")  # relative to --root
PSK_FILE = Path("/etc/virtman/nbd.psk")  # nbd_psk_file on the target system
GENERATED_CHAP_USER = "vmthunder"
GENERATED_PSK_IDENTITY = "vmthunder"
MAX_TOKEN = 1024
TOKEN = re.compile(rf"[!-~]{{1,{MAX_TOKEN}}}")  # printable ASCII: an HTTP header value
MAX_TEST_IMAGE_MIB = 65536
CHUNK = 1 << 20

# Per driver: tool -> the Debian/Ubuntu package that provides it.
DRIVER_TOOLS: dict[str, dict[str, str]] = {
    "qemu": {
        "qemu-storage-daemon": "qemu-system-common",
        "qemu-img": "qemu-utils",
        "tgtd": "tgt",
        "tgtadm": "tgt",
        "fusermount3": "fuse3",
    },
}

OPTS = {opt.dest: opt for opt in virtman_conf.default_opts}
STATE_DIR = Path(OPTS["state_dir"].default)
RUN_DIR = Path(OPTS["run_dir"].default)
DIRS = [STATE_DIR, STATE_DIR / "cache", STATE_DIR / "instances", RUN_DIR]
IMAGES = STATE_DIR / "images"  # --test-image files
PORTS = [
    (
        "iscsi_port",
        "the relay's tgtd (the tgt package's own service holds it when it runs: "
        "systemctl disable --now tgt)",
    ),
    ("listen_port", "virtmanserver's XML-RPC (is a virtmanserver running already?)"),
    ("nbd_port", "the NBD export of the relay (is an nbd-server running?)"),
]


class UsageError(Exception):
    """One bad argument."""


@dataclass(frozen=True)
class ImageFile:
    name: str
    mib: int

    @property
    def path(self) -> Path:
        """Where the file is on the target system."""
        return IMAGES / f"{self.name}.raw"


@dataclass
class Plan:
    """Everything main() writes, checked."""

    root: Path
    values: dict[str, str]  # option -> value
    driver: str
    images: list[ImageFile] = field(default_factory=list)
    force: bool = False
    chap_generated: bool = False
    psk_source: Path | None = None  # --nbd-psk-file; None: keep or generate PSK_FILE

    def under_root(self, path: Path) -> Path:
        return self.root / path.relative_to("/") if path.is_absolute() else self.root / path

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def psk(self) -> Path:
        return self.under_root(PSK_FILE)


# -- checks (pure) -----------------------------------------------------------------------
def check_ip(value: str, option: str) -> str:
    """A unicast IPv4 or IPv6 address; its canonical text."""
    if "%" in value:
        raise UsageError(f"{option} {value!r}: scoped IPv6 addresses are not supported")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise UsageError(f"{option} {value!r}: not an IP address") from None
    if address.is_unspecified or address.is_multicast:
        raise UsageError(f"{option} {value!r}: must be a unicast address of one machine")
    return str(address)


def check_token(value: str, option: str) -> str:
    """A token (never echoed): 1-1024 printable ASCII characters, no whitespace."""
    if not value:
        raise UsageError(f"{option}: must not be empty")
    if not TOKEN.fullmatch(value):
        raise UsageError(
            f"{option}: must be 1-{MAX_TOKEN} printable ASCII characters, without "
            "whitespace or newlines"
        )
    return value


def check_chap(user: str | None, password: str | None) -> tuple[str, str] | None:
    """The CHAP account (both or neither), by the rules of brick.tgt.Chap."""
    if user is None and password is None:
        return None
    if user is None or password is None:
        raise UsageError("--chap-user and --chap-password go together: give both or neither")
    try:
        Chap(user, password)
    except InvalidArgument as exc:
        if exc.field == "chap.user":
            raise UsageError(f"--chap-user {user!r}: must be 1-64 of A-Z a-z 0-9 . _ : -") from None
        raise UsageError(
            "--chap-password: must be 12-64 printable ASCII characters without spaces"
        ) from None
    return user, password


def check_psk_file(value: str) -> Path:
    """An existing key file in QEMU's keys.psk format (``identity:hexkey``), mode 0600."""
    try:
        psk.read(value)
    except InvalidArgument as exc:
        raise UsageError(f"--nbd-psk-file {value!r}: {exc.rule}") from None
    return Path(os.path.abspath(value))


def check_test_image(value: str) -> ImageFile:
    """``NAME:MIB``: an image name (image.cfg's rules) and a size in MiB."""
    name, sep, size = value.partition(":")
    if not sep:
        raise UsageError(f"--test-image {value!r}: expected NAME:MIB (e.g. image1:256)")
    try:
        validation.image_name_as_given(name, "test image name")
    except ValueError as exc:
        raise UsageError(f"--test-image: {exc}") from None
    if not (size.isascii() and size.isdigit()) or not 1 <= int(size) <= MAX_TEST_IMAGE_MIB:
        raise UsageError(f"--test-image {value!r}: the size must be 1-{MAX_TEST_IMAGE_MIB} (MiB)")
    return ImageFile(name, int(size))


def missing_tools(driver: str) -> dict[str, str]:
    """Tools of ``driver`` not on PATH -> their package."""
    return {tool: pkg for tool, pkg in DRIVER_TOOLS[driver].items() if shutil.which(tool) is None}


def missing_tools_message(missing: dict[str, str], driver: str) -> list[str]:
    packages: dict[str, list[str]] = {}
    for tool, package in missing.items():
        packages.setdefault(package, []).append(tool)
    lines = [f"the {driver} driver needs tools that are not on PATH:"]
    lines += [f"  {', '.join(tools)} (package {package})" for package, tools in packages.items()]
    lines.append(f"install them with: apt-get install {' '.join(packages)}")
    return lines


def network_warnings(host_ip: str, ports: Sequence[tuple[int, str]]) -> list[str]:
    """Warnings about this machine: ``host_ip`` is not one of its addresses, or one of
    ``(port, what)`` is taken on it. Only binds (and closes) sockets."""
    family = socket.AF_INET6 if ":" in host_ip else socket.AF_INET
    warnings = []
    for port, what in [(0, ""), *ports]:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host_ip, port))
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    return [
                        f"host_ip {host_ip} is not an address of this machine (other nodes "
                        "reach this one at host_ip)"
                    ]
                if exc.errno == errno.EADDRINUSE:
                    warnings.append(f"port {port} on {host_ip} is in use; it is for {what}")
    return warnings


def ini_value(value: str) -> str:
    """``value`` as oslo.config reads it back: ``$`` doubled (no substitution), quoted when
    it starts with a quote (the parser strips one pair of matching quotes)."""
    text = value.replace("$", "$$")
    return f'"{text}"' if text[:1] in ("'", '"') else text


def render_config(values: dict[str, str]) -> str:
    """virtman.conf: ``values`` set, every other virtman option commented out at its
    default, each with its help."""
    lines = [
        f"# virtman.conf written by {PROG}. Options set here come first; the others keep the",
        "# default shown commented out. All options: etc/virtman/virtman.conf.sample.",
        "# Mode 0600: master_token, api_token and chap_password are secrets.",
        "",
        "[DEFAULT]",
    ]
    opts = virtman_conf.default_opts
    ordered = [o for o in opts if o.dest in values] + [o for o in opts if o.dest not in values]
    for opt in ordered:
        lines.append("")
        lines += textwrap.wrap(opt.help or "", 78, initial_indent="# ", subsequent_indent="# ")
        if opt.dest in values:
            lines.append(f"{opt.dest} = {ini_value(values[opt.dest])}")
        else:
            default = "<None>" if opt.default is None else opt.default
            lines.append(f"#{opt.dest} = {default}")
    return "\n".join(lines) + "\n"


# -- command line ------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Prepare a compute node or image server for virtman: check the driver's tools,
            write /etc/virtman/virtman.conf (mode 0600) and make virtman's directories
            (/var/lib/virtman/{cache,instances}, /run/virtman); optionally write random
            test images to export with image.cfg. Every argument is checked before anything
            is written; an existing config is kept unless --force."""
        ),
        epilog=textwrap.dedent(
            """\
            example:
              vmt-initenv.py --master-ip 10.0.0.1 --token "$VOLT_TOKEN" --test-image image1:256
              virtmanserver --config-file /etc/virtman/virtman.conf

            exit status: 0 done, 1 refused (existing file without --force) or a write
            failed, 2 bad arguments or missing tools (nothing written)."""
        ),
    )
    parser.add_argument("--master-ip", required=True, metavar="IP", help="Volt's address.")
    parser.add_argument(
        "--host-ip",
        metavar="IP",
        help="This node's address, the one other nodes reach it at (default: the source "
        "address of the default route).",
    )
    parser.add_argument(
        "--token",
        required=True,
        help="master_token: this node's Volt credential, best its node token (`volt-manage "
        "node-token <host_ip>` on the master); also the api_token unless --api-token.",
    )
    parser.add_argument(
        "--node-secret",
        metavar="SECRET",
        help="Volt's [auth] node_secret: master_token becomes this host_ip's node token "
        "(computed here) instead of --token.",
    )
    parser.add_argument(
        "--api-token",
        metavar="TOKEN",
        help="The token XML-RPC callers must send as X-Auth-Token (default: --token).",
    )
    parser.add_argument(
        "--driver", default="qemu", choices=sorted(DRIVER_TOOLS), help="Block stack driver."
    )
    parser.add_argument(
        "--chap-user",
        metavar="USER",
        help="CHAP user of every target (with --chap-password). Default: a generated "
        "account (give every node of a cluster the same one).",
    )
    parser.add_argument(
        "--chap-password",
        metavar="PASSWORD",
        help="CHAP password, 12-64 printable characters (with --chap-user).",
    )
    parser.add_argument(
        "--nbd-psk-file",
        metavar="FILE",
        help="The cluster's NBD pre-shared key (keys.psk format, identity:hexkey, mode "
        "0600), copied to /etc/virtman/nbd.psk. Default: keep an existing "
        "/etc/virtman/nbd.psk, or generate a new key (then copy that file to every other "
        "node of the cluster).",
    )
    parser.add_argument(
        "--root",
        default="/",
        metavar="DIR",
        help="Write everything under DIR (default /); the paths inside the config stay "
        "those of the target system.",
    )
    parser.add_argument(
        "--test-image",
        action="append",
        default=[],
        metavar="NAME:MIB",
        help="Also write /var/lib/virtman/images/NAME.raw, MIB MiB of random bytes (repeatable).",
    )
    parser.add_argument(
        "--force", action="store_true", help="Replace an existing config (and test images)."
    )
    return parser


def make_plan(args: argparse.Namespace) -> tuple[Plan | None, list[str]]:
    """The checked plan, or every problem with the arguments."""
    errors: list[str] = []

    def check(func: Any, *fargs: Any) -> Any:
        try:
            return func(*fargs)
        except UsageError as exc:
            errors.append(str(exc))
            return None

    master_ip = check(check_ip, args.master_ip, "--master-ip")
    if args.host_ip is not None:
        host_ip = check(check_ip, args.host_ip, "--host-ip")
    else:
        try:
            host_ip = check(check_ip, virtman_conf.detect_host_ip(), "detected host_ip")
        except (ValueError, OSError) as exc:
            errors.append(f"cannot detect this node's address ({exc}): give --host-ip")
            host_ip = None
    token = check(check_token, args.token, "--token")
    api_token = (
        token if args.api_token is None else check(check_token, args.api_token, "--api-token")
    )
    master_token = token
    if args.node_secret is not None and host_ip is not None:
        secret = check(check_token, args.node_secret, "--node-secret")
        master_token = node_token(secret, host_ip) if secret else None
    chap = check(check_chap, args.chap_user, args.chap_password)
    chap_generated = chap is None and args.chap_user is None and args.chap_password is None
    if chap_generated:
        chap = (GENERATED_CHAP_USER, secrets.token_hex(16))
    psk_source = None
    if args.nbd_psk_file is not None:
        psk_source = check(check_psk_file, args.nbd_psk_file)
    images: list[ImageFile] = []
    for value in args.test_image:
        image = check(check_test_image, value)
        if image and any(i.name == image.name for i in images):
            errors.append(f"--test-image {image.name!r}: given twice")
        elif image:
            images.append(image)
    root = Path(os.path.abspath(args.root))
    if not root.is_dir():
        errors.append(f"--root {args.root!r}: not a directory")
    elif images:
        need = sum(i.mib for i in images) + 64
        free = shutil.disk_usage(nearest_existing(root / IMAGES.relative_to("/"))).free >> 20
        if free < need:
            errors.append(f"--test-image: {need - 64} MiB needed, {free} MiB free under {root}")
    if errors:
        return None, errors
    values = {
        "host_ip": host_ip,
        "master_ip": master_ip,
        "master_token": master_token,
        "api_token": api_token,
        "driver": args.driver,
        "nbd_psk_file": str(PSK_FILE),
    }
    values["chap_user"], values["chap_password"] = chap
    plan = Plan(root, values, args.driver, images, args.force, chap_generated, psk_source)
    return plan, []


def nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


# -- writing -----------------------------------------------------------------------------
def make_dirs(path: Path, mode: int = 0o755) -> list[Path]:
    """Create ``path`` with ``mode`` and its missing parents with 0755, whatever the umask;
    the created."""
    missing = []
    leaf = path
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        wanted = mode if directory == leaf else 0o755
        directory.mkdir(mode=wanted)
        os.chmod(directory, wanted)
    return list(reversed(missing))


def report_dirs(created: list[Path], out: Any) -> None:
    for directory in created:
        print(f"created {directory}/", file=out)


def write_psk(plan: Plan) -> str:
    """Put the NBD key in place (mode 0600): --nbd-psk-file's, else the existing one
    (checked), else a new one. Returns what was done."""
    if plan.psk_source is not None:
        text, identity = psk.read(plan.psk_source)
        atomic_replace(plan.psk, lambda f: f.write(text.encode()), 0o600)
        return f"wrote {plan.psk} (mode 0600) from {plan.psk_source}, identity {identity}"
    if plan.psk.exists():
        _, identity = psk.read(plan.psk)
        return f"kept {plan.psk}, identity {identity}"
    line = psk.make_line(GENERATED_PSK_IDENTITY).encode()
    atomic_replace(plan.psk, lambda f: f.write(line), 0o600)
    return f"generated a new NBD key in {plan.psk} (mode 0600), identity {GENERATED_PSK_IDENTITY}"


def write_random(f: Any, mib: int) -> str:
    digest = hashlib.sha256()
    for _ in range(mib):
        block = os.urandom(CHUNK)
        digest.update(block)
        f.write(block)
    return digest.hexdigest()


def run(plan: Plan, out: Any) -> int:
    existing = [plan.config] if plan.config.exists() or plan.config.is_symlink() else []
    existing += [p for p in (plan.under_root(i.path) for i in plan.images) if p.exists()]
    if existing and not plan.force:
        for path in existing:
            print(f"{PROG}: error: {path} exists: give --force to replace it", file=sys.stderr)
        print(f"{PROG}: nothing was written", file=sys.stderr)
        return 1
    try:
        for directory in DIRS:  # virtman's state: its owner's only (docs/security.rst)
            report_dirs(make_dirs(plan.under_root(directory), 0o700), out)
        for image in plan.images:
            path = plan.under_root(image.path)
            report_dirs(make_dirs(path.parent), out)
            digest = atomic_replace(path, lambda f, m=image.mib: write_random(f, m), 0o644)
            print(f"wrote test image {path} ({image.mib} MiB, sha256 {digest})", file=out)
        report_dirs(make_dirs(plan.config.parent), out)
        print(write_psk(plan), file=out)
        text = render_config(plan.values).encode()
        atomic_replace(plan.config, lambda f: f.write(text), 0o600)
    except (OSError, InvalidArgument) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    values = plan.values
    chap = "generated" if plan.chap_generated else "given"
    print(
        f"wrote {plan.config} (mode 0600): host_ip {values['host_ip']}, Volt "
        f"{values['master_ip']}:{OPTS['master_port'].default}, driver {plan.driver}, "
        f"CHAP {chap} (user {values['chap_user']})",
        file=out,
    )
    if plan.chap_generated:
        print(
            "every node of the cluster needs the same CHAP account and NBD key: copy "
            f"chap_user, chap_password and {PSK_FILE} to the others (or pass --chap-user, "
            "--chap-password and --nbd-psk-file there)",
            file=out,
        )
    if plan.root != Path("/"):
        print(f"(under {plan.root}: the paths inside the config are the target system's)", file=out)
    if plan.images:
        print("export the test images with these lines of image.cfg:", file=out)
        for image in plan.images:
            print(f"    + {values['host_ip']} {image.name} {image.path}", file=out)
    print("start the node with:", file=out)
    print(f"    virtmanserver --config-file {plan.config}", file=out)
    return 0


def main(argv: Sequence[str] | None = None, out: Any = None) -> int:
    """Entry point; returns the exit status."""
    stream = out if out is not None else sys.stdout
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    plan, errors = make_plan(args)
    if plan is None:
        for message in errors:
            print(f"{PROG}: error: {message}", file=sys.stderr)
        print(f"{PROG}: nothing was written", file=sys.stderr)
        return 2
    missing = missing_tools(plan.driver)
    if missing:
        first, *rest = missing_tools_message(missing, plan.driver)
        print(f"{PROG}: error: {first}", file=sys.stderr)
        for line in rest:
            print(line, file=sys.stderr)
        print(f"{PROG}: nothing was written", file=sys.stderr)
        return 2
    if plan.root == Path("/"):
        ports = [(OPTS[name].default, what) for name, what in PORTS]
        warnings = network_warnings(plan.values["host_ip"], ports)
        if not os.path.exists("/dev/fuse"):
            warnings.append("/dev/fuse is missing: the FUSE exports of the relay need it")
        for warning in warnings:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
    return run(plan, stream)


if __name__ == "__main__":
    sys.exit(main())
