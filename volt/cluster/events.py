"""What happened to each cluster VM on the way, for ``GET /v1/clusters/{task}``.

Two sources write here: the controller (``dispatch``: each guest verb that was answered,
``detail`` the transport, "bus" or "xmlrpc") and the nodes (their ``vmthunder.guest.*``
notifications over the control bus: a verb started, done or failed on the node). Events
are advisory: a VM's status moves only on the answers of the controller's own calls.
A node's event counts only for a VM the controller placed on that node. At most
``KEEP`` events are kept per VM (the oldest go).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa

from brick import bus
from volt.store import Store, cluster_events

KEEP = 50
DISPATCH = "dispatch"
CONTROLLER = "controller"
STEP_RE = re.compile(r"[a-z_]{1,40}")
USERID_RE = re.compile(r"[A-Z0-9]{1,8}")
MAX_DETAIL = 500


class Events:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.engine = store.engine
        self.clock = clock

    def dispatched(self, userid: str, step: str, via: str) -> None:
        self._add(userid, CONTROLLER, DISPATCH, step, via)

    def from_node(self, source: str, userid: str, event_type: str, payload: dict[str, Any]) -> bool:
        """Record a node's notification; False (nothing recorded) if it is not one of
        ours: unknown type, no userid or step of the expected form."""
        step, state = payload.get("step"), payload.get("state")
        if event_type not in bus.GUEST_EVENTS or not USERID_RE.fullmatch(userid):
            return False
        if not isinstance(step, str) or not STEP_RE.fullmatch(step):
            return False
        if event_type == bus.EVENT_GUEST_FAILED:
            detail = f"failed: {payload.get('error')}"
        elif state in ("started", "done"):
            detail = state
        else:
            return False
        self._add(userid, source, event_type.rpartition(".")[2], step, detail)
        return True

    def _add(self, userid: str, source: str, event: str, step: str, detail: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                cluster_events.insert().values(
                    userid=userid,
                    at=self.clock(),
                    source=source[:80],
                    event=event,
                    step=step,
                    detail=detail[:MAX_DETAIL],
                )
            )
            old = (
                sa.select(cluster_events.c.seq)
                .where(cluster_events.c.userid == userid)
                .order_by(cluster_events.c.seq.desc())
                .offset(KEEP)
            )
            conn.execute(cluster_events.delete().where(cluster_events.c.seq.in_(old)))

    def of(self, userids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        """Each VM's events, oldest first."""
        wanted = list(userids)
        found: dict[str, list[dict[str, Any]]] = {u: [] for u in wanted}
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(cluster_events)
                .where(cluster_events.c.userid.in_(wanted))
                .order_by(cluster_events.c.seq)
            )
            for r in rows:
                found[r.userid].append(
                    {
                        "at": round(r.at, 3),
                        "source": r.source,
                        "event": r.event,
                        "step": r.step,
                        "detail": r.detail,
                    }
                )
        return found


def dispatch_counts(events: list[dict[str, Any]]) -> dict[str, int]:
    """How many of a VM's verbs were answered over each transport."""
    counts = Counter(e["detail"] for e in events if e["event"] == DISPATCH)
    return {"bus": counts["bus"], "xmlrpc": counts["xmlrpc"]}
