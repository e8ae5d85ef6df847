"""brick.qsd's pure parts: argument validation and log masking (no daemon needed)."""

import pytest

from brick.exception import InvalidArgument
from brick.qsd.daemon import (
    validate_abs_path,
    validate_host,
    validate_iqn,
    validate_node_name,
    validate_portal,
)
from brick.qsd.mounts import _unescape_mount_field
from brick.qsd.qmp import QMPError, masked


@pytest.mark.parametrize("name", ["a", "cache0", "multipath_image-1", "A" + "b" * 30])
def test_good_node_names(name: str) -> None:
    assert validate_node_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "0abc", "_x", "a.b", "a b", "#block1", "a" * 32, None, 5, "é"]
)
def test_bad_node_names(name: object) -> None:
    with pytest.raises(InvalidArgument):
        validate_node_name(name)


@pytest.mark.parametrize(
    ("portal", "canonical"),
    [
        ("127.0.0.1:3260", "127.0.0.1:3260"),
        ("[::1]:3260", "[::1]:3260"),
        ("[0:0::1]:860", "[::1]:860"),
        ("image-server.example:3260", "image-server.example:3260"),
    ],
)
def test_good_portals(portal: str, canonical: str) -> None:
    assert validate_portal(portal) == canonical


@pytest.mark.parametrize(
    "portal", ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "::1:3260", "[x]:1", "a b:1", ":1"]
)
def test_bad_portals(portal: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_portal(portal)


def test_hosts_paths_and_iqns() -> None:
    assert validate_host("127.0.0.1") == "127.0.0.1"
    assert validate_host("localhost") == "localhost"
    for bad in ("", "-x", "a..b", "x;y", "1.2.3.4:5"):
        with pytest.raises(InvalidArgument):
            validate_host(bad)
    assert validate_abs_path("/a/./b/../c", "p") == "/a/c"
    for bad in ("a/b", "/a,b", "/a\nb", 5):
        with pytest.raises(InvalidArgument):
            validate_abs_path(bad, "p")
    assert validate_iqn("iqn.2010-10.org.openstack:volume-1")
    for bad in ("iqn.2010-13.org.x", "iqn.x", "naa.12", ""):
        with pytest.raises(InvalidArgument):
            validate_iqn(bad)


def test_masked_hides_secrets_at_any_depth() -> None:
    arguments = {
        "qom-type": "secret",
        "id": "n-secret",
        "data": "hunter2",
        "nested": [{"password": "p", "user": "u"}],
    }
    shown = masked(arguments)
    assert "hunter2" not in repr(shown) and "'p'" not in repr(shown)
    assert shown["id"] == "n-secret" and shown["nested"][0]["user"] == "u"
    assert arguments["data"] == "hunter2"  # the original is left alone


def test_qmp_error_fields() -> None:
    err = QMPError("blockdev-del", "GenericError", "Block device n0 is in use")
    assert (err.command, err.error_class, err.desc) == (
        "blockdev-del",
        "GenericError",
        "Block device n0 is in use",
    )
    assert str(err) == "QMP blockdev-del failed: GenericError: Block device n0 is in use"


def test_proc_mounts_escapes() -> None:
    assert _unescape_mount_field(r"/tmp/a\040b\011c\134") == "/tmp/a b\tc\\"


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("bad id", "/k"), {"endpoint": "server"}),
        (("psk0", "k"), {"endpoint": "server"}),
        (("psk0", "/k,x"), {"endpoint": "server"}),
        (("psk0", "/k"), {"endpoint": "both"}),
        (("psk0", "/k"), {"endpoint": "server", "username": "vmt"}),
        (("psk0", "/k"), {"endpoint": "client"}),
        (("psk0", "/k"), {"endpoint": "client", "username": "a,b"}),
    ],
)
def test_tls_psk_arguments_are_checked_before_qmp(
    tmp_path, args: tuple[str, str], kwargs: dict[str, str]
) -> None:
    from brick.qsd.daemon import StorageDaemon

    daemon = StorageDaemon("x", tmp_path)  # not started: reaching QMP would raise NotFound
    with pytest.raises(InvalidArgument):
        daemon.add_tls_psk(*args, **kwargs)
    with pytest.raises(InvalidArgument, match="tls_creds"):
        daemon.add_nbd("n0", "127.0.0.1", 10809, "img", tls_creds="bad,creds")
    with pytest.raises(InvalidArgument, match="tls_creds"):
        daemon.start_nbd_server("127.0.0.1", 10809, tls_creds="bad creds")
