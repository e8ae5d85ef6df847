"""Names of everything the ``dm`` driver makes, derived from the image or instance name.

The original's names are kept (``multipath_<image>``, ``origin_<image>``,
``snapshot_<instance>``); the layers the original did not have get names of the same form.
Every dm device of ours also carries a UUID ``VMT-<kind>-<name>``: that is how the driver
tells its devices from anybody else's (a device called ``multipath_x`` without our UUID is
never touched). Image and instance names are already validated (``virtman.validation``:
1-64 of ``[A-Za-z0-9_.-]``), which dm names and UUIDs allow.
"""

from __future__ import annotations

from dataclasses import dataclass

UUID_PREFIX = "VMT-"
CACHE_SET = "vmt_cacheset"  # the node's one bcache cache device (a linear slice)
KINDS = ("multipath", "cachebk", "cached", "origin", "relay")  # per image, bottom to top
SNAPSHOT = "snapshot"


def uuid_of(kind: str, name: str) -> str:
    return f"{UUID_PREFIX}{kind}-{name}"


def parse(dm_name: str, uuid: str) -> tuple[str, str] | None:
    """``(kind, image or instance)`` for a dm device of ours, else None."""
    for kind in (*KINDS, SNAPSHOT):
        prefix = kind + "_"
        if dm_name.startswith(prefix) and uuid == uuid_of(kind, dm_name[len(prefix) :]):
            return kind, dm_name[len(prefix) :]
    return None


@dataclass(frozen=True)
class ImageNames:
    """The dm names of one image's stack, bottom to top."""

    image: str

    @property
    def multipath(self) -> str:
        return f"multipath_{self.image}"

    @property
    def backing(self) -> str:
        """bcache backing device: a local 8 KiB header slice + the multipath device."""
        return f"cachebk_{self.image}"

    @property
    def cached(self) -> str:
        """A linear view of the image's bcache device (``/dev/bcacheN`` has no stable name)."""
        return f"cached_{self.image}"

    @property
    def origin(self) -> str:
        return f"origin_{self.image}"

    @property
    def relay(self) -> str:
        """The linear view LIO exports (LIO cannot export a device dm tables hold)."""
        return f"relay_{self.image}"

    def uuid(self, kind: str) -> str:
        return uuid_of(kind, self.image)

    def path(self, dm_name: str) -> str:
        return f"/dev/mapper/{dm_name}"


def snapshot_name(instance: str) -> str:
    return f"{SNAPSHOT}_{instance}"
