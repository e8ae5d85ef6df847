"""The payload disk of a run: the caller's files, the project's current code, the node list.

The payload is a plain tar written to a raw file and attached read-only as ``/dev/vdb``;
``guestkit-init`` unpacks it into ``/ci`` and runs ``/ci/run.sh``. Layout inside the tar::

    ./run.sh, ...            the caller's payload folder, as it is (run.sh made executable)
    ./project/<package>/...  brick volt virtman voltclient virtmanclient, *.py and data files
    ./project/<package>/__pycache__/*.cpython-311.pyc  compiled here (checked-hash pycs)
    ./project/bin/<script>   console scripts of setup.cfg (virtmanserver, volt-api, ...)
    ./project/<name>-<version>.dist-info/  METADATA and entry_points.txt of setup.cfg, so
                             ``importlib.metadata`` finds the entry points (Volt's executors)
    ./guestkit/hosts         "10.77.B.IDX NAME" lines, appended to the guest's /etc/hosts
    ./guestkit/nodes         "NAME IDX MEM_MIB ADDR0 [ADDR1 ...]" per node
    ./guestkit/project.sha256  the digest of the project's files (``project_digest``)

The image's venv has ``/ci/project`` on ``sys.path`` (a ``.pth`` file), so ``import virtman``
inside the guest imports this run's code: this is the thin top layer that keeps a re-run
after a code change as fast as any other run (packing and compiling ~60 files takes ~0.2 s).
The ``.pyc`` files matter: under TCG, compiling the project at import costs the guest ~7 s
per Python process.
"""

from __future__ import annotations

import configparser
import hashlib
import io
import py_compile
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from brick.exception import InvalidArgument, NotFound

CHECKOUT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("brick", "volt", "virtman", "voltclient", "virtmanclient")
RESERVED = ("project", "guestkit", "out")  # top-level names the payload folder must not use
VENV_PYTHON = "/opt/vmt/venv/bin/python"
GUEST_PYTHON = (3, 11)  # Debian bookworm's; .pyc files made here are valid there if equal


def project_files(root: Path, packages: Sequence[str] = PROJECT_PACKAGES) -> list[Path]:
    """Every file of ``packages`` under ``root`` (no ``__pycache__``, no ``.pyc``), sorted."""
    files: list[Path] = []
    for package in packages:
        top = root / package
        if not (top / "__init__.py").is_file():
            raise NotFound("Python package", str(top))
        files += [
            p
            for p in top.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        ]
    return sorted(files)


def project_digest(root: Path, packages: Sequence[str] = PROJECT_PACKAGES) -> str:
    """A hash of the project's files (names and contents)."""
    digest = hashlib.sha256()
    for path in project_files(root, packages):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _setup_cfg(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(path)
    return parser


def console_scripts(setup_cfg: Path) -> dict[str, str]:
    """``{script: "module:function"}`` from ``[options.entry_points] console_scripts``."""
    text = _setup_cfg(setup_cfg).get("options.entry_points", "console_scripts", fallback="")
    scripts = {}
    for line in text.splitlines():
        if "=" in line:
            name, _, target = line.partition("=")
            scripts[name.strip()] = target.strip()
    return scripts


def dist_info(setup_cfg: Path) -> dict[str, bytes]:
    """A dist-info of the project (``{relative path: contents}``): the guest has the code
    on ``sys.path`` but no installed distribution, and entry points need one."""
    cfg = _setup_cfg(setup_cfg)
    name = cfg.get("metadata", "name", fallback="project")
    version = cfg.get("metadata", "version", fallback="0.0.0")
    groups = cfg["options.entry_points"] if cfg.has_section("options.entry_points") else {}
    entry_points = "".join(
        f"[{group}]\n" + "".join(f"{line.strip()}\n" for line in value.splitlines() if line)
        for group, value in groups.items()
    )
    info = f"{name.replace('-', '_')}-{version}.dist-info"
    return {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/entry_points.txt": entry_points.encode(),
    }


def _wrapper(target: str) -> bytes:
    module, _, function = target.partition(":")
    return (
        f"#!{VENV_PYTHON}\nimport sys\n\nfrom {module} import {function}\n\n"
        f"sys.exit({function}())\n"
    ).encode()


def _pyc(source: Path, guest_path: str, tmp: Path) -> bytes | None:
    """``source`` compiled as a checked-hash pyc (valid whatever the file times), or None."""
    if sys.version_info[:2] != GUEST_PYTHON:
        return None
    cfile = tmp / "out.pyc"
    py_compile.compile(
        str(source),
        cfile=str(cfile),
        dfile=guest_path,
        doraise=True,
        invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
    )
    return cfile.read_bytes()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def _as_root(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if "__pycache__" in Path(info.name).parts or info.name.endswith(".pyc"):
        return None
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if info.name == "./run.sh":
        info.mode |= 0o755
    return info


def write_payload(
    out: Path,
    payload_dir: Path | None,
    *,
    nodes: Sequence[tuple[str, int, int, Sequence[str]]],
    project_root: Path | None = CHECKOUT,
    packages: Sequence[str] = PROJECT_PACKAGES,
    extra_files: Mapping[str, bytes] | None = None,
) -> str:
    """Write the payload tar to ``out``; returns the project digest ("" without a project).

    ``nodes`` is ``(name, index, mem_mib, addresses)`` per node; ``extra_files`` maps more
    paths (relative to ``/ci``) to contents.
    """
    if payload_dir is not None:
        payload_dir = Path(payload_dir)
        if not payload_dir.is_dir():
            raise NotFound("payload folder", str(payload_dir))
        for name in RESERVED:
            if (payload_dir / name).exists():
                raise InvalidArgument("payload folder", str(payload_dir), f"uses {name!r}")
    digest = project_digest(project_root, packages) if project_root is not None else ""
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        if payload_dir is not None:
            for path in sorted(payload_dir.iterdir()):
                tar.add(path, arcname=f"./{path.name}", filter=_as_root)
        if project_root is not None:
            with tempfile.TemporaryDirectory() as tmp:
                for path in project_files(project_root, packages):
                    rel = path.relative_to(project_root)
                    tar.add(path, arcname=f"./project/{rel}", recursive=False, filter=_as_root)
                    if path.suffix == ".py":
                        tag = sys.implementation.cache_tag
                        pyc = _pyc(path, f"/ci/project/{rel}", Path(tmp))
                        if pyc is not None:
                            name = f"./project/{rel.parent}/__pycache__/{path.stem}.{tag}.pyc"
                            _add_bytes(tar, name, pyc)
            for meta in ("setup.cfg", "requirements.txt"):
                if (project_root / meta).is_file():
                    tar.add(project_root / meta, arcname=f"./project/{meta}", filter=_as_root)
            setup_cfg = project_root / "setup.cfg"
            if setup_cfg.is_file():
                for name, target in sorted(console_scripts(setup_cfg).items()):
                    _add_bytes(tar, f"./project/bin/{name}", _wrapper(target), 0o755)
                for name, data in sorted(dist_info(setup_cfg).items()):
                    _add_bytes(tar, f"./project/{name}", data)
        hosts = "".join(
            f"{addr.split('/')[0]} {name if i == 0 else f'{name}-{i}'}\n"
            for name, _, _, addrs in nodes
            for i, addr in enumerate(addrs)
        )
        table = "".join(
            f"{name} {index} {mem} {' '.join(addrs)}\n" for name, index, mem, addrs in nodes
        )
        _add_bytes(tar, "./guestkit/hosts", hosts.encode())
        _add_bytes(tar, "./guestkit/nodes", table.encode())
        _add_bytes(tar, "./guestkit/project.sha256", (digest + "\n").encode())
        for name, data in sorted((extra_files or {}).items()):
            _add_bytes(tar, f"./{name.lstrip('/')}", data)
    return digest
