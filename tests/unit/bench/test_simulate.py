"""Behaviour of the burst simulation (bench/simulate.py) on small, fast settings."""

import json
import math
import random
import re
from dataclasses import replace

import pytest

from bench import simulate as sim
from bench.simulate import MIB, Params, simulate, single_vm_s
from volt.topology import OK, Tree
from volt.topology.btree import BtreeExecutor

# A short boot keeps every run well under a second; the behaviours do not depend on it.
FAST = Params(boot_read_mib=16, chunk_mib=1, boot_cpu_s=2.0, image_gib=0.25, heartbeat_s=4.0)
BOOT = 16 * MIB
ON_DEMAND = ("balanced", "btree", "direct", "balanced+wake", "balanced+wake+stripe",
             "balanced+wake+exchange", "balanced+wake+priority")  # fmt: skip


def bytes_per_s(mbps: float) -> float:
    return mbps * 1e6 / 8


def test_single_vm_time_is_build_plus_reads_plus_cpu():
    p = FAST
    chunk = BOOT / 16
    requests = math.ceil(chunk / (p.request_kib * 1024))
    per_chunk = requests * (p.hop_latency_ms + p.service_ms) / 1e3 + chunk / bytes_per_s(1000)
    build = p.stack_build_s * (1 + random.Random(p.seed).uniform(-p.stack_jitter, p.stack_jitter))
    assert single_vm_s(p) == pytest.approx(build + 16 * per_chunk + p.boot_cpu_s, rel=1e-9)


def test_one_node_every_variant_equals_the_single_vm_time():
    single, single_pf = single_vm_s(FAST), single_vm_s(FAST, prefetch=True)
    assert single_pf < single  # prefetch overlaps the reads with the guest's CPU time
    for spec in ON_DEMAND:
        assert simulate(FAST, spec, 1).max_s == pytest.approx(single, rel=1e-9), spec
    for spec in ("balanced+prefetch", "btree+prefetch", "balanced+wake+prefetch"):
        assert simulate(FAST, spec, 1).max_s == pytest.approx(single_pf, rel=1e-9), spec


def test_one_node_full_copy_is_the_copy_then_a_local_boot():
    p = FAST
    result = simulate(p, "fullcopy", 1)
    build = p.stack_build_s * (1 + random.Random(p.seed).uniform(-p.stack_jitter, p.stack_jitter))
    copy = (p.hop_latency_ms + p.service_ms) / 1e3 + p.image_gib * (1 << 30) / bytes_per_s(1000)
    local = 16 * (BOOT / 16) / bytes_per_s(p.local_read_mbps)
    assert result.max_s == pytest.approx(copy + build + local + p.boot_cpu_s, rel=1e-9)
    assert result.local_bytes == pytest.approx(BOOT)


@pytest.mark.parametrize("nodes", [1, 7, 40])
def test_direct_image_server_egress_is_n_boot_sets(nodes):
    result = simulate(FAST, "direct", nodes)
    assert result.server_bytes == pytest.approx(nodes * BOOT, rel=1e-9)
    assert result.peer_bytes == 0


def test_every_node_fetches_its_boot_set_once_even_across_switches():
    specs = ("balanced", "balanced+wake", "btree", "balanced+wake+prefetch",
             "balanced+wake+stripe", "balanced+wake+prefetch+stripe", "balanced+wake+exchange",
             "balanced+wake+prefetch+exchange", "balanced+wake+priority",
             "balanced+wake+prefetch+priority", "btree+priority")  # fmt: skip
    for spec in specs:
        result = simulate(FAST, spec, 60)
        total = result.server_bytes + result.peer_bytes
        assert total == pytest.approx(60 * BOOT, rel=1e-6), spec


def test_tree_image_server_egress_is_bounded_and_flat_as_n_grows():
    # The real boot set (the bound compares it with what the server sends while followers
    # switch to their parents), in coarse chunks.
    p = replace(FAST, boot_read_mib=200, chunk_mib=8, boot_cpu_s=4.0)
    boot, top = 200 * MIB, p.fanout  # top: nodes directly under the image server
    scales = (5, 50, 400)
    for nodes in scales:
        # btree: only the top-level nodes ever read from the image server.
        assert simulate(p, "btree", nodes).server_bytes == pytest.approx(top * boot)
        # balanced: the register answer moves every node to its (ready) tree parent before
        # its VM reads anything, so again only the top-level nodes read from the server.
        for spec in ("balanced", "balanced+wake"):
            assert simulate(p, spec, nodes).server_bytes == pytest.approx(top * boot), spec
    # Before issue 15 (a query placed the node, the register answer carried no parents):
    p = replace(p, register_without_parents=True, query_before_register=True)
    woken = [simulate(p, "balanced+wake", n).server_bytes for n in scales]
    assert max(woken) <= (top + 1) * boot
    assert woken[-1] <= 1.5 * woken[1]
    # virtman followed a pending parent only from its next heartbeat: the burst read
    # from the image server for up to one heartbeat period, whatever N (still flat).
    window = p.heartbeat_s + 2 * p.follow_s + 1.0
    plain = [simulate(p, "balanced", n).server_bytes for n in scales]
    assert max(plain) <= top * boot + bytes_per_s(p.server_mbps) * window
    assert plain[-1] <= 1.5 * plain[1]
    assert min(plain) > max(woken)


@pytest.mark.parametrize("fanout", [2, 3, 4])
def test_balanced_tree_depth_is_logarithmic(fanout):
    tiny = replace(FAST, boot_read_mib=2, boot_cpu_s=0.2, fanout=fanout)
    for nodes in (1, 2, 5, 30, 200, 1000):
        depth = simulate(tiny, "balanced", nodes).depth
        assert depth <= math.ceil(math.log(nodes, fanout) - 1e-9) + 1, (fanout, nodes, depth)


def test_btree_is_slower_than_balanced_for_a_burst():
    """With a query before the registration: placed by its registration, a btree node has
    a ready node to go under (the ones before registered as they were placed)."""
    before = replace(FAST, query_before_register=True)
    btree = simulate(before, "btree", 60)
    for spec in ("balanced", "balanced+wake"):
        balanced = simulate(before, spec, 60)
        assert btree.p99_s > balanced.p99_s and btree.max_s > balanced.max_s, spec
    assert btree.depth > 1 and btree.server_readers == FAST.fanout


@pytest.mark.parametrize(
    "spec", ["balanced", "btree", "direct", "fullcopy", "balanced+wake", "btree+prefetch"]
)
def test_doubling_bandwidth_does_not_slow_anything(spec):
    fast = replace(FAST, node_mbps=2000, server_mbps=2000)
    for nodes in (1, 30):
        base, doubled = simulate(FAST, spec, nodes), simulate(fast, spec, nodes)
        for figure in ("p50_s", "p99_s", "max_s", "mean_s"):
            assert getattr(doubled, figure) <= getattr(base, figure) + 1e-9, (nodes, figure)


def late_node_read_s(spec: str) -> float:
    """Seven nodes; the last starts once the others have booted, under two ready parents
    that hold the whole boot set: its time from registration to boot, less the guest's CPU."""
    run = sim.Sim(FAST, spec, 7)
    run.start[6] = 100.0
    run.run()
    return run.booted_t[6] - run.vm_start[6] - FAST.boot_cpu_s


def test_a_striped_node_splits_each_chunk_over_both_parents_within_its_downlink():
    """+stripe (dm multibus): each 1 MiB chunk is two 512 KiB parts, one per parent, in
    parallel: half the requests in series, but the parts share the reader's one downlink,
    so the bytes take as long as from one parent."""
    requests = math.ceil(MIB / (FAST.request_kib * 1024))  # per chunk
    per_request = (FAST.hop_latency_ms + FAST.service_ms) / 1e3
    transfer = MIB / bytes_per_s(FAST.node_mbps)
    one = late_node_read_s("balanced+wake")
    assert one == pytest.approx(16 * (requests * per_request + transfer), rel=1e-6)
    striped = late_node_read_s("balanced+wake+stripe")
    assert striped == pytest.approx(16 * (requests // 2 * per_request + transfer), rel=1e-6)


def test_sibling_exchange_makes_leaves_upload_and_halves_the_image_servers_egress():
    """+exchange: siblings read the chunks of their own slot's class from the parent and
    the others from each other, so a leaf's uplink carries data and the image server sends
    each chunk once to the top level (fan-out 2), not once per top-level node."""
    plain, exchange = (
        sim.Sim(FAST, "balanced+wake", 30),
        sim.Sim(FAST, "balanced+wake+exchange", 30),
    )
    for run in (plain, exchange):
        run.run()
    leaves = [v for v in range(30) if not plain.tnode[v].child_nodes()]
    assert leaves and all(plain.sent[v] == 0 for v in leaves)
    leaves = [v for v in range(30) if not exchange.tnode[v].child_nodes()]
    assert leaves and all(exchange.sent[v] > 0 for v in leaves)
    assert plain.sent[plain.root] == pytest.approx(FAST.fanout * BOOT)
    # (a node reads from the image server until its next heartbeat names its sibling)
    assert exchange.sent[exchange.root] < 1.3 * BOOT
    with pytest.raises(ValueError, match="pick one"):
        sim.Sim(replace(FAST, stripe=True), "balanced+exchange", 3)


def test_deterministic_for_a_fixed_seed():
    first, again = simulate(FAST, "balanced", 50), simulate(FAST, "balanced", 50)
    assert first.boot_times == again.boot_times
    assert (first.server_bytes, first.peer_bytes, first.events) == (
        again.server_bytes,
        again.peer_bytes,
        again.events,
    )
    other = simulate(replace(FAST, seed=2), "balanced", 50)
    assert other.boot_times != first.boot_times


def test_indexed_btree_places_exactly_like_the_real_executor():
    rng = random.Random(7)
    real, fast = BtreeExecutor(), sim.IndexedBtree()
    trees = Tree("v", 2), Tree("v", 2)
    pending: list[str] = []
    for i in range(400):
        if pending and rng.random() < 0.5:
            peer = pending.pop(rng.randrange(len(pending)))
            for executor, tree in zip((real, fast), trees, strict=True):
                tree.set_status(tree.nodes[peer], OK)
                executor.registered(tree, tree.nodes[peer])
        else:
            pairs = zip((real, fast), trees, strict=True)
            placed = [ex.join(tree, str(i), str(i)) for ex, tree in pairs]
            assert (placed[0] is None) == (placed[1] is None)
            if placed[0] is not None:
                pending.append(str(i))
        shapes = [
            {p: (n.parent.peer_id, n.slot, n.status) for p, n in tree.nodes.items()}
            for tree in trees
        ]
        assert shapes[0] == shapes[1]
    assert len(trees[0]) > 100


def run_uplink(capacity, conn_cap, transfers, cancel_at=None):
    """Drive one Uplink alone: transfers = [(dest, size)] at t=0; returns finish times."""
    host = sim.Sim(FAST, "direct", 1)
    link = sim.Uplink(host, host.root, capacity, conn_cap)  # counted as image-server bytes
    done = {}
    for dest, size in transfers:
        link.add(dest, size, lambda d, _: done.setdefault(d, host.now), dest, None)
    cancelled = []
    if cancel_at is not None:
        host.at(cancel_at[0], lambda d, _: cancelled.extend(link.cancel(d)), cancel_at[1], None)
    while host.q:
        t, _, fn, a, b = sim.heapq.heappop(host.q)
        host.now = t
        fn(a, b)
    return done, cancelled, host


def test_uplink_shares_fairly_and_caps_each_connection():
    done, _, _ = run_uplink(100.0, 80.0, [("a", 100.0), ("b", 100.0)])
    assert done == {"a": pytest.approx(2.0), "b": pytest.approx(2.0)}
    done, _, _ = run_uplink(100.0, 80.0, [("a", 100.0)])
    assert done["a"] == pytest.approx(1.25)  # the receiver's downlink caps a lone connection
    done, _, host = run_uplink(100.0, 100.0, [("a", 100.0), ("a", 100.0), ("b", 300.0)])
    assert done["b"] == pytest.approx(5.0)  # a's two requests in order, sharing with b
    assert host.server_bytes == pytest.approx(500.0)


def test_uplink_cancel_returns_what_was_not_sent():
    done, cancelled, host = run_uplink(100.0, 100.0, [("a", 100.0), ("a", 50.0), ("b", 100.0)],
                                       cancel_at=(1.0, "a"))  # fmt: skip
    assert [c[0] for c in cancelled] == [pytest.approx(50.0), pytest.approx(50.0)]
    assert "a" not in done and done["b"] == pytest.approx(1.5)
    assert host.server_bytes == pytest.approx(150.0)


def test_variant_specs():
    assert sim.parse_spec("balanced+prefetch+wake") == (
        "balanced", True, True, False, False, False
    )  # fmt: skip
    assert sim.parse_spec("balanced+wake+stripe") == ("balanced", False, True, True, False, False)
    assert sim.parse_spec("btree+priority").priority
    assert sim.spec_name("balanced", prefetch=True, wake=True, stripe=True) == (
        "balanced+wake+prefetch+stripe"
    )
    assert sim.spec_name("balanced", prefetch=False, wake=True, priority=True) == (
        "balanced+wake+priority"
    )
    with pytest.raises(ValueError):
        sim.parse_spec("direct+priority")
    with pytest.raises(ValueError):
        sim.parse_spec("direct+prefetch")
    with pytest.raises(ValueError):
        sim.parse_spec("mesh")
    with pytest.raises(ValueError, match="two ways"):
        sim.parse_spec("balanced+stripe+exchange")
    for args in (["--stripe", "--exchange"], ["--stripe", "--variants", "balanced+exchange"]):
        with pytest.raises(SystemExit, match="pick one"):
            sim.main(["--nodes", "2", *args])


def test_command_line_calibration_and_last_line(tmp_path, capsys):
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"hop_latency_ms": 0.5, "single_vm_boot_s": 4.0,
                                       "boot_read_mib": 16, "unknown": 1}))  # fmt: skip
    out = tmp_path / "results.json"
    args = ["--nodes", "3,6", "--calibration", str(calibration), "--chunk-mib", "1",
            "--heartbeat-s", "4", "--image-gib", "0.25", "--json", str(out)]  # fmt: skip
    assert sim.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(
        r"simulate: nodes 6 balanced p99 [\d.]+ s \([\d.]+x single\), btree p99 [\d.]+ s, "
        r"direct p99 [\d.]+ s, image-server egress \d+ MB vs \d+ MB direct",
        lines[-1],
    )
    text = "\n".join(lines)
    assert "hop_latency_ms = 0.5 (calibration)" in text
    assert "boot_cpu_s" in text and "derived from single_vm_boot_s 4" in text
    assert re.search(r"single VM alone: 4\.00 s .*measured 4\.00 s", text)
    data = json.loads(out.read_text())
    assert data["params"]["hop_latency_ms"] == 0.5
    assert {r["variant"] for r in data["results"]} == set(sim.DEFAULT_SPECS)


def test_the_paced_prefetch_pauses_behind_a_queueing_link_and_never_fetches_twice():
    """As virtman.prefetch.Pacer: a fetch over 2x the node's fastest recent one pauses the
    prefetch; the egress is the same paced or not (it skips chunks cached or in flight)."""
    link_bound = replace(FAST, server_mbps=200.0, prefetch_depth=2, query_before_register=True)
    paced_sim = sim.Sim(link_bound, "balanced+wake+prefetch", 4)
    paced = paced_sim.run()
    assert paced_sim.pf_paused_s > 0  # 4 nodes share the thin link: fetches queued
    unpaced_sim = sim.Sim(replace(link_bound, prefetch_slack=0), "balanced+wake+prefetch", 4)
    unpaced = unpaced_sim.run()
    assert unpaced_sim.pf_paused_s == 0
    assert paced.server_bytes == pytest.approx(unpaced.server_bytes, rel=0.05)
    plain = simulate(link_bound, "balanced+wake", 4)
    assert paced.server_bytes <= plain.server_bytes * 1.05  # at most 5 % over no prefetch
    assert paced.p99_s <= plain.p99_s


def test_profile_splits_the_burst_by_depth_and_volt_request_kind():
    r = simulate(FAST, "balanced", 30)
    assert [row["depth"] for row in r.profile] == [1, 2, 3, 4]
    assert sum(row["nodes"] for row in r.profile) == 30
    for row in r.profile:
        assert row["placed_max"] <= row["registered_max"] <= row["booted_max"]
    assert r.volt_waits["register"][0] == 30 and "query" not in r.volt_waits  # placed so
    before = simulate(replace(FAST, query_before_register=True), "balanced", 30)
    assert before.volt_waits["query"][0] == 30 and before.volt_waits["register"][0] == 30
    assert max(w[2] for w in r.volt_waits.values()) == r.volt_max_wait_s
    text = sim.format_profile(r)
    lines = 2 + len(r.volt_waits) + len(r.profile)
    assert "Volt register" in text and text.count("\n") == lines - 1


def test_place_on_register_halves_volts_requests_and_shortens_the_burst():
    """Issue 15: one Volt request per node (its registration places it)."""
    slow_volt = replace(FAST, volt_service_ms=5.0, heartbeat_s=1000.0)
    now = simulate(slow_volt, "balanced", 200)
    before = simulate(replace(slow_volt, query_before_register=True), "balanced", 200)
    assert now.volt_waits["register"][0] == 200 and "query" not in now.volt_waits
    assert before.volt_waits["query"][0] == 200 and before.volt_waits["register"][0] == 200
    assert now.p99_s < before.p99_s - 0.5
    assert now.server_bytes == pytest.approx(FAST.fanout * BOOT)


def _result(variant: str, nodes: int, p99: float) -> sim.Result:
    return sim.Result(
        variant=variant, nodes=nodes, vms=nodes, p50_s=p99, p99_s=p99, max_s=p99, mean_s=p99,
        server_bytes=0.0, peer_bytes=0.0, local_bytes=0.0, depth=1, server_readers=0,
        volt_requests=0, volt_max_wait_s=0.0, mean_from_vm_start_s=0.0,
        max_from_vm_start_s=0.0, chunk_mib=1.0, events=0, wall_s=0.0, boot_times=[p99],
        profile=[], volt_waits={},
    )  # fmt: skip


def test_issue_15_burst_lines_judge_10000_with_prefetch_and_1000_without():
    results = [
        _result("balanced", 10000, 23.9),
        _result("balanced+prefetch", 10000, 19.6),
        _result("balanced", 1000, 21.3),
        _result("balanced+prefetch", 1000, 17.0),  # not counted: 1,000 is without prefetch
        _result("btree", 1000, 12.0),  # not counted: only the balanced executor
    ]
    assert sim.burst_lines(results) == [
        "target 10000 nodes p99 <= 20 s (prefetch allowed): balanced+prefetch 19.6 s, met",
        "target 1000 nodes p99 <= 20 s (without prefetch): balanced 21.3 s, NOT met",
    ]
    assert sim.burst_lines([_result("balanced", 100, 5.0)]) == []


def run_priority_uplink(capacity, conn_cap, transfers, bands):
    """Drive one PriorityUplink alone: transfers = [(dest, size)] at t=0, ``bands`` maps a
    dest to its band; returns finish times."""
    host = sim.Sim(FAST, "direct", 1)
    link = sim.PriorityUplink(host, host.root, capacity, conn_cap, 3, bands.__getitem__)
    done = {}
    for dest, size in transfers:
        link.add(dest, size, lambda d, _: done.setdefault(d, host.now), dest, None)
    while host.q:
        t, _, fn, a, b = sim.heapq.heappop(host.q)
        host.now = t
        fn(a, b)
    return done, host


def test_priority_uplink_serves_slot_0_first_and_processor_sharing_does_not():
    """Two readers of one chunk: by slot, slot 0 has it after one transfer time d and slot 1
    after 2d; shared, both after 2d."""
    d = 1.0  # 100 bytes at 100 bytes/s
    done, host = run_priority_uplink(100.0, 100.0, [("b", 100.0), ("a", 100.0)], {"a": 0, "b": 1})
    assert done == {"a": pytest.approx(d), "b": pytest.approx(2 * d)}
    assert host.server_bytes == pytest.approx(200.0)
    done, _, _ = run_uplink(100.0, 100.0, [("b", 100.0), ("a", 100.0)])
    assert done == {"a": pytest.approx(2 * d), "b": pytest.approx(2 * d)}
    # Readers in one band share it; a lower band gets what the receivers of the higher
    # ones cannot take (a 100 B/s link, 40 B/s downlinks: a and c share 80, b gets 20).
    done, _ = run_priority_uplink(
        100.0, 40.0, [("a", 40.0), ("c", 40.0), ("b", 40.0)], {"a": 0, "c": 0, "b": 2}
    )
    assert done["a"] == pytest.approx(1.0) and done["c"] == pytest.approx(1.0)
    assert done["b"] == pytest.approx(1.0 + (40.0 - 20.0) / 40.0)


def lock_step(spec: str, **changes) -> tuple[list[float], float]:
    """Two top-level nodes in exact lock step (no build jitter, Volt free): boot times by
    slot, and one transfer time of a chunk."""
    p = replace(FAST, stack_jitter=0.0, volt_service_ms=0.0, **changes)
    run = sim.Sim(p, spec, 2)
    run.run()
    by_slot = sorted(range(2), key=lambda v: run.tnode[v].slot)
    return [run.booted_t[v] for v in by_slot], run.chunk / bytes_per_s(p.node_mbps)


def test_priority_children_collide_once_where_shared_ones_collide_on_every_chunk():
    """+priority: after their first collision the slot-1 node lags one transfer time and
    from then on both read at the full rate; shared, every one of the 16 chunks comes at
    half the rate."""
    single = single_vm_s(replace(FAST, stack_jitter=0.0, volt_service_ms=0.0))
    shared, d = lock_step("balanced+wake")
    assert shared == [pytest.approx(single + 16 * d, abs=1e-6)] * 2
    by_slot, d = lock_step("balanced+wake+priority")
    assert by_slot == [pytest.approx(single, abs=1e-6), pytest.approx(single + d, abs=1e-6)]
    # The image server's link twice a node's: both top-level nodes at full rate anyway.
    doubled, _ = lock_step("balanced+wake", server_mbps=2000.0)
    assert doubled == [pytest.approx(single, abs=1e-6)] * 2


def test_priority_bands_are_the_tree_slots_of_a_servers_children():
    run = sim.Sim(FAST, "balanced+wake+priority", 30)
    run.run()
    root = run.tree.root
    for v in range(30):
        node = run.tnode[v]
        if node.parent is root:
            assert run.band(run.root, v) == node.slot
        else:
            assert run.band(run.root, v) == FAST.fanout  # not a child of the image server
            assert run.band(int(node.parent.peer_id), v) == node.slot
    assert any(isinstance(link, sim.PriorityUplink) for link in run.uplinks.values())


def test_boot_cpu_jitter_scales_each_vms_cpu_time_and_nothing_else():
    f = 0.05
    jittered = replace(FAST, boot_cpu_jitter=f)
    factor = random.Random(f"{FAST.seed}/boot-cpu").uniform(1 - f, 1 + f)
    single = single_vm_s(FAST)
    assert single_vm_s(jittered) == single  # one VM alone is the nominal one
    one = simulate(jittered, "balanced+wake", 1)
    assert one.max_s == pytest.approx(single + (factor - 1) * FAST.boot_cpu_s, rel=1e-9)
    assert one.p99_nominal_s == pytest.approx(single, rel=1e-9)
    runs = [sim.Sim(replace(FAST, boot_cpu_jitter=x), "balanced+wake", 40) for x in (0, f)]
    assert runs[0].build == runs[1].build and runs[0].phase == runs[1].phase
    assert len(set(runs[0].cpu_slices)) == 1 and len(set(runs[1].cpu_slices)) == 40
    assert all(abs(x / runs[0].cpu_slice - 1) <= f for x in runs[1].cpu_slices)
    plain = simulate(FAST, "balanced+wake", 40)
    assert plain.p99_nominal_s == plain.p99_s
    assert simulate(jittered, "balanced+wake", 40).boot_times == (
        simulate(jittered, "balanced+wake", 40).boot_times
    )
    with pytest.raises(ValueError, match="boot_cpu_jitter"):
        sim.Sim(replace(FAST, boot_cpu_jitter=1.0), "balanced", 2)
    with pytest.raises(SystemExit, match="boot-cpu-jitter"):
        sim.main(["--nodes", "2", "--boot-cpu-jitter", "-0.1"])
