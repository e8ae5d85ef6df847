"""The provisioning benchmark's options, its sweep's simulation rows and plot
(bench/provision.py), without a cluster."""

import json
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench import provision
from bench.boottrace import BootTrace

MB = 1_000_000
# A boot of 2 MiB in 32 reads of 64 KiB over 2 s, from a 64 MiB image.
TRACE = BootTrace(64 << 20, [(i << 16, 1 << 16) for i in range(32)],
                  [i / 16 for i in range(32)], 2.5)  # fmt: skip


def result(variant: str, nodes: int, p99: float) -> provision.Result:
    return provision.Result(variant, nodes, [p99] * nodes, 3 * MB * nodes, 0, 0, 2 * MB * nodes)


def test_links_default_to_rate_mbit_and_are_set_apart():
    args = provision.parse_args(["--rate-mbit", "100"])
    assert (args.server_mbit, args.node_mbit, args.sweep) == (100, 100, False)
    args = provision.parse_args(["--server-mbit", "16", "--node-mbit", "1000"])
    assert (args.server_mbit, args.node_mbit) == (16, 1000)
    with pytest.raises(SystemExit):
        provision.parse_args(["--server-mbit", "0"])


def test_sweep_options():
    args = provision.parse_args(["--sweep-nodes", "16,2,4,8,4", "--server-mbit", "16"])
    assert args.sweep and args.sweep_nodes == [2, 4, 8, 16]
    assert args.sweep_server_mbit == [16] and args.json == Path("provision-sweep.json")
    args = provision.parse_args(["--nodes", "3", "--sweep-server-mbit", "32,8"])
    assert args.sweep_nodes == [3] and args.sweep_server_mbit == [8, 32]
    for bad in (["--sweep-nodes", "0,2"], ["--sweep-nodes", "2,x"], ["--sweep-nodes", "61"]):
        with pytest.raises(SystemExit):
            provision.parse_args(bad)


def test_simulation_matches_the_measured_single_and_splits_direct_from_the_tree():
    params = provision.sim_params(TRACE, 4, 1000, single_s=9.0)
    assert params.server_mbps == 4 and params.node_mbps == 1000
    assert params.boot_read_mib == pytest.approx(2)
    assert params.boot_cpu_s == pytest.approx(31 / 16)
    assert params.stack_build_s > 0  # 9 s is more than the reads and CPU alone
    single = result("single", 1, 9.0)
    points = [
        provision.Point(n, 4, 1000, [single, result("direct", n, 1), result("balanced", n, 1)])
        for n in (1, 8)
    ]
    rows = provision.simulated(TRACE, points, ["direct", "balanced"])
    p99 = {(r["variant"], r["nodes"]): r["p99"] for r in rows}
    assert sorted(p99) == [("balanced", 1), ("balanced", 8), ("direct", 1), ("direct", 8),
                           ("single", 1)]  # fmt: skip
    assert p99["single", 1] == pytest.approx(9.0, rel=0.05)
    # 8 direct readers share the 4 Mbit/s link: >= 8 x 2 MiB of link time
    assert p99["direct", 8] >= 8 * (2 << 20) * 8 / 4e6
    assert p99["balanced", 8] < p99["direct", 8] / 2


def test_plot_writes_a_png(tmp_path: Path):
    single = result("single", 1, 5.0)
    points = [
        provision.Point(n, s, 1000, [single, result("direct", n, 5.0 * n)])
        for s in (8, 16)
        for n in (1, 2, 4)
    ]
    rows = provision.simulated(TRACE, points, ["direct"])
    path = tmp_path / "sweep.png"
    provision.plot(path, points, rows, ["direct"], "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_replot_draws_a_sweep_again_from_its_json(tmp_path: Path):
    single = result("single", 1, 5.0)
    points = [provision.Point(n, 8, 1000, [single, result("full", n, 60.0 * n)]) for n in (1, 2)]
    rows = provision.simulated(TRACE, points, ["full"])
    data = {
        "title": "again",
        "variants": ["single", "full"],
        "points": [p.as_json() for p in points],
        "simulated": rows,
    }
    (tmp_path / "sweep.json").write_text(json.dumps(data))
    png = tmp_path / "again.png"
    argv = ["--replot", "--json", str(tmp_path / "sweep.json"), "--plot", str(png)]
    assert provision.main(argv) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _bench(tmp_path: Path, variants: list[str], full_max_nodes: int = 60) -> Any:
    args = provision.parse_args(
        ["--variants", ",".join(variants), "--full-max-nodes", str(full_max_nodes)]
    )
    return provision.Bench(args)


def test_a_full_copy_that_fails_is_a_row_without_times_and_the_others_still_run(tmp_path: Path):
    bench = _bench(tmp_path, ["full", "direct"])
    ran = []

    def variant(name: str, nodes: list[str]) -> provision.Result:
        ran.append(name)
        if name == "full":
            raise RuntimeError("full: 10 node(s) failed, n3: qemu-img convert: exit 1")
        return result(name, len(nodes), 4.0)

    bench.variant = variant
    full, direct = bench.variants(["n1", "n2"])
    assert ran == ["full", "direct"]
    assert full.times == [] and full.notes == [
        "failed: full: 10 node(s) failed, n3: qemu-img convert: exit 1"
    ]
    assert all(v != v for v in (full.p50, full.p99, full.slowest))  # nan
    assert direct.p99 == 4.0
    line = provision.report([result("single", 1, 2.0), full, direct], TRACE)[2]
    assert line.split()[:5] == ["full", "2", "nan", "nan", "nan"]


def test_any_other_variant_that_fails_ends_the_run(tmp_path: Path):
    bench = _bench(tmp_path, ["direct", "balanced"])

    def variant(name: str, nodes: list[str]) -> provision.Result:
        raise RuntimeError(f"{name}: 1 node(s) failed")  # it may leave a stack or a daemon

    bench.variant = variant
    with pytest.raises(RuntimeError, match="direct: 1 node"):
        bench.variants(["n1"])


def test_full_copy_runs_only_up_to_full_max_nodes(tmp_path: Path):
    bench = _bench(tmp_path, ["full"], full_max_nodes=4)
    bench.variant = lambda name, nodes: result(name, len(nodes), 9.0)
    assert bench.variants(["n1", "n2", "n3", "n4"])[0].p99 == 9.0
    [skipped] = bench.variants([f"n{i}" for i in range(1, 9)])
    assert (skipped.nodes, skipped.times, skipped.notes) == (8, [], ["not run"])


def test_the_sweep_is_written_after_every_point_and_plots_a_failed_variant(tmp_path: Path):
    args = provision.parse_args(
        ["--sweep-nodes", "1,2", "--variants", "full,direct", "--json",
         str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")]
    )  # fmt: skip
    single = result("single", 1, 5.0)
    failed = provision.Result("full", 2, [], 0, 0, 0, 0, notes=["failed: x"])
    points = [provision.Point(1, 16, 1000, [single, result("full", 1, 30), result("direct", 1, 6)])]
    provision.write_sweep(args, TRACE, points, complete=False)
    first = json.loads((tmp_path / "s.json").read_text())
    assert first["complete"] is False and [p["nodes"] for p in first["points"]] == [1]
    points.append(provision.Point(2, 16, 1000, [single, failed, result("direct", 2, 9)]))
    provision.write_sweep(args, TRACE, points, complete=True)
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["complete"] is True and [p["nodes"] for p in data["points"]] == [1, 2]
    assert data["points"][1]["results"][1]["times"] == []
    assert not (tmp_path / "s.json.part").exists()
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_real_boots_options():
    args = provision.parse_args(["--nodes", "4", "--real-boots", "4", "--variants", "balanced"])
    assert args.real_boots == 4 and args.variants == ["balanced"]
    assert provision.parse_args(["--nodes", "4"]).real_boots == 0
    for bad in (
        ["--nodes", "4", "--real-boots", "2"],  # not every node: no replay to compare with
        ["--nodes", "4", "--real-boots", "-1"],
        ["--nodes", "2", "--real-boots", "2", "--variants", "direct"],  # no balanced replay
        ["--sweep-nodes", "2,4", "--real-boots", "4"],
    ):
        with pytest.raises(SystemExit):
            provision.parse_args(bad)


def test_real_boots_errors_name_the_option(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        provision.parse_args(["--nodes", "4", "--real-boots", "3"])
    assert "--real-boots 3: must be 0 or --nodes (4)" in capsys.readouterr().err


def test_the_real_row_is_reported_apart_and_leaves_the_last_line_alone():
    single, balanced = result("single", 1, 9.0), result("balanced", 4, 10.0)
    real = provision.Result("real", 4, [30.0, 31.0, 32.0, 40.0], 4 * MB, 0, 0, 8 * MB)
    without = provision.last_line([single, balanced])
    assert provision.last_line([single, balanced, real]) == without
    lines = provision.report([single, balanced, real], TRACE)
    [row] = [line for line in lines if re.match(r"real +\d", line)]
    assert row.split()[:5] == ["real", "4", "31.5", "39.8", "40.0"]
    assert "4.42" in row.split()  # 39.76 / 9.0 x single
    assert any(line.startswith("real = real VMs") for line in lines)
    assert not any(line.startswith("real = ") for line in provision.report([single], TRACE))


def test_calibration_puts_real_replay_and_simulation_side_by_side():
    single, balanced = result("single", 1, 9.0), result("balanced", 4, 10.0)
    real = provision.Result("real", 4, [40.0] * 4, 4 * MB, 0, 0, 8 * MB)
    assert provision.calibration([single, balanced], TRACE, 1000, 1000) is None
    cal = provision.calibration([single, balanced, real], TRACE, 1000, 1000)
    assert cal is not None
    assert (cal["nodes"], cal["real_p99"], cal["replay_p99"]) == (4, 40.0, 10.0)
    assert cal["real_over_replay"] == pytest.approx(4.0)
    # the simulation is calibrated on the single replay: 4 nodes on 1 Gbit/s take about as long
    assert 9.0 <= cal["simulated_p99"] < 12.0
    assert provision.simulated(
        TRACE, [provision.Point(4, 1000, 1000, [single, balanced])], ["balanced"]
    )[1]["p99"] == pytest.approx(cal["simulated_p99"])
    line = provision.realboot.calibration_line(cal)
    assert re.fullmatch(
        r"provision: calibration nodes 4 real p99 40\.0 s, replay p99 10\.0 s, "
        r"simulated p99 \d+\.\d s",
        line,
    )


class FakeDaemons:
    uri = "qemu:///system"

    def __init__(self, *_args: object, **_kwargs: object) -> None:
        self.running = False

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False


class FakeCluster:
    def rpc(self, node: str, method: str, *args: object) -> str:
        return f"0:/nonexistent/{node}.qcow2"

    def connection(self, volume: str) -> dict[str, str]:
        return {"volume": volume}


def real_boots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[str]]:
    """RealBoots without libvirt: the daemons faked, the domains only recorded."""
    monkeypatch.setattr(provision.realboot, "LibvirtDaemons", FakeDaemons)
    guest = SimpleNamespace(kernel="/k", initrd="/i", cmdline="", marker_matches=lambda _: True)
    real = provision.realboot.RealBoots(FakeCluster(), guest, tmp_path, "t-", timeout_s=30)
    destroyed: list[str] = []
    monkeypatch.setattr(real.vms, "boot", lambda *_args, **_kwargs: None)
    monkeypatch.setattr(real.vms, "destroy", destroyed.append)
    return real, destroyed


def test_a_failed_real_guest_fails_its_boot_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    real, destroyed = real_boots(tmp_path, monkeypatch)
    (tmp_path / "vm-n1.console").write_text("[    1.0] Kernel panic - not syncing: VFS\n")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="the guest failed"):
        real.boot("n1", "vm-n1", "volume-image1", "image1")
    assert time.monotonic() - started < 5  # not the 30 s timeout
    assert real.close() == [] and destroyed == ["vm-n1"] and not real.daemons.running


def test_closing_ends_a_burst_that_waits_for_its_consoles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    real, destroyed = real_boots(tmp_path, monkeypatch)
    outcome: list[BaseException] = []

    def boot() -> None:
        try:
            real.boot("n1", "vm-n1", "volume-image1", "image1")
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=boot)
    waiter.start()
    assert not outcome  # still waiting for a marker that never comes
    started = time.monotonic()
    assert real.close() == []
    waiter.join(timeout=10)
    assert not waiter.is_alive() and time.monotonic() - started < 5
    assert "shutting down" in str(outcome[0]) and destroyed == ["vm-n1"]
