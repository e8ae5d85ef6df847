"""brick.netns: names, subnets, addresses and the /proc scan, without creating anything."""

import ipaddress
import os
from pathlib import Path

import pytest

from brick.exception import InvalidArgument
from brick.netns import (
    IFNAMSIZ,
    Lab,
    host_address,
    host_netns,
    nsenter_argv,
    pids_in_netns,
    switch_netns,
    validate_host_name,
    validate_lab_name,
    validate_subnet,
    veth_name,
)


@pytest.mark.parametrize("name", ["a", "vmt", "lab-1", "a0123456789", "x-"])
def test_valid_names(name: str) -> None:
    assert validate_lab_name(name) == name
    assert validate_host_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "A", "1lab", "-a", "a_b", "a.b", "ab cd", "a01234567890", "é", None, 3]
)
def test_invalid_names(name: object) -> None:
    with pytest.raises(InvalidArgument):
        validate_lab_name(name)
    with pytest.raises(InvalidArgument):
        validate_host_name(name)


def test_sw_is_reserved_for_the_switch() -> None:
    assert validate_lab_name("sw") == "sw"
    with pytest.raises(InvalidArgument, match="reserved"):
        validate_host_name("sw")


def test_namespace_names() -> None:
    assert switch_netns("vmt") == "vmt-sw"
    assert host_netns("vmt", "n1") == "vmt-n1"
    assert nsenter_argv("vmt-n1") == ["nsenter", "--net=/var/run/netns/vmt-n1"]


@pytest.mark.parametrize(
    "subnet", ["10.231.0.0/24", "10.0.0.0/8", "172.16.5.0/28", "172.31.0.0/16", "192.168.7.0/24"]
)
def test_valid_subnets(subnet: str) -> None:
    assert validate_subnet(subnet) == ipaddress.IPv4Network(subnet)


@pytest.mark.parametrize(
    ("subnet", "why"),
    [
        ("8.8.8.0/24", "private"),
        ("172.32.0.0/24", "private"),
        ("100.64.0.0/24", "private"),  # carrier-grade NAT, not RFC 1918
        ("127.0.0.0/24", "private"),
        ("0.0.0.0/0", "private"),
        ("10.0.0.0/7", "private"),
        ("10.231.0.0/29", "/28"),
        ("10.231.0.0/32", "/28"),
        ("10.231.0.1/24", "IPv4 network"),  # host bits set
        ("10.231.0.0", "prefix"),
        ("fd00::/64", "IPv4 network"),
        ("10.231.0.0/33", "IPv4 network"),
        ("nonsense", "IPv4 network"),
    ],
)
def test_invalid_subnets(subnet: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why):
        validate_subnet(subnet)


def test_subnet_must_be_a_string() -> None:
    with pytest.raises(InvalidArgument):
        validate_subnet(ipaddress.IPv4Network("10.0.0.0/24"))


def test_host_addresses_skip_network_and_broadcast() -> None:
    net = ipaddress.IPv4Network("10.231.0.0/28")
    addresses = [str(host_address(net, i)) for i in range(14)]
    assert addresses[0] == "10.231.0.1"
    assert addresses[-1] == "10.231.0.14"
    with pytest.raises(InvalidArgument, match="no address left"):
        host_address(net, 14)
    with pytest.raises(InvalidArgument):
        host_address(net, -1)


def test_veth_names_are_short_deterministic_and_per_lab() -> None:
    assert veth_name("vmt", 0) == veth_name("vmt", 0)
    assert veth_name("vmt", 0) != veth_name("vmt", 1)
    assert veth_name("vmt", 0) != veth_name("vmu", 0)
    name = veth_name("a0123456789", 65533)  # the largest index a /16 allows
    assert len(name) <= IFNAMSIZ
    assert name.startswith("v") and name.endswith("65533")
    assert len(veth_name("vmt", 3)) == 6  # v + 4 hex + index


def test_lab_constructor_only_validates(tmp_path: Path) -> None:
    lab = Lab("vmt", "10.231.0.0/24", state_dir=tmp_path / "state")
    assert lab.switch_netns == "vmt-sw"
    assert not (tmp_path / "state").exists()
    lab.close()  # nothing was created: a no-op
    with pytest.raises(InvalidArgument):
        Lab("Bad", state_dir=tmp_path)
    with pytest.raises(InvalidArgument):
        Lab("ok", "8.8.8.0/24", state_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cleanup_without_a_state_file_is_a_no_op(tmp_path: Path) -> None:
    assert Lab.cleanup("vmt", tmp_path) is False


def test_pids_in_netns_reads_the_ns_links(tmp_path: Path) -> None:
    def proc(pid: str, link: str | None) -> None:
        (tmp_path / pid / "ns").mkdir(parents=True)
        if link is not None:
            os.symlink(link, tmp_path / pid / "ns" / "net")

    proc("10", "net:[4026532100]")
    proc("11", "net:[4026531840]")
    proc("12", None)  # a zombie: no readable link
    proc("13", "net:[4026532100]")
    proc(str(os.getpid()), "net:[4026532100]")  # never the caller itself
    (tmp_path / "self").mkdir()
    assert sorted(pids_in_netns(4026532100, proc=tmp_path)) == [10, 13]
    assert pids_in_netns(1, proc=tmp_path) == []
