import pytest

from volt import validation
from volt.errors import InvalidInput


@pytest.mark.parametrize(
    ("host", "volume", "peer_id"),
    [
        ("10.0.0.5", "volume-image1", "10.0.0.5:volume-image1"),
        ("fd00::5", "volume-image1", "[fd00::5]:volume-image1"),
        ("10.0.0.5", "volume-a:b", "10.0.0.5:volume-a:b"),
        ("fd00::5", "volume-a:b", "[fd00::5]:volume-a:b"),
        ("node-1.example.org", "img", "node-1.example.org:img"),
    ],
)
def test_peer_id_round_trip(host, volume, peer_id):
    assert validation.make_peer_id(host, volume) == peer_id
    assert validation.split_peer_id(peer_id) == (host, volume)


def test_ipv6_hosts_are_canonical():
    assert validation.host("FD00:0:0::0005") == "fd00::5"
    assert validation.split_peer_id("[fd00:0::5]:v") == ("fd00::5", "v")
    assert validation.host("::ffff:10.0.0.1") == "10.0.0.1"


@pytest.mark.parametrize(
    "bad",
    ["fd00::5:volume", "[10.0.0.1]:v", "10.0.0.1:", ":v", "10.0.0.1", "[fd00::5]v", "a b:v", 5],
)
def test_bad_peer_ids(bad):
    with pytest.raises(InvalidInput) as err:
        validation.split_peer_id(bad)
    assert err.value.field == "peer_id"


@pytest.mark.parametrize(
    "bad", ["", "-x", "a/b", "a b", "a;rm -rf", "x" * 256, "vol\n", "é", None, 3]
)
def test_bad_volume_ids(bad):
    with pytest.raises(InvalidInput, match="volume_id"):
        validation.volume_id(bad)


def test_ports_and_luns_come_back_as_strings():
    assert validation.port("3260") == "3260"
    assert validation.port(3260) == "3260"
    assert validation.lun(0) == "0"
    for bad in ("0", "65536", "-1", "3260 ", "1e3", True, 1.5, "٣"):
        with pytest.raises(InvalidInput, match="'port'"):
            validation.port(bad)


@pytest.mark.parametrize(
    "good",
    [
        "iqn.2010-10.org.openstack:volume-image1",
        "iqn.2003-01.org.linux-iscsi.host:sn.1234",
        "eui.02004567A425678D",
        "naa.52004567BA64678D",
    ],
)
def test_good_iqns(good):
    assert validation.iqn(good) == good


@pytest.mark.parametrize(
    "bad",
    ["iqn.2010-13.org.x:a", "iqn.10-10.org:a", "iqn.2010-10.org.x:a b", "x", "iqn." + "a" * 300],
)
def test_bad_iqns(bad):
    with pytest.raises(InvalidInput, match="'iqn'"):
        validation.iqn(bad)


@pytest.mark.parametrize("bad", ["300.1.1.1", "1.2.3", "a..b", "-a.b", "a_b", "", "[::1"])
def test_bad_hosts(bad):
    with pytest.raises(InvalidInput, match="'host'"):
        validation.host(bad)
