"""160 nodes query one image at the same moment (the original's published scale)."""

from __future__ import annotations

import math
import random
import threading

from tests.functional.voltproc import VoltProcess

NODES = 160
IQN = "iqn.2010-10.org.openstack:volume-burst"


def source(i: int) -> str:
    return f"127.0.{1 + i // 200}.{1 + i % 200}"


def burst(volt: VoltProcess, indices: list[int]) -> dict[int, dict]:
    """All ``indices`` query at once, each from its own source address."""
    answers: dict[int, dict] = {}
    barrier = threading.Barrier(len(indices))

    def one(i: int) -> None:
        barrier.wait()
        status, body = volt.request("GET", "/v1/volumes/query/volume-burst", source=source(i))
        assert status == 200, body
        answers[i] = body

    threads = [threading.Thread(target=one, args=(i,)) for i in indices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == len(indices)
    return answers


def register(volt: VoltProcess, i: int) -> None:
    body = {"host": source(i), "port": "3260", "iqn": IQN, "lun": "1"}
    peer = f"{source(i)}:volume-burst"
    assert volt.request("POST", f"/v1/volumes/volume-burst/{peer}", body)[0] == 200


def test_balanced_places_every_node_on_its_first_query(volt: VoltProcess):
    answers = burst(volt, list(range(NODES)))
    assert all(a["peer_id"] == f"{source(i)}:volume-burst" for i, a in answers.items())
    # Nobody is told to read from a node that is not ready; pending tree parents come first.
    for a in answers.values():
        assert all(p["status"] == "pending" for p in a["parents"][:1])
        assert all(p["status"] == "OK" for p in a["parents"][1:])
    status, nodes = volt.request("GET", "/v1/volumes/volume-burst")
    assert status == 200 and len(nodes) == NODES
    depth = max(n["depth"] for n in nodes)
    assert depth <= math.ceil(math.log2(NODES)) + 1
    assert depth == 7  # a complete binary tree of 160 nodes below the image server
    fanout = {}
    for n in nodes:
        fanout[n["parent"]] = fanout.get(n["parent"], 0) + 1
    assert max(fanout.values()) == 2
    # Nodes finish building in any order; a ready node is lifted above pending ancestors,
    # so only the top level ever reads from the image server.
    order = random.Random(5).sample(range(NODES), NODES)
    for i in order[: NODES // 2]:
        register(volt, i)
    status, nodes = volt.request("GET", "/v1/volumes/volume-burst")
    status_of = {n["peer_id"]: n["status"] for n in nodes}
    ready = [n for n in nodes if n["status"] == "OK"]
    assert len(ready) == NODES // 2
    assert all(n["parent"] is None or status_of[n["parent"]] == "OK" for n in ready)
    assert all(n["parents"] and n["parents"][0] == n["parent"] for n in ready if n["parent"])
    # Once everyone registered, each node below the top has two ready parents.
    for i in order[NODES // 2 :]:
        register(volt, i)
    status, nodes = volt.request("GET", "/v1/volumes/volume-burst")
    below_top = [n for n in nodes if n["depth"] > 1]
    assert all(len(n["parents"]) == 2 and n["parents"][0] == n["parent"] for n in below_top)


def test_btree_keeps_the_original_retry_rounds(volt_factory):
    volt = volt_factory(default_executor="btree")
    waiting = list(range(NODES))
    placed_per_round = []
    while waiting:
        answers = burst(volt, waiting)
        placed = [i for i, a in answers.items() if a["peer_id"] is not None]
        for a in answers.values():
            if a["peer_id"] is None:
                assert a == {"peer_id": None, "parents": [{"peer_id": None}]}
            else:
                assert len(a["parents"]) <= 1 and all(p["status"] == "OK" for p in a["parents"])
        placed_per_round.append(len(placed))
        for i in placed:
            register(volt, i)
        waiting = [i for i in waiting if i not in placed]
        assert len(placed_per_round) <= 10
    # One tree level per registration round, exactly as the original grew.
    assert placed_per_round == [2, 4, 8, 16, 32, 64, 34]
