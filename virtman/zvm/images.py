"""The images of the z/VM-shaped API: import, query, export, delete, root disk size.

An imported image is a file that already lies in one of ``image_dirs`` (a ``file://`` URL:
the real path, symlinks and ``..`` resolved, must stay inside; nothing is copied), or one
fetched from an ``http(s)://`` URL into ``<first image_dir>/volume-<name>.raw``
(``download``; at most ``max_import_bytes``, never over an existing file). It is exported by
the node's ``ImageService`` as the iSCSI target ``volume-<name>`` (so every node of the tree
can boot it) and recorded with its metadata; any other scheme is refused (400, ``url``). A
captured image (``GuestBackend.capture``: a guest's disk flattened into a new file, exported
by this node) is recorded the same way, with the metadata of the image the guest ran on.
Export copies the file to a new file in one of ``image_dirs`` (never over an existing one).
Delete removes the target and the record (an imported file stays: it is the operator's);
this node's own idle stack of the image is torn down first; it is refused (409, naming them)
while a real user remains: an instance of this node, another node reading it through this
node's relay or straight from its target. A captured or fetched image's file, made by this
node, is deleted with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from virtman import validation
from virtman.errors import InvalidInput, VirtmanError
from virtman.imageservice import ImageService
from virtman.zvm import download
from virtman.zvm.store import Store

LOG = logging.getLogger(__name__)
BLOCK = 512  # disk_size_units are 512-byte blocks ("<n>:BLK", as an FBA image)
MAX_IMPORT_BYTES = 64 << 30
FETCH_TIMEOUT_S = 60.0


class ImageNotFound(VirtmanError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"Image with name: {name} does not exist.")


class ImageExists(VirtmanError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"Image import error: image name {name} already exist in image database")


class ImageInUse(VirtmanError):
    def __init__(self, name: str, instances: list[str], why: str | None = None) -> None:
        self.name, self.instances = name, instances
        super().__init__(
            f"image {name} is in use: {why}"
            if why
            else f"image {name} is in use by the instances {', '.join(instances)}: delete them "
            "first"
        )


class ImageFailed(VirtmanError):
    """The image service could not export or remove an image target."""


def image_name(value: object) -> str:
    """The API's image name: our names (1-64 of A-Z a-z 0-9 _ . -), short enough that the
    target ``volume-<name>`` is one too."""
    name = validation.name(value, "image_name")
    validation.image_name(name)
    return name


def file_url(value: object, field: str) -> str:
    """The absolute path of a ``file:///...`` URL (no host, no query)."""
    if not isinstance(value, str) or "\0" in value:
        raise InvalidInput(field, value, "must be a file:/// URL")
    parts = urlsplit(value)
    if parts.scheme in ("http", "https"):
        raise InvalidInput(field, value, "only file:/// URLs inside image_dirs are supported here")
    if parts.scheme != "file" or parts.netloc or parts.query or parts.fragment:
        raise InvalidInput(field, value, "must be a file:/// URL (no host, query or fragment)")
    path = unquote(parts.path)
    if not path.startswith("/") or "\0" in path:
        raise InvalidInput(field, value, "must be a file:/// URL with an absolute path")
    return path


class Catalogue:
    def __init__(
        self,
        store: Store,
        service: ImageService,
        instances_of: Callable[[str], list[str]],
        drop_idle: Callable[[str], str | None] = lambda target: None,
        *,
        max_import_bytes: int = MAX_IMPORT_BYTES,
        fetch_timeout_s: float = FETCH_TIMEOUT_S,
        url_prefixes: Sequence[str] = (),
    ) -> None:
        """``instances_of(target)``: the instances of this node on image target ``target``;
        ``drop_idle(target)``: tear down this node's unused stack of it (None: none left,
        else why it stays: ``Virtman.drop_idle_image``); ``max_import_bytes`` and
        ``fetch_timeout_s`` (per read) bound an import from an http(s) URL, allowed only under
        ``url_prefixes`` (none: no URL imports)."""
        self.store = store
        self.service = service
        self.instances_of = instances_of
        self.drop_idle = drop_idle
        self.max_import_bytes = max_import_bytes
        self.fetch_timeout_s = fetch_timeout_s
        self.url_prefixes = tuple(url_prefixes)

    # -- verbs -------------------------------------------------------------------------------
    def import_(self, name: str, url: str, meta: dict[str, Any]) -> None:
        name = image_name(name)
        fetched = isinstance(url, str) and urlsplit(url).scheme in download.SCHEMES
        path = self._fetch(name, url) if fetched else file_url(url, "url")
        try:
            self._register(name, url, path, meta, fetched)
        except BaseException:
            if fetched:
                _remove(path)
            raise

    def _fetch(self, name: str, url: str) -> str:
        """The new file an http(s) URL is fetched into (``<first image_dir>/volume-<name>.raw``);
        the name must be free and the file new."""
        download.check_url(url, self.url_prefixes)
        if not self.service.image_dirs:
            raise InvalidInput("url", url, "this node has no image_dirs to fetch it into")
        if self.store.get("images", name) is not None:
            raise ImageExists(name)
        dest = Path(self.service.image_dirs[0]) / f"{validation.image_name(name)}.raw"
        if os.path.lexists(dest):
            raise InvalidInput("url", url, f"{dest} exists (never overwritten)")
        try:
            size, _ = download.fetch(
                url,
                dest,
                prefixes=self.url_prefixes,
                max_bytes=self.max_import_bytes,
                timeout_s=self.fetch_timeout_s,
            )
        except FileExistsError:
            raise InvalidInput("url", url, f"{dest} appeared meanwhile") from None
        except OSError as exc:
            raise ImageFailed(f"Import image from {url} failed: {exc}") from None
        LOG.info("z/VM API: fetched %s (%d bytes) into %s", url, size, dest)
        return str(dest)

    def _register(
        self, name: str, url: str, path: str, meta: dict[str, Any], fetched: bool
    ) -> None:
        """Export ``path`` as the image ``name`` and record it (its md5sum checked first)."""
        with self.store.lock:
            if self.store.get("images", name) is not None:
                raise ImageExists(name)
            md5 = meta.get("md5sum")
            if md5 is not None:
                real = self._readable(path)
                if _md5(real) != str(md5).lower():
                    raise InvalidInput("md5sum", md5, f"is not the md5sum of {path}")
            target = validation.image_name(name)
            result = self.service.create_image_target(target, path)
            code, _, info = result.partition(":")
            if code == "1":
                raise ImageExists(name)
            if code != "0":
                raise InvalidInput("url", url, info.removeprefix("ImageService: "))
            real_path = info.partition(":")[2]
            size = os.stat(real_path).st_size
            self.store.put(
                "images",
                name,
                {
                    "path": real_path,
                    "target": target,
                    "os_version": meta.get("os_version"),
                    "md5sum": md5,
                    "disk_type": meta.get("disk_type"),
                    "size": size,
                    "imported": time.time(),
                    **({"fetched_from": url} if fetched else {}),
                },
            )
        LOG.info("z/VM API: imported image %s (%s, %d bytes) as %s", name, path, size, target)

    def capture(
        self, name: str, userid: str, capture: Callable[[str, str], dict[str, Any]]
    ) -> None:
        """Record the image ``capture(userid, name)`` makes (``GuestBackend.capture``: the
        guest's disk flattened into a new image file this node exports). A name already
        recorded: ``ImageExists``, nothing captured."""
        name = image_name(name)
        with self.store.lock:
            if self.store.get("images", name) is not None:
                raise ImageExists(name)
            made = capture(userid, name)
            source: dict[str, Any] = next(
                (
                    r
                    for r in self.store.all("images").values()
                    if r.get("target") == made.get("source_image")
                ),
                {},
            )
            self.store.put(
                "images",
                name,
                {
                    "path": made["path"],
                    "target": made["target"],
                    "os_version": source.get("os_version"),
                    "md5sum": None,
                    "disk_type": source.get("disk_type"),
                    "size": int(made["size"]),
                    "imported": time.time(),
                    "captured_from": userid,
                    "connection": made.get("connection"),
                },
            )
        LOG.info("z/VM API: captured guest %s as image %s (%s)", userid, name, made["path"])

    def query(self, name: str | None = None) -> list[dict[str, Any]]:
        records = self.store.all("images")
        if name is not None:
            name = image_name(name)
            if name not in records:
                raise ImageNotFound(name)  # as the connector: Nova imports on this 404
            records = {name: records[name]}
        return [_public(n, r) for n, r in sorted(records.items())]

    def root_disk_size(self, name: str) -> str:
        return str(self._record(name)["size"] // BLOCK)

    def export(self, name: str, dest_url: str) -> dict[str, Any]:
        dest = file_url(dest_url, "dest_url")
        record = self._record(name)
        parent = os.path.realpath(os.path.dirname(dest))
        final = os.path.join(parent, os.path.basename(dest))
        if not os.path.basename(dest) or not any(
            _inside(final, d) for d in self.service.image_dirs
        ):
            raise InvalidInput(
                "dest_url", dest_url, f"must name a file inside image_dirs ({self._dirs()})"
            )
        if not os.path.isdir(parent):
            raise InvalidInput("dest_url", dest_url, "its directory does not exist")
        if os.path.lexists(final):
            raise InvalidInput("dest_url", dest_url, "exists already (never overwritten)")
        source = self._readable(record["path"])
        partial = f"{final}.part-{os.getpid()}"
        try:
            shutil.copyfile(source, partial)
            os.link(partial, final)  # fails if final appeared meanwhile
        except FileExistsError:
            raise InvalidInput("dest_url", dest_url, "exists already (never overwritten)") from None
        except OSError as exc:
            raise ImageFailed(f"Export image to local file system failed: {exc}") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(partial)
        LOG.info("z/VM API: exported image %s to %s", name, final)
        return {
            "image_name": name,
            "image_path": final,
            "os_version": record.get("os_version"),
            "md5sum": record.get("md5sum"),
            "comments": None,
        }

    def delete(self, name: str) -> None:
        with self.store.lock:
            record = self._record(name)
            users = self.instances_of(record["target"])
            if users:
                raise ImageInUse(name, users)
            # this node's own stack of the image, idle since its last instance went, reads
            # the target until the heartbeat tears it down: torn down now instead
            why = self.drop_idle(record["target"])
            if why:
                raise ImageInUse(name, [], why)
            readers = self.service.readers(record["target"])
            if readers:  # other nodes boot it straight from this node's target
                raise ImageInUse(
                    name,
                    [],
                    f"read from this node's target by {', '.join(readers)} (other nodes' "
                    "stacks of it): delete it once they are gone",
                )
            result = self.service.destroy_image_target(record["target"])
            if result.partition(":")[0] not in ("0", "1"):
                raise ImageFailed(f"cannot delete image {name}: {result[2:]}")
            if record.get("captured_from") or record.get("fetched_from"):
                # this node made the file: it goes with the image (an imported file stays)
                _remove(record["path"])
            self.store.drop("images", name)
        LOG.info("z/VM API: deleted image %s (target %s)", name, record["target"])

    # -- helpers -----------------------------------------------------------------------------
    def target_of(self, name: str) -> str:
        """The image target of an imported image (what a deploy snapshots)."""
        return str(self._record(name)["target"])

    def _record(self, name: str) -> dict[str, Any]:
        name = image_name(name)
        record = self.store.get("images", name)
        if record is None:
            raise ImageNotFound(name)
        return dict(record)

    def _readable(self, path: str) -> str:
        real = os.path.realpath(path)
        if not any(_inside(real, d) for d in self.service.image_dirs):
            raise InvalidInput("url", path, f"is outside image_dirs ({self._dirs()})")
        if not os.path.isfile(real):
            raise InvalidInput("url", path, "is not a regular file")
        return real

    def _dirs(self) -> str:
        return ", ".join(self.service.image_dirs)


def _public(name: str, record: dict[str, Any]) -> dict[str, Any]:
    """An image as image_query answers it (the connector's fields)."""
    size = int(record["size"])
    return {
        "imagename": name,
        "imageosdistro": record.get("os_version"),
        "md5sum": record.get("md5sum"),
        "disk_size_units": f"{size // BLOCK}:BLK",
        "image_size_in_bytes": str(size),
        "type": "rootonly",
        "comments": None,
        "last_access_time": record.get("imported"),
    }


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _md5(path: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _inside(real: str, directory: str) -> bool:
    top = os.path.realpath(directory)
    return real != top and os.path.commonpath([real, top]) == top
