"""Relay targets on the kernel's iSCSI target (LIO), through rtslib-fb.

A compute node re-exports its cached image read-only under the image's own IQN, LUN 1, so that
its children in Volt's tree read from it. ``LioTargets.export`` builds, in this order (so that
nobody can log in to a half-made target): a read-only block storage object, the target, TPG 1,
the LUN, the portals, then authentication, and enables the TPG last. Any failure removes what
the call made.

Authentication is always CHAP (DESIGN §5: "CHAP on every target"):

- **ACL mode** (``initiators=[iqn, ...]``): one node ACL per initiator IQN, each with the CHAP
  account and the LUN mapped write-protected; other initiators cannot log in at all.
- **Demo mode with CHAP** (``initiators=None``): any initiator that knows the CHAP account may
  log in (``generate_node_acls=1``, TPG-level ``auth/userid``/``password``,
  ``demo_mode_write_protect=1``). For trees whose children are not known in advance; the
  shared secret is then the only gate.

Ownership: the storage objects we make are named ``vmt-...`` (``OWNER_PREFIX``); a target is
ours if a LUN of it uses one. ``list``/``remove``/``remove_all`` touch only ours; ``export``
refuses an IQN that exists and is not ours, or is ours with other parameters (``Conflict``).

rtslib_fb is imported on first use, so this module imports where there is no configfs (the
project's hosts); ``rtslib=`` takes a stand-in module (tests).

Kernel fact that shapes the driver (seen in a guest): LIO's iblock backend opens its device
exclusively (``FMODE_EXCL``) and rtslib refuses a device that is open ``O_EXCL`` elsewhere, while
every device-mapper table opens its devices exclusively with one shared holder. So the same
device cannot be both under a dm table (``snapshot-origin``) and exported by LIO: export a
``linear`` view of the cached device (dm tables may share a device), not the cached device.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from brick import values
from brick.exception import BrickError, Conflict, InvalidArgument
from brick.tgt import Chap, validate_iqn, validate_portal

LOG = logging.getLogger(__name__)

OWNER_PREFIX = "vmt-"
DEFAULT_PORTALS = ("0.0.0.0:3260",)
_TPG_TAG = 1
_SAFE = re.compile(r"[^A-Za-z0-9_-]+")
_DEVICE = re.compile(r"/dev/[A-Za-z0-9_.:+@=,-]+(/[A-Za-z0-9_.:+@=,-]+)*")


class LioError(BrickError):
    """rtslib-fb (or configfs under it) refused an operation."""

    def __init__(self, action: str, detail: str) -> None:
        self.action, self.detail = action, detail
        super().__init__(f"LIO: cannot {action}: {detail}")


@dataclass(frozen=True)
class LioExport:
    """One relay target as it is in configfs now (the CHAP password is not kept here)."""

    iqn: str
    device: str
    lun: int
    portals: tuple[str, ...]
    initiators: tuple[str, ...] | None  # None: demo mode
    chap_user: str | None
    storage_object: str
    enabled: bool = True
    readonly: bool = True
    sessions: tuple[str, ...] = field(default=(), compare=False)


def storage_object_name(iqn: str, prefix: str = OWNER_PREFIX) -> str:
    """The storage object name for a relay of ``iqn``: prefix + readable tail + short hash."""
    tail = _SAFE.sub("-", validate_iqn(iqn).rpartition(":")[2] or iqn)[:40].strip("-")
    digest = hashlib.sha256(iqn.encode()).hexdigest()[:8]
    return f"{prefix}{tail}-{digest}" if tail else f"{prefix}{digest}"


def _validate_device(value: object) -> str:
    if (
        not isinstance(value, str)
        or not _DEVICE.fullmatch(value)
        or os.path.normpath(value) != value
    ):
        raise InvalidArgument("device", value, "must be a normalised /dev/... block device path")
    return value


def _portal_address(portal: str) -> tuple[str, int]:
    """``ip:port`` -> (ip, port); an IPv6 address keeps its brackets (rtslib wants them)."""
    where = values.Portal.parse(validate_portal(portal))
    return values.bracket(where.host), where.port


class LioTargets:
    """Our relay targets on this host's LIO. Nothing is cached: configfs is read every time."""

    def __init__(self, *, rtslib: ModuleType | Any | None = None, prefix: str = OWNER_PREFIX):
        if not isinstance(prefix, str) or not re.fullmatch(r"[a-z][a-z0-9]{1,15}-", prefix):
            raise InvalidArgument("prefix", prefix, "must be like 'vmt-' ([a-z][a-z0-9]+-)")
        self._rtslib = rtslib
        self.prefix = prefix

    @property
    def rtslib(self) -> Any:
        """The rtslib_fb module, imported on first use."""
        if self._rtslib is None:
            self._rtslib = importlib.import_module("rtslib_fb")
        return self._rtslib

    def _fail(self, action: str, exc: Exception) -> LioError:
        return LioError(action, f"{type(exc).__name__}: {exc}")

    # -- reading -------------------------------------------------------------------------
    def _iscsi_targets(self) -> builtins.list[Any]:
        root = self.rtslib.RTSRoot()
        return [t for t in root.targets if t.fabric_module.name == "iscsi"]

    def _find(self, iqn: str) -> Any | None:
        return next((t for t in self._iscsi_targets() if t.wwn == iqn), None)

    def _our_luns(self, target: Any) -> builtins.list[tuple[Any, Any]]:
        return [
            (tpg, lun)
            for tpg in target.tpgs
            for lun in tpg.luns
            if lun.storage_object.name.startswith(self.prefix)
        ]

    def _describe(self, target: Any) -> LioExport | None:
        ours = self._our_luns(target)
        if not ours:
            return None
        tpg, lun = ours[0]
        so = lun.storage_object
        demo = tpg.get_attribute("generate_node_acls") == "1"
        acls = list(tpg.node_acls)
        chap_user = (tpg.chap_userid if demo else (acls[0].chap_userid if acls else "")) or None
        sessions = self._sessions(tpg, acls)
        return LioExport(
            iqn=target.wwn,
            device=so.udev_path,
            lun=lun.lun,
            portals=tuple(
                sorted(validate_portal(f"{np.ip_address}:{np.port}") for np in tpg.network_portals)
            ),
            initiators=None if demo else tuple(sorted(acl.node_wwn for acl in acls)),
            chap_user=chap_user,
            storage_object=so.name,
            enabled=bool(tpg.enable),
            readonly=bool(so.readonly),
            sessions=sessions,
        )

    @staticmethod
    def _sessions(tpg: Any, acls: Sequence[Any]) -> tuple[str, ...]:
        """Initiators logged in now: those of ACLs with a session, and (demo mode) the
        TPG's ``dynamic_sessions`` file, which rtslib does not read."""
        names = {acl.node_wwn for acl in acls if acl.session}
        try:
            with open(f"{tpg.path}/dynamic_sessions") as f:
                # one name a line, and the kernel leaves a NUL after the last one
                text = f.read().replace("\0", "\n")
                names.update(line.strip() for line in text.split("\n") if line.strip())
        except OSError:
            pass
        return tuple(sorted(names))

    def sessions(self, iqn: str) -> tuple[str, ...]:
        """The initiator IQNs connected to our target ``iqn`` now (() if there is none): a
        relay is kept while children still read from it."""
        export = self.get(iqn)
        return export.sessions if export else ()

    def get(self, iqn: str) -> LioExport | None:
        """Our relay target ``iqn``, or None (also if ``iqn`` exists but is not ours)."""
        iqn = validate_iqn(iqn)
        try:
            target = self._find(iqn)
            return None if target is None else self._describe(target)
        except BrickError:
            raise
        except Exception as exc:
            raise self._fail(f"read target {iqn}", exc) from exc

    def list(self) -> builtins.list[LioExport]:
        """Every relay target of ours, by IQN."""
        try:
            found = [self._describe(t) for t in self._iscsi_targets()]
        except BrickError:
            raise
        except Exception as exc:
            raise self._fail("list targets", exc) from exc
        return sorted((e for e in found if e is not None), key=lambda e: e.iqn)

    # -- changes -------------------------------------------------------------------------
    def export(
        self,
        iqn: str,
        device: str,
        *,
        chap: Chap,
        initiators: Sequence[str] | None = None,
        portals: Sequence[str] = DEFAULT_PORTALS,
        lun: int = 1,
    ) -> LioExport:
        """Export ``device`` read-only as LUN ``lun`` of ``iqn``, with CHAP; see module doc.

        Idempotent: an existing target of ours with the same parameters is returned as it is.
        :raises Conflict: ``iqn`` exists and is not ours, or is ours with other parameters
        :raises LioError: rtslib refused (device in use, configfs missing, ...); nothing of
            this call is left behind
        """
        iqn = validate_iqn(iqn)
        device = _validate_device(device)
        if not isinstance(chap, Chap):
            raise InvalidArgument("chap", type(chap).__name__, "must be a Chap")
        if isinstance(lun, bool) or not isinstance(lun, int) or not 0 <= lun <= 255:
            raise InvalidArgument("lun", lun, "must be an integer 0-255")
        if isinstance(portals, str) or not portals:
            raise InvalidArgument("portals", portals, "must be a non-empty list of ip:port")
        wanted_portals = tuple(sorted({validate_portal(p) for p in portals}))
        wanted_acl: tuple[str, ...] | None = None
        if initiators is not None:
            if isinstance(initiators, str) or not initiators:
                raise InvalidArgument(
                    "initiators", initiators, "must be a non-empty list of IQNs, or None"
                )
            wanted_acl = tuple(sorted({validate_iqn(i, "initiators") for i in initiators}))

        wanted = LioExport(
            iqn=iqn,
            device=device,
            lun=lun,
            portals=wanted_portals,
            initiators=wanted_acl,
            chap_user=chap.user,
            storage_object=storage_object_name(iqn, self.prefix),
        )
        try:
            existing = self._find(iqn)
            if existing is not None:
                return self._check_same(existing, wanted, chap)
            self._create(wanted, chap)
        except BrickError:
            raise
        except Exception as exc:
            raise self._fail(f"export {device} as {iqn}", exc) from exc
        LOG.info(
            "LIO exports %s read-only as %s lun %d on %s (%s, CHAP user %s)",
            device,
            iqn,
            lun,
            ",".join(wanted_portals),
            f"ACL {','.join(wanted_acl)}" if wanted_acl else "demo mode",
            chap.user,
        )
        return wanted

    def _check_same(self, target: Any, wanted: LioExport, chap: Chap) -> LioExport:
        have = self._describe(target)
        if have is None:
            raise Conflict("LIO target", wanted.iqn, "exists and is not ours")
        differences = [
            f"{name} {getattr(have, name)!r} != {getattr(wanted, name)!r}"
            for name in ("lun", "portals", "initiators", "chap_user", "storage_object")
            if getattr(have, name) != getattr(wanted, name)
        ]
        if os.path.realpath(have.device) != os.path.realpath(wanted.device):
            differences.append(f"device {have.device!r} != {wanted.device!r}")
        if not differences and self._password_of(target, have) != chap.password:
            differences.append("the CHAP password differs")
        if not have.enabled:
            differences.append("its TPG is disabled (a half-made export?)")
        if differences:
            raise Conflict("LIO target", wanted.iqn, "; ".join(differences))
        LOG.info("LIO target %s already exported as asked", wanted.iqn)
        return have

    def _password_of(self, target: Any, have: LioExport) -> str:
        tpg = self._our_luns(target)[0][0]
        if have.initiators is None:
            return str(tpg.chap_password)
        passwords = {acl.chap_password for acl in tpg.node_acls}
        return str(passwords.pop()) if len(passwords) == 1 else ""

    def _create(self, wanted: LioExport, chap: Chap) -> None:
        r = self.rtslib
        so = target = None
        try:
            so = r.BlockStorageObject(wanted.storage_object, dev=wanted.device, readonly=True)
            target = r.Target(r.FabricModule("iscsi"), wanted.iqn, mode="create")
            tpg = r.TPG(target, _TPG_TAG, mode="create")
            tpg_lun = r.LUN(tpg, wanted.lun, so)
            for portal in wanted.portals:
                address, port = _portal_address(portal)
                r.NetworkPortal(tpg, address, port, mode="create")
            tpg.set_attribute("authentication", "1")
            if wanted.initiators is None:
                tpg.set_attribute("generate_node_acls", "1")
                tpg.set_attribute("cache_dynamic_acls", "1")
                tpg.set_attribute("demo_mode_write_protect", "1")
                tpg.chap_userid = chap.user
                tpg.chap_password = chap.password
            else:
                tpg.set_attribute("generate_node_acls", "0")
                for initiator in wanted.initiators:
                    acl = r.NodeACL(tpg, initiator, mode="create")
                    acl.chap_userid = chap.user
                    acl.chap_password = chap.password
                    r.MappedLUN(acl, wanted.lun, tpg_lun, write_protect=True)
            tpg.enable = True
        except BaseException:
            for obj in (target, so):
                if obj is not None:
                    try:
                        obj.delete()
                    except Exception as undo:  # keep the first error; log the second
                        LOG.error("LIO: could not undo %r: %s", obj, undo)
            raise

    def remove(self, iqn: str) -> bool:
        """Remove our target ``iqn`` and its storage objects; False if there was none.

        :raises Conflict: ``iqn`` exists but is not ours
        """
        iqn = validate_iqn(iqn)
        try:
            target = self._find(iqn)
            if target is None:
                return False
            ours = self._our_luns(target)
            if not ours:
                raise Conflict("LIO target", iqn, "is not ours: not removed")
            objects = [lun.storage_object for _tpg, lun in ours]
            target.delete()  # disables the TPG, then ACLs, LUNs, portals, the target
            for so in objects:
                if not list(so.attached_luns):
                    so.delete()
        except BrickError:
            raise
        except Exception as exc:
            raise self._fail(f"remove target {iqn}", exc) from exc
        LOG.info("LIO target %s removed", iqn)
        return True

    def remove_all(self) -> int:
        """Remove every target of ours and our unattached storage objects; return how many
        targets were removed. Targets that are not ours are left alone."""
        count = sum(self.remove(export.iqn) for export in self.list())
        try:
            for so in list(self.rtslib.RTSRoot().storage_objects):
                if so.name.startswith(self.prefix) and not list(so.attached_luns):
                    LOG.info("LIO: removing orphan storage object %s", so.name)
                    so.delete()
        except Exception as exc:
            raise self._fail("remove orphan storage objects", exc) from exc
        return count
