#!/usr/bin/env python3
"""Prepare a host for its VMThunder role (the original's ``vmt-initenv.sh``).

``--role node`` (the default) prepares a compute node or image server for virtmanserver;
``--role master`` prepares the Volt master for volt-api. Run it (as root) on every host, from
the venv the wheel was installed in (docs/deploy.rst)::

    /opt/vmthunder/bin/vmt-initenv.py --role master --host-ip 10.0.0.1
    /opt/vmthunder/bin/vmt-initenv.py --role node --master-ip 10.0.0.1 --token "$NODE_TOKEN"
    systemctl start volt-api        # or virtmanserver

Several masters on one PostgreSQL (docs/ha.rst): ``--role master --database
postgresql+psycopg://...`` on each, and ``--master-ip 10.0.0.11,10.0.0.12`` on the nodes.

Both roles, on ``/`` (not under ``--root``) and without ``--no-packages``: the Debian packages
of the role that are missing are installed first (``apt-get install``; ``PACKAGES``). Then
the role's config file is written (mode 0600, generated credentials), the role's systemd
unit (``etc/systemd/``, ExecStart pointing at ``--venv``) is installed in
``/etc/systemd/system`` and enabled (``--no-enable``: installed only). ``--dry-run`` checks
everything and prints what it would do, writing nothing.

It is idempotent: a second run with the same arguments keeps the config (and its generated
credentials), the key, the directories, the test images and the unit as they are and exits
0. An existing config that says something else than the arguments (or a test image of
another size) is refused unless ``--force``.

``--role master`` writes ``/etc/volt/volt.conf``: ``bind_host`` (``--host-ip``, default
detected), ``[auth] token`` (the admin token: ``--token`` or generated) and ``[auth]
node_secret`` (``--node-secret`` or generated; nodes' tokens are ``volt-manage node-token
<host_ip>``), ``[database] connection`` (``--database``; default SQLite in
``/var/lib/volt``). volt-api runs as a dynamic user and reads it as a systemd credential.

``--role node``, in this order (nothing is written until every check has passed):

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
3. keeps an existing ``etc/virtman/virtman.conf`` that sets what the arguments give (and
   an existing test image of the size given); refuses another one unless ``--force``;
4. creates virtman's directories (state_dir ``/var/lib/virtman`` with ``cache`` and
   ``instances``, run_dir ``/run/virtman``; mode 0700, missing parents 0755, existing ones
   are left alone);
5. with ``--test-image NAME:MIB`` (repeatable) writes a file of MIB MiB of random bytes,
   ``/var/lib/virtman/images/NAME.raw``, to export with a line of image.cfg (the original's
   commented-out part made such files under /root/blocks);
6. puts the NBD relays' pre-shared key in ``/etc/virtman/nbd.psk`` (mode 0600): a copy of
   ``--nbd-psk-file``, else the file already there, else a new random 256-bit key;
7. writes ``/etc/virtman/virtman.conf`` last (mode 0600: it holds the tokens): host_ip,
   master_ip (with several comma-separated ``--master-ip``, also ``master_url`` listing
   every master: docs/ha.rst), master_token (``--token``, or with ``--node-secret`` this
   host's node token: see ``volt-manage node-token``), api_token (the token XML-RPC callers such as
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

8. installs and enables ``virtmanserver.service``, and disables the tgt package's own
   ``tgt.service`` (virtmanserver runs its own tgtd on port 3260).

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
import subprocess
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
ROLES = ("master", "node")
CONFIG = Path("etc/virtman/virtman.conf")  # relative to --root
VOLT_CONFIG = Path("etc/volt/volt.conf")  # relative to --root
UNITS = {"master": "volt-api.service", "node": "virtmanserver.service"}
UNIT_DIR = Path("/etc/systemd/system")
WANTS = UNIT_DIR / "multi-user.target.wants"  # the units' WantedBy=
DEFAULT_VENV = Path("/opt/vmthunder")
# volt-api's default bind_port (volt.conf is not imported: its options would collide with
# virtman's on oslo's one global CONF).
VOLT_PORT = 7447  # the ExecStart= of etc/systemd/*.service
# Debian packages of each role (the node's: its driver's tools, libvirt, open-iscsi for the
# dm driver; both: python3-venv for the venv the wheel goes in).
PACKAGES: dict[str, list[str]] = {
    "master": ["python3-venv"],
    "node": [
        "python3-venv",
        "qemu-system-x86",
        "qemu-utils",
        "qemu-block-extra",
        "fuse3",
        "tgt",
        "open-iscsi",
        "libvirt-daemon-system",
        "libvirt-daemon-driver-qemu",
        "libvirt-clients",
        "iproute2",
    ],
}
# Options that only --role node takes (dest -> option).
NODE_ONLY = {
    "master_ip": "--master-ip",
    "api_token": "--api-token",
    "chap_user": "--chap-user",
    "chap_password": "--chap-password",
    "nbd_psk_file": "--nbd-psk-file",
    "test_image": "--test-image",
}
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
    role: str = "node"
    venv: Path = DEFAULT_VENV
    generated: frozenset[str] = frozenset()  # options of values made up here, not given
    packages: bool = True  # install missing packages (only on /)
    enable: bool = True
    dry_run: bool = False

    def under_root(self, path: Path) -> Path:
        return self.root / path.relative_to("/") if path.is_absolute() else self.root / path

    @property
    def config(self) -> Path:
        return self.root / (CONFIG if self.role == "node" else VOLT_CONFIG)

    @property
    def unit(self) -> str:
        return UNITS[self.role]

    @property
    def live(self) -> bool:
        """On this machine's own root (not under --root)."""
        return self.root == Path("/")

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


def check_masters(value: str) -> list[str]:
    """``--master-ip``: one address, or several comma-separated (masters sharing one
    PostgreSQL, docs/ha.rst), each checked, none twice; their canonical texts."""
    masters = [check_ip(part, "--master-ip") for part in value.split(",")]
    if len(set(masters)) != len(masters):
        raise UsageError(f"--master-ip {value!r}: an address is given twice")
    return masters


def master_urls(masters: Sequence[str]) -> str:
    """virtman's ``master_url`` for several masters: ``http://IP:7447`` each, in order."""
    port = OPTS["master_port"].default
    hosts = [f"[{ip}]" if ":" in ip else ip for ip in masters]
    return ", ".join(f"http://{host}:{port}" for host in hosts)


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


VOLT_SECTIONS = {"bind_host": "DEFAULT", "token": "auth", "node_secret": "auth"}
VOLT_SECTIONS["connection"] = "database"


def render_volt_config(values: dict[str, str]) -> str:
    """volt.conf: ``values`` (bind_host, [auth] token and node_secret, [database]
    connection if given) in their sections; every other option keeps its default."""
    lines = [
        f"# volt.conf written by {PROG}. Every other option keeps its default: see",
        "# etc/volt/volt.conf.sample (share/vmthunder/etc/volt/ in the venv).",
        "# Mode 0600: [auth] token is the admin credential, [auth] node_secret makes every",
        "# node's token (volt-manage node-token <host_ip>). volt-api.service reads this file",
        "# as a systemd credential (LoadCredential=).",
    ]
    for section in ("DEFAULT", "auth", "database"):
        keys = [k for k, s in VOLT_SECTIONS.items() if s == section and k in values]
        if keys:
            lines += ["", f"[{section}]"]
            lines += [f"{key} = {ini_value(values[key])}" for key in keys]
    return "\n".join(lines) + "\n"


def render(plan: Plan) -> str:
    """The role's config file."""
    return render_config(plan.values) if plan.role == "node" else render_volt_config(plan.values)


def config_conflicts(plan: Plan) -> list[str]:
    """Options the existing config does not set to what the arguments give (the generated
    values are not compared: the existing file keeps its own)."""
    lines = set(plan.config.read_text(errors="replace").splitlines())
    return [
        key
        for key, value in plan.values.items()
        if key not in plan.generated and f"{key} = {ini_value(value)}" not in lines
    ]


def unit_sources() -> list[Path]:
    """Where the units are: this clone's etc/systemd when run from a clone, else the
    venv's share/ (the wheel's copy; an editable install's may be stale)."""
    here = Path(__file__).resolve().parent
    return [here.parent / "etc/systemd", Path(sys.prefix) / "share/vmthunder/systemd"]


def unit_text(unit: str, venv: Path) -> str:
    """The unit with ExecStart in ``venv``."""
    for directory in unit_sources():
        if (directory / unit).is_file():
            text = (directory / unit).read_text()
            return text.replace(f"{DEFAULT_VENV}/bin/", f"{venv}/bin/")
    raise FileNotFoundError(f"{unit} is in none of {', '.join(map(str, unit_sources()))}")


def default_venv(role: str) -> Path:
    """This venv if it holds the role's command (vmt-initenv.py run from the installed
    wheel), else /opt/vmthunder."""
    command = "volt-api" if role == "master" else "virtmanserver"
    here = Path(sys.prefix)
    if sys.prefix != sys.base_prefix and (here / "bin" / command).is_file():
        return here
    return DEFAULT_VENV


def systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system")


def missing_packages(names: Sequence[str]) -> list[str]:
    """The Debian packages of ``names`` not installed on this machine."""
    missing = []
    for name in names:
        query = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Status}", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if "ok installed" not in query.stdout:
            missing.append(name)
    return missing


def install_packages(plan: Plan, out: Any) -> None:
    """apt-get install the role's missing packages (only on /)."""
    missing = missing_packages(PACKAGES[plan.role])
    if not missing:
        print(f"packages: all installed ({' '.join(PACKAGES[plan.role])})", file=out)
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    subprocess.run(install, check=True, env=env)
    print(f"packages: installed {' '.join(missing)}", file=out)


def install_unit(plan: Plan, out: Any) -> None:
    """Put the role's unit in /etc/systemd/system (0644) and enable it; for a node, disable
    the tgt package's own tgtd service (it would hold port 3260)."""
    target = plan.under_root(UNIT_DIR / plan.unit)
    text = unit_text(plan.unit, plan.venv)
    if target.is_file() and not target.is_symlink() and target.read_text() == text:
        print(f"kept {target} (unchanged)", file=out)
    else:
        report_dirs(make_dirs(target.parent), out)
        atomic_replace(target, lambda f: f.write(text.encode()), 0o644)
        print(f"installed {target} (ExecStart in {plan.venv}/bin)", file=out)
    live = plan.live and systemd_running()
    if live:
        subprocess.run(["systemctl", "daemon-reload"], check=True)
    if plan.role == "node":
        disable_tgt(plan, live, out)
    if not plan.enable:
        print(f"not enabled (--no-enable): systemctl enable {plan.unit}", file=out)
        return
    if live:
        subprocess.run(["systemctl", "enable", "--quiet", plan.unit], check=True)
        print(f"enabled {plan.unit}", file=out)
        return
    # What `systemctl enable` does for WantedBy=multi-user.target, without a running systemd.
    link = plan.under_root(WANTS / plan.unit)
    if link.is_symlink() and os.readlink(link) == str(UNIT_DIR / plan.unit):
        print(f"kept {link} (enabled)", file=out)
        return
    report_dirs(make_dirs(link.parent), out)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(UNIT_DIR / plan.unit)
    print(f"enabled {plan.unit}: {link} -> {UNIT_DIR / plan.unit}", file=out)


def disable_tgt(plan: Plan, live: bool, out: Any) -> None:
    if live:
        if subprocess.run(["systemctl", "cat", "tgt.service"], capture_output=True).returncode:
            return
        subprocess.run(["systemctl", "disable", "--now", "--quiet", "tgt.service"], check=True)
        print("disabled tgt.service (virtmanserver runs its own tgtd on port 3260)", file=out)
        return
    link = plan.under_root(WANTS / "tgt.service")
    if link.is_symlink():
        link.unlink()
        print(f"disabled tgt.service: removed {link}", file=out)


def describe(plan: Plan, missing: list[str]) -> list[str]:
    """What run() would do (--dry-run), one line per step."""
    lines = []
    if not plan.live:
        lines.append(f"skip packages under --root (on the target: {' '.join(PACKAGES[plan.role])})")
    elif not plan.packages:
        lines.append("skip packages (--no-packages)")
    elif missing:
        lines.append(f"would install packages: {' '.join(missing)}")
    else:
        lines.append("packages: all installed")
    if plan.role == "node":
        for directory in DIRS:
            lines.append(f"would make {plan.under_root(directory)}/ (mode 0700) if missing")
        for image in plan.images:
            lines.append(f"would write test image {plan.under_root(image.path)} ({image.mib} MiB)")
        lines.append(f"would put the NBD key in {plan.psk} (mode 0600) unless there")
    config = plan.config
    if config.exists() and not plan.force:
        lines.append(f"would keep {config} (it sets what the arguments give)")
    else:
        keys = ", ".join(k for k in plan.values if k not in plan.generated)
        made = ", ".join(sorted(plan.generated)) or "nothing"
        lines.append(f"would write {config} (mode 0600): {keys}; generated: {made}")
    unit = plan.under_root(UNIT_DIR / plan.unit)
    lines.append(f"would install {unit} (ExecStart in {plan.venv}/bin)")
    if plan.role == "node":
        lines.append("would disable tgt.service (virtmanserver runs its own tgtd)")
    lines.append(f"would enable {plan.unit}" if plan.enable else f"would not enable {plan.unit}")
    return lines


# -- command line ------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Prepare a host for its role. --role node (default): a compute node or image
            server for virtman: check the driver's tools, write /etc/virtman/virtman.conf
            (mode 0600) and make virtman's directories (/var/lib/virtman/{cache,instances},
            /run/virtman); optionally write random test images to export with image.cfg.
            --role master: write /etc/volt/volt.conf (mode 0600, generated admin token and
            node secret). Both: install the role's missing packages (only on /), install
            and enable its systemd unit (virtmanserver.service, volt-api.service). Every
            argument is checked before anything is written; --dry-run only says what would
            be done. Idempotent: an existing config that sets what the arguments give is
            kept; one that sets something else is refused unless --force."""
        ),
        epilog=textwrap.dedent(
            """\
            examples:
              vmt-initenv.py --role master --host-ip 10.0.0.1 --dry-run
              vmt-initenv.py --role master --host-ip 10.0.0.1
              vmt-initenv.py --master-ip 10.0.0.1 --token "$VOLT_TOKEN" --test-image image1:256
              systemctl start virtmanserver
              virtmanserver --config-file /etc/virtman/virtman.conf   # without systemd

            exit status: 0 done, 1 refused (existing file without --force) or a write
            failed, 2 bad arguments or missing tools (nothing written)."""
        ),
    )
    parser.add_argument(
        "--role",
        choices=ROLES,
        default="node",
        help="What this host runs: volt-api (master) or virtmanserver (node, the default).",
    )
    parser.add_argument(
        "--master-ip",
        metavar="IP[,IP...]",
        help="Volt's address (--role node: required). Several masters sharing one PostgreSQL "
        "(docs/ha.rst): their addresses comma-separated, the one to try first first; "
        "virtman.conf then gets master_url = http://IP:7447, ... (master_ip: the first).",
    )
    parser.add_argument(
        "--host-ip",
        metavar="IP",
        help="This host's address, the one other hosts reach it at (the master's bind_host; "
        "default: the source address of the default route).",
    )
    parser.add_argument(
        "--token",
        help="--role node (required): master_token, this node's Volt credential, best its "
        "node token (`volt-manage node-token <host_ip>` on the master); also the api_token "
        "unless --api-token. --role master: the admin token, [auth] token (default: "
        "generated).",
    )
    parser.add_argument(
        "--node-secret",
        metavar="SECRET",
        help="Volt's [auth] node_secret. --role node: master_token becomes this host_ip's "
        "node token (computed here) instead of --token. --role master: written to "
        "volt.conf (default: generated).",
    )
    parser.add_argument(
        "--database",
        metavar="URL",
        help="--role master: [database] connection, e.g. postgresql+psycopg://volt:PW@db/volt "
        "(default: SQLite in /var/lib/volt, volt-api's StateDirectory).",
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
    parser.add_argument(
        "--venv",
        metavar="DIR",
        help="The venv the wheel is installed in: the unit's ExecStart runs DIR/bin/... "
        f"(default: this venv when it has the role's command, else {DEFAULT_VENV}).",
    )
    parser.add_argument(
        "--no-packages",
        action="store_true",
        help="Do not install the role's missing Debian packages (never done under --root).",
    )
    parser.add_argument(
        "--no-enable", action="store_true", help="Install the unit without enabling it."
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="Check everything, print what would be done, write nothing.",
    )
    return parser


def make_plan(args: argparse.Namespace) -> tuple[Plan | None, list[str]]:
    """The checked plan, or every problem with the arguments."""
    plan, errors = (make_node_plan if args.role == "node" else make_master_plan)(args)
    if plan is None:
        return None, errors
    plan.role = args.role
    plan.venv = Path(os.path.abspath(args.venv)) if args.venv else default_venv(args.role)
    plan.packages = not args.no_packages
    plan.enable = not args.no_enable
    plan.dry_run = args.dry_run
    return plan, []


def host_ip_of(args: argparse.Namespace, errors: list[str]) -> str | None:
    """--host-ip checked, else the detected address."""
    try:
        if args.host_ip is not None:
            return check_ip(args.host_ip, "--host-ip")
        try:
            return check_ip(virtman_conf.detect_host_ip(), "detected host_ip")
        except (ValueError, OSError) as exc:
            errors.append(f"cannot detect this host's address ({exc}): give --host-ip")
    except UsageError as exc:
        errors.append(str(exc))
    return None


def check_root(value: str, errors: list[str]) -> Path:
    root = Path(os.path.abspath(value))
    if not root.is_dir():
        errors.append(f"--root {value!r}: not a directory")
    return root


def make_master_plan(args: argparse.Namespace) -> tuple[Plan | None, list[str]]:
    """volt.conf's values: bind_host, the admin token and node secret (given or generated),
    the database URL if given."""
    errors = [
        f"{option}: only for --role node"
        for dest, option in NODE_ONLY.items()
        if getattr(args, dest) not in (None, [])
    ]
    if args.driver != "qemu":
        errors.append("--driver: only for --role node")
    host_ip = host_ip_of(args, errors)
    values: dict[str, str] = {}
    generated = set()
    for key, given, option in (
        ("token", args.token, "--token"),
        ("node_secret", args.node_secret, "--node-secret"),
    ):
        if given is None:
            values[key] = secrets.token_hex(32)  # 256 bits; never starts with "-" (argv-safe)
            generated.add(key)
        else:
            try:
                values[key] = check_token(given, option)
            except UsageError as exc:
                errors.append(str(exc))
    if not generated and values.get("token") == values.get("node_secret"):
        errors.append("--node-secret must differ from --token (volt-api refuses that)")
    if args.database is not None:
        if not re.fullmatch(r"[a-z][a-z0-9+]*://[!-~]*", args.database):
            errors.append(f"--database {args.database!r}: not an SQLAlchemy URL (driver://...)")
        else:
            values["connection"] = args.database
    root = check_root(args.root, errors)
    if errors or host_ip is None:
        return None, errors
    values = {"bind_host": host_ip, **values}
    plan = Plan(root, values, args.driver, force=args.force, generated=frozenset(generated))
    plan.role = "master"
    return plan, []


def make_node_plan(args: argparse.Namespace) -> tuple[Plan | None, list[str]]:
    """virtman.conf's values, test images, the NBD key's source."""
    errors: list[str] = []
    if args.database is not None:
        errors.append("--database: only for --role master")

    def check(func: Any, *fargs: Any) -> Any:
        try:
            return func(*fargs)
        except UsageError as exc:
            errors.append(str(exc))
            return None

    masters = check(check_masters, args.master_ip)
    master_ip = masters[0] if masters else None
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
        **({"master_url": master_urls(masters)} if len(masters) > 1 else {}),
        "master_token": master_token,
        "api_token": api_token,
        "driver": args.driver,
        "nbd_psk_file": str(PSK_FILE),
    }
    values["chap_user"], values["chap_password"] = chap
    plan = Plan(root, values, args.driver, images, args.force, chap_generated, psk_source)
    if chap_generated:
        plan.generated = frozenset({"chap_user", "chap_password"})
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


def refusals(plan: Plan) -> tuple[list[Path], bool, set[Path]]:
    """Existing files the arguments disagree with (refused without --force), whether the
    existing config is kept, and the test images kept (same size)."""
    refused: list[Path] = []
    keep_config = False
    if plan.config.exists() or plan.config.is_symlink():
        if plan.force:
            pass
        elif plan.config.is_file() and not plan.config.is_symlink() and not config_conflicts(plan):
            keep_config = True
        else:
            refused.append(plan.config)
    kept_images = set()
    for image in plan.images:
        path = plan.under_root(image.path)
        if path.exists() and not plan.force:
            if path.is_file() and path.stat().st_size == image.mib * CHUNK:
                kept_images.add(path)
            else:
                refused.append(path)
    return refused, keep_config, kept_images


def run(plan: Plan, out: Any) -> int:
    refused, keep_config, kept_images = refusals(plan)
    if refused:
        for path in refused:
            print(f"{PROG}: error: {path} exists: give --force to replace it", file=sys.stderr)
        print(f"{PROG}: nothing was written", file=sys.stderr)
        return 1
    if plan.live and plan.packages:  # never under --root
        try:
            install_packages(plan, out)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"{PROG}: error: installing packages: {exc}", file=sys.stderr)
            return 1
        missing = missing_tools(plan.driver) if plan.role == "node" else {}
        if missing:
            first, *rest = missing_tools_message(missing, plan.driver)
            print(f"{PROG}: error: {first}", file=sys.stderr)
            for line in rest:
                print(line, file=sys.stderr)
            return 2
    try:
        if plan.role == "node":
            for directory in DIRS:  # virtman's state: its owner's only (docs/security.rst)
                report_dirs(make_dirs(plan.under_root(directory), 0o700), out)
            for image in plan.images:
                path = plan.under_root(image.path)
                if path in kept_images:
                    print(f"kept test image {path} ({image.mib} MiB)", file=out)
                    continue
                report_dirs(make_dirs(path.parent), out)
                digest = atomic_replace(path, lambda f, m=image.mib: write_random(f, m), 0o644)
                print(f"wrote test image {path} ({image.mib} MiB, sha256 {digest})", file=out)
        report_dirs(make_dirs(plan.config.parent), out)
        if plan.role == "node":
            print(write_psk(plan), file=out)
        if keep_config:
            print(f"kept {plan.config} (it sets what the arguments give)", file=out)
        else:
            text = render(plan).encode()
            atomic_replace(plan.config, lambda f: f.write(text), 0o600)
            print(config_summary(plan), file=out)
        install_unit(plan, out)
    except (OSError, InvalidArgument, FileNotFoundError, subprocess.CalledProcessError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    if plan.role == "node" and plan.chap_generated and not keep_config:
        print(
            "every node of the cluster needs the same CHAP account and NBD key: copy "
            f"chap_user, chap_password and {PSK_FILE} to the others (or pass --chap-user, "
            "--chap-password and --nbd-psk-file there)",
            file=out,
        )
    if plan.role == "master":
        print(
            f"admin token: [auth] token in {plan.config}; a node's token: volt-manage "
            "node-token <host_ip> (or give the nodes --node-secret)",
            file=out,
        )
    if not plan.live:
        print(f"(under {plan.root}: the paths inside the config are the target system's)", file=out)
    if plan.images:
        print("export the test images with these lines of image.cfg:", file=out)
        for image in plan.images:
            print(f"    + {plan.values['host_ip']} {image.name} {image.path}", file=out)
    command = "virtmanserver" if plan.role == "node" else "volt-api"
    print(f"start the {plan.role} with:", file=out)
    print(f"    systemctl start {plan.unit}", file=out)
    print(f"    (without systemd: {command} --config-file {plan.config})", file=out)
    return 0


def config_summary(plan: Plan) -> str:
    values = plan.values
    if plan.role == "master":
        made = ", ".join(sorted(plan.generated)) or "nothing"
        database = values.get("connection", "SQLite in /var/lib/volt").split("@")[-1]
        return (
            f"wrote {plan.config} (mode 0600): bind_host {values['bind_host']}, database "
            f"{database}, generated: {made}"
        )
    chap = "generated" if plan.chap_generated else "given"
    volt = values.get("master_url") or f"{values['master_ip']}:{OPTS['master_port'].default}"
    return (
        f"wrote {plan.config} (mode 0600): host_ip {values['host_ip']}, Volt "
        f"{volt}, driver {plan.driver}, "
        f"CHAP {chap} (user {values['chap_user']})"
    )


def main(argv: Sequence[str] | None = None, out: Any = None) -> int:
    """Entry point; returns the exit status."""
    stream = out if out is not None else sys.stdout
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    if args.role == "node" and (args.master_ip is None or args.token is None):
        missing = [
            o for o, v in (("--master-ip", args.master_ip), ("--token", args.token)) if v is None
        ]
        try:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 2
    plan, errors = make_plan(args)
    if plan is None:
        for message in errors:
            print(f"{PROG}: error: {message}", file=sys.stderr)
        print(f"{PROG}: nothing was written", file=sys.stderr)
        return 2
    try:
        unit_text(plan.unit, plan.venv)
    except FileNotFoundError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        print(f"{PROG}: nothing was written", file=sys.stderr)
        return 2
    # Only looked up here (dpkg-query): run() installs them, before anything else.
    to_install = missing_packages(PACKAGES[plan.role]) if plan.live and plan.packages else []
    missing = missing_tools(plan.driver) if plan.role == "node" else {}
    if missing and not to_install:
        first, *rest = missing_tools_message(missing, plan.driver)
        print(f"{PROG}: error: {first}", file=sys.stderr)
        for line in rest:
            print(line, file=sys.stderr)
        print(f"{PROG}: nothing was written", file=sys.stderr)
        return 2
    if plan.live:
        warnings = []
        if plan.role == "node":
            ports = [(OPTS[name].default, what) for name, what in PORTS]
            warnings = network_warnings(plan.values["host_ip"], ports)
            if not os.path.exists("/dev/fuse"):
                warnings.append("/dev/fuse is missing: the FUSE exports of the relay need it")
        else:
            warnings = network_warnings(plan.values["bind_host"], [(VOLT_PORT, "volt-api")])
        for warning in warnings:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
    if plan.dry_run:
        refused, _, _ = refusals(plan)
        for path in refused:
            print(f"{PROG}: error: {path} exists: give --force to replace it", file=sys.stderr)
        for line in describe(plan, to_install):
            print(line, file=stream)
        print("dry run: nothing was written", file=stream)
        return 1 if refused else 0
    return run(plan, stream)


if __name__ == "__main__":
    sys.exit(main())
