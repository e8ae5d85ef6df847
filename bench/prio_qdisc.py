#!/usr/bin/env python3
"""Does a strict-priority band starve the lower one while it is backlogged? (issue 15)

The mechanism ``bench/simulate.py``'s ``+priority`` models: a node's uplink serves its tree
children in strict priority of their slot, a ``prio`` qdisc on the node's link with one
filter per child (destination address). This checks it on a real link, in namespaces this
run creates and removes: a private bridge (``brick.netns.Lab``) with a parent ``p`` and two
children ``c0`` and ``c1``. In ``prio`` mode the parent's egress is an ``htb`` qdisc shaped
to ``--mbit`` with one leaf class per child, chosen by a u32 filter on the destination
address (anything else: a third leaf), each leaf assured ``--floor-kbit`` and allowed the
whole link, with ``prio`` 0, 1 and 2: HTB lends the link's spare capacity to the lowest
``prio`` first, so it is strict priority above the floors. (This kernel has no ``prio``
qdisc, ``CONFIG_NET_SCH_PRIO`` is not set, nor ``ets``; on a real NIC a root ``prio``
qdisc with the same filters does it, the NIC's queue giving the backpressure.) Two TCP
streams leave the parent, one to each child: c0's for the first ``--high-s`` seconds, c1's
for ``--seconds``. Each child counts what it receives per 100 ms. Then the same with the
``tbf`` at ``--mbit`` (``fifo`` mode: one FIFO, the streams share it). Printed per mode:
each child's rate while both send and c1's once c0's stream has stopped, and the bytes each
class sent (``tc -s class``). Last line::

    prio_qdisc: prio both sending c0 <x> c1 <y> Mbit/s, c1 alone <z>; fifo both sending ...

Needs root (namespaces, tc). All traffic stays inside the lab's namespaces; nothing is
added to the root namespace. ``--lab``/``--subnet``: the lab's name and subnet.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brick.executor import execute
from brick.netns import HOST_IFNAME, Host, Lab
from brick.wait import wait_until

BUCKET_S = 0.1
PORT = 5201
CHUNK = 64 * 1024
MODES = ("prio", "fifo")
LAB_STATE = Path("/run/vmt-bench-labs")
CLASS_SENT = re.compile(r"^class htb (\d+:\d+) .*\n\s*Sent (\d+) bytes", re.MULTILINE)


# -- the two ends (run inside a namespace) ---------------------------------------------------
def receive(bind: str, port: int, ready: Path, out: Path, timeout_s: float) -> None:
    """Accept one connection, count its bytes per ``BUCKET_S`` of the shared monotonic
    clock until it closes, write {bucket index: bytes} to ``out``."""
    with socket.create_server((bind, port)) as server:
        server.settimeout(timeout_s)
        ready.write_text("listening")
        conn, _ = server.accept()
        buckets: dict[int, int] = {}
        with conn:
            conn.settimeout(timeout_s)
            while data := conn.recv(1 << 20):
                key = math.floor(time.monotonic() / BUCKET_S)
                buckets[key] = buckets.get(key, 0) + len(data)
    out.write_text(json.dumps(buckets))


def send(to: str, port: int, seconds: float) -> None:
    """Send as fast as the link takes for ``seconds``, then close."""
    payload = b"\0" * CHUNK
    with socket.create_connection((to, port), timeout=5.0) as conn:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            conn.sendall(payload)


# -- the orchestration (root namespace: it only runs commands in the lab's namespaces) -------
def configure(parent: Host, mode: str, mbit: int, floor_kbit: int, children: list[Host]) -> None:
    """The parent's egress: in ``prio`` mode htb at ``mbit`` with child i in leaf 1:(i+1)0 of
    ``prio`` i (the rest in the last leaf); in ``fifo`` mode tbf at ``mbit``."""
    tc = ["tc", "-n", parent.netns]
    dev = ["dev", HOST_IFNAME]
    execute([*tc, "qdisc", "del", *dev, "root"], check_exit_code=(0, 2))
    if mode == "fifo":
        tbf = ["tbf", "rate", f"{mbit}mbit", "burst", "32kb", "latency", "200ms"]
        execute([*tc, "qdisc", "add", *dev, "root", "handle", "1:", *tbf])
        return
    last = len(children) + 1
    execute([*tc, "qdisc", "add", *dev, "root", "handle", "1:", "htb", "default", f"{last}0"])
    link = [f"{mbit}mbit"]
    execute([*tc, "class", "add", *dev, "parent", "1:", "classid", "1:1", "htb", "rate", *link,
             "ceil", *link])  # fmt: skip
    for band in range(last):
        execute([*tc, "class", "add", *dev, "parent", "1:1", "classid", f"1:{band + 1}0", "htb",
                 "rate", f"{floor_kbit}kbit", "ceil", *link, "prio", str(band)])  # fmt: skip
    for band, child in enumerate(children):
        execute([*tc, "filter", "add", *dev, "parent", "1:", "protocol", "ip", "prio", "1",
                 "u32", "match", "ip", "dst", f"{child.address}/32",
                 "flowid", f"1:{band + 1}0"])  # fmt: skip


def band_bytes(parent: Host) -> dict[str, int]:
    """Bytes sent per leaf class of the parent's htb (``tc -s class show``: each class line
    ``class htb <handle> ...`` is followed by ``Sent <n> bytes ...``)."""
    out = execute(["tc", "-n", parent.netns, "-s", "class", "show", "dev", HOST_IFNAME])
    sent = {}
    for handle, count in CLASS_SENT.findall(out.stdout):
        if handle != "1:1":
            sent[handle] = int(count)
    return sent


def rate_mbit(buckets: dict[int, int], start: float, end: float) -> float:
    """Mbit/s received in the whole buckets between monotonic times ``start`` and ``end``."""
    first, last = math.ceil(start / BUCKET_S), math.floor(end / BUCKET_S)
    if last <= first:
        return math.nan
    total = sum(buckets.get(k, 0) for k in range(first, last))
    return total * 8 / ((last - first) * BUCKET_S) / 1e6


def run_mode(lab: Lab, mode: str, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    parent, children = lab.hosts["p"], [lab.hosts["c0"], lab.hosts["c1"]]
    configure(parent, mode, args.mbit, args.floor_kbit, children)
    me = [sys.executable, str(Path(__file__).resolve())]
    outs, receivers = [], []
    for i, child in enumerate(children):
        ready, out = workdir / f"{mode}-c{i}.ready", workdir / f"{mode}-c{i}.json"
        ready.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
        outs.append(out)
        receivers.append(child.spawn([*me, "--role", "recv", "--bind", child.address, "--out",
                                      str(out), "--ready", str(ready), "--seconds",
                                      str(args.seconds)],
                                     workdir / f"{mode}-c{i}.log"))  # fmt: skip
        wait_until(ready.exists, timeout_s=10.0, what=f"receiver in {child.name} listening")
    durations = (args.high_s, args.seconds)
    senders = []
    for i, (child, seconds) in enumerate(zip(children, durations, strict=True)):
        argv = [*me, "--role", "send", "--to", child.address, "--seconds", str(seconds)]
        senders.append(parent.spawn(argv, workdir / f"{mode}-send{i}.log"))
    for proc in senders + receivers:
        if proc.wait(timeout=args.seconds + 20) != 0:
            raise SystemExit(f"{mode}: a sender or receiver failed (logs in {workdir})")
    c0, c1 = (
        {int(k): v for k, v in json.loads(out.read_text()).items()} for out in outs
    )  # fmt: skip
    # The windows from what arrived (the senders start when their interpreter has): both
    # streams running, past their slow start; then c1 alone once c0's stream has ended.
    c0_from, c0_to = min(c0) * BUCKET_S, (max(c0) + 1) * BUCKET_S
    c1_from, c1_to = min(c1) * BUCKET_S, (max(c1) + 1) * BUCKET_S
    both = (max(c0_from, c1_from) + 0.5, c0_to - 0.2)
    alone = (c0_to + 0.3, c1_to - 0.2)
    figures = {
        "c0_both": rate_mbit(c0, *both),
        "c1_both": rate_mbit(c1, *both),
        "c1_alone": rate_mbit(c1, *alone),
    }
    for handle, sent in sorted(band_bytes(parent).items()):
        figures[f"class {handle} bytes"] = sent
    print(f"{mode}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in figures.items()), flush=True)  # fmt: skip
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lab", default="vmtp", help="lab name (namespaces <lab>-*)")
    parser.add_argument("--subnet", default="10.243.0.0/24", help="the lab's private subnet")
    parser.add_argument("--mbit", type=int, default=200, help="the parent's shaped uplink")
    parser.add_argument("--floor-kbit", type=int, default=1000,
                        help="prio mode: each class's assured rate")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=8.0, help="c1's stream, s")
    parser.add_argument("--high-s", type=float, default=5.0, help="c0's stream, s")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/vmt-prio-qdisc"))
    parser.add_argument("--role", choices=["recv", "send"], help=argparse.SUPPRESS)
    parser.add_argument("--bind", help=argparse.SUPPRESS)
    parser.add_argument("--to", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ready", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "recv":
        receive(args.bind, PORT, args.ready, args.out, timeout_s=args.seconds + 15)
        return 0
    if args.role == "send":
        send(args.to, PORT, args.seconds)
        return 0
    if not 1 <= args.mbit <= 10000:
        raise SystemExit("--mbit must be in 1..10000")
    if not 1 <= args.floor_kbit <= args.mbit * 1000 // 10:
        raise SystemExit("--floor-kbit must be >= 1 and at most a tenth of --mbit")
    if not 1.0 <= args.high_s <= args.seconds - 1.0:
        raise SystemExit("--high-s must be >= 1 and at least 1 s below --seconds")
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    with Lab(args.lab, args.subnet, state_dir=LAB_STATE) as lab:
        for name in ("p", "c0", "c1"):
            lab.add_host(name)
        for mode in MODES:
            results[mode] = run_mode(lab, mode, args, args.workdir)
    print("prio_qdisc: " + "; ".join(
        f"{mode} both sending c0 {r['c0_both']:.1f} c1 {r['c1_both']:.1f} Mbit/s, c1 alone "
        f"{r['c1_alone']:.1f}" for mode, r in results.items()))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
