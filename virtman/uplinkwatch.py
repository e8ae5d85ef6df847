"""Serve this node's readers in strict priority of their arrival (``uplink_priority``;
issue 15 item 4, docs/virtman.rst "Readers served by priority").

Every ``interval_s`` (1 s) the addresses reading from this node are collected: the
initiators of every target of the node's tgtd (its relay targets with the qemu driver or
``dm_relay = tgt``, and the image targets of ``create_image_target``) and the peers of the
connections established to ``iscsi_port`` and ``nbd_port`` (the dm driver's LIO relay,
NBD relays). They are ranked in the order they
were FIRST seen (:class:`ReaderOrder`: the order is kept across polls; a reader that
leaves drops out, one that comes back goes last), and :class:`brick.uplink.Uplink` gives
the first the highest priority on the device that carries ``host_ip``. An unchanged list
runs no command. The qdisc is adopted at start when it is ours and removed on stop.

Within one round tgtd's sessions come oldest first (its I_T nexus numbers); the peers read
from ``/proc/net/tcp{,6}`` (LIO's, NBD's) come in the kernel's table order, so two LIO
readers that arrive within the same second are ranked in no particular order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from brick import uplink
from brick.exception import BrickError
from brick.periodic import Periodic
from brick.proc import established_peers

LOG = logging.getLogger(__name__)

INTERVAL_S = 1.0
SPEED_SHARE = 0.95  # of the link speed sysfs reports, when uplink_mbit is not set


class ReaderOrder:
    """Readers in the order of their first appearance (pure)."""

    def __init__(self) -> None:
        self.order: list[str] = []

    def update(self, current: Iterable[str]) -> list[str]:
        """Keep the known readers still present in their order, append the new ones in
        the order given; returns the order."""
        now = list(dict.fromkeys(current))
        present = set(now)
        self.order = [r for r in self.order if r in present]
        known = set(self.order)
        self.order += [r for r in now if r not in known]
        return list(self.order)


def tgt_readers(tgt: Any) -> list[str]:
    """The initiator addresses of every target of ``tgt`` (a ``brick.tgt.TgtAdm``), the
    oldest session first (tgtd numbers its I_T nexuses as they log in)."""
    connections = [c for t in tgt.targets() for c in t.connections]
    return [c.address for c in sorted(connections, key=lambda c: c.nexus)]


def node_readers(tgt: Any, ports: Sequence[int], local: Iterable[str]) -> list[str]:
    """This node's readers now: tgtd's initiators, then the peers established on each of
    ``ports``; loopback addresses and the node's own (``local``) left out, since their reads
    never cross the uplink. A reader may appear more than once (:class:`ReaderOrder` keeps
    its first place)."""
    found = tgt_readers(tgt)
    for port in ports:
        found += established_peers(port)
    mine = {uplink.reader_address(a) for a in local}
    kept = []
    for text in found:
        try:
            address = uplink.reader_address(text)
        except ValueError:
            LOG.warning("uplink priority: reader address %r skipped", text)
            continue
        if not address.is_loopback and address not in mine:
            kept.append(str(address))
    return kept


class UplinkWatch:
    """Polls ``readers`` and applies their order of arrival to ``link``."""

    def __init__(
        self,
        link: uplink.Uplink,
        readers: Callable[[], list[str]],
        *,
        interval_s: float = INTERVAL_S,
    ) -> None:
        self.link = link
        self.readers = readers
        self.order = ReaderOrder()
        self._rounds = Periodic("uplink-watch", interval_s, self.poll)

    def start(self) -> UplinkWatch:
        """Adopt our qdisc if the device's root carries it (a previous run's), apply the
        readers once, then poll."""
        if self.link.adopt():
            self.order.order = [str(a) for a in self.link.readers]
        self.poll()
        self._rounds.start()
        return self

    def stop(self) -> None:
        """Stop polling and remove our qdisc (the device's default comes back)."""
        self._rounds.stop()
        try:
            self.link.remove()
        except Exception as exc:  # shutdown goes on: the next start adopts and fixes it
            LOG.warning("uplink priority: could not remove the qdisc: %s", exc)

    def poll(self) -> int:
        """One round; returns the tc commands it ran."""
        return self.link.apply(self.order.update(self.readers()))


def link_rate(device: str, mbit: int) -> int:
    """``mbit`` if set (> 0), else 95 % of the speed sysfs reports for ``device`` (HTB
    must be the bottleneck, not the NIC's queue, or the order is lost there);
    ``ValueError`` when neither is known."""
    if mbit > 0:
        return mbit
    speed = uplink.link_speed_mbit(device)
    if speed is None:
        raise ValueError(
            f"uplink_priority: the speed of {device} is unknown (a virtual link, or down): "
            "set uplink_mbit"
        )
    return max(1, int(speed * SPEED_SHARE))


def from_conf(conf: Any, host_ip: str, tgt: Any, ports: Sequence[int]) -> UplinkWatch | None:
    """The watch ``uplink_priority`` asks for (None when off); ``ValueError`` naming the
    option when the device, its rate or the floor cannot be used."""
    if not conf.uplink_priority:
        return None
    try:
        device = uplink.validate_device(conf.uplink_device or uplink.device_of(host_ip))
    except BrickError as exc:
        raise ValueError(f"uplink_priority: {exc} (set uplink_device)") from None
    rate = link_rate(device, conf.uplink_mbit)
    try:
        link = uplink.Uplink(device, rate, conf.uplink_floor_kbit or None)
    except BrickError as exc:
        raise ValueError(f"uplink_priority: {exc} (uplink_mbit, uplink_floor_kbit)") from None
    local = [str(uplink.reader_address(host_ip))]
    LOG.info(
        "uplink priority: %s at %d Mbit/s, floor %d kbit/s",
        device, rate, link.floor_kbit,
    )  # fmt: skip
    return UplinkWatch(link, lambda: node_readers(tgt, tuple(ports), local))
