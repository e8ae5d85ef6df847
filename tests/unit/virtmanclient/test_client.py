"""virtmanclient without a server: result strings, listings, connection dicts, endpoints and
the checks run before anything is sent."""

from __future__ import annotations

import re

import pytest

import virtmanclient
from virtmanclient import validation
from virtmanclient.client import (
    Client,
    ImageTarget,
    Instance,
    Result,
    build_connection,
    build_connections,
    check_result,
    normalise_endpoint,
    parse_instance_list,
    parse_result,
    parse_target_list,
)
from virtmanclient.exceptions import (
    AlreadyExists,
    DoesNotExist,
    Failed,
    InvalidResponse,
    ResultError,
    VirtmanError,
)

IQN = "iqn.2010-10.org.openstack:"


# -- parse_result --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "code", "info"),
    [
        ("0:/dev/mapper/snapshot_vm1", 0, "/dev/mapper/snapshot_vm1"),
        ("0:", 0, ""),
        ("0:3:/srv/images/image1.raw", 0, "3:/srv/images/image1.raw"),  # split at the first ':'
        ("1:instance vm1 exists", 1, "instance vm1 exists"),
        ("2:invalid image_name 'a/b'", 2, "invalid image_name 'a/b'"),
        ("7:odd", 7, "odd"),
        (" 2 :spaced", 2, "spaced"),
        ("0: keeps spaces ", 0, " keeps spaces "),
    ],
)
def test_parse_result(raw: str, code: int, info: str) -> None:
    assert parse_result(raw) == Result(code, info)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (None, "expected a result string '<code>:<info>', got None"),
        (0, "expected a result string '<code>:<info>', got 0"),
        (b"0:x", "expected a result string '<code>:<info>', got b'0:x'"),
        (["0:x"], "expected a result string '<code>:<info>', got ['0:x']"),
        ("", "not a result string '<code>:<info>': ''"),
        ("0", "not a result string '<code>:<info>': '0'"),
        ("ok:done", "not a result string '<code>:<info>': 'ok:done'"),
        (":x", "not a result string '<code>:<info>': ':x'"),
        ("-1:x", "not a result string '<code>:<info>': '-1:x'"),
        ("1.0:x", "not a result string '<code>:<info>': '1.0:x'"),
        ("\u00b2:x", "not a result string '<code>:<info>': '\u00b2:x'"),  # "²".isdigit()
        ("\u0663:x", "not a result string '<code>:<info>': '\u0663:x'"),  # Arabic-Indic 3
    ],
)
def test_parse_result_rejects_what_is_not_a_result(raw: object, message: str) -> None:
    with pytest.raises(InvalidResponse) as err:
        parse_result(raw)
    assert str(err.value) == message
    assert isinstance(err.value, VirtmanError) and isinstance(err.value, ValueError)


def test_parse_result_quotes_at_most_200_characters_of_a_huge_answer() -> None:
    with pytest.raises(InvalidResponse) as err:
        parse_result("x" * 10_000)
    assert len(str(err.value)) == len("not a result string '<code>:<info>': ") + 200


@pytest.mark.parametrize(
    ("code", "ok", "warning", "failed"),
    [(0, True, False, False), (1, False, True, False), (2, False, False, True), (9, 0, 0, 1)],
)
def test_result_flags_and_text(code: int, ok: bool, warning: bool, failed: bool) -> None:
    result = Result(code, "info")
    assert (result.ok, result.warning, result.failed) == (ok, warning, failed)
    assert str(result) == f"{code}:info"


# -- check_result --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method", ["create", "destroy", "create_image_target", "destroy_image_target", "list"]
)
def test_check_result_code_0_is_the_result(method: str) -> None:
    assert check_result(method, "0:/dev/x") == Result(0, "/dev/x")


@pytest.mark.parametrize(
    ("method", "error"),
    [
        ("create", AlreadyExists),
        ("create_image_target", AlreadyExists),
        ("destroy", DoesNotExist),
        ("destroy_image_target", DoesNotExist),
        ("list", Failed),  # no warning meaning for other methods
        ("unknown", Failed),
    ],
)
def test_check_result_code_1_is_the_method_s_warning(method: str, error: type[ResultError]) -> None:
    with pytest.raises(ResultError) as err:
        check_result(method, "1:vm1 exists")
    assert type(err.value) is error
    assert (err.value.method, err.value.code, err.value.info) == (method, 1, "vm1 exists")
    assert str(err.value) == f"{method}: vm1 exists"


@pytest.mark.parametrize("method", ["create", "destroy", "create_image_target", "list"])
@pytest.mark.parametrize("code", [2, 3, 255])
def test_check_result_other_codes_fail(method: str, code: int) -> None:
    with pytest.raises(ResultError) as err:
        check_result(method, f"{code}:no such file")
    assert type(err.value) is Failed
    assert (err.value.method, err.value.code, err.value.info) == (method, code, "no such file")


def test_check_result_failure_without_info_names_the_code() -> None:
    with pytest.raises(Failed, match=r"^create: result code 2$"):
        check_result("create", "2:")


@pytest.mark.parametrize("raw", [None, 1, "", "x", ["0:"], {"0": ""}])
def test_check_result_of_a_malformed_answer_is_invalid_response(raw: object) -> None:
    with pytest.raises(InvalidResponse):
        check_result("create", raw)


# -- listings --------------------------------------------------------------------------------
def test_parse_instance_list() -> None:
    assert parse_instance_list(["vm1:volume-image1", "vm2:volume-image2"]) == [
        Instance("vm1", "volume-image1"),
        Instance("vm2", "volume-image2"),
    ]
    assert parse_instance_list(("vm1:volume-a",)) == [Instance("vm1", "volume-a")]
    assert parse_instance_list([]) == []


def test_issue_10_parse_instance_list_reads_the_degraded_state() -> None:
    assert parse_instance_list(["vm1:volume-a:degraded", "vm2:volume-a"]) == [
        Instance("vm1", "volume-a", degraded=True),
        Instance("vm2", "volume-a", degraded=False),
    ]


def test_parse_instance_list_keeps_the_server_s_order_and_splits_at_the_first_colon() -> None:
    assert parse_instance_list(["b:volume-x", "a:volume:odd"]) == [
        Instance("b", "volume-x"),
        Instance("a", "volume:odd"),
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (None, "expected a list of '<instance>:<image>', got None"),
        ("vm1:volume-a", "expected a list of '<instance>:<image>', got 'vm1:volume-a'"),
        ({"vm1": "volume-a"}, "expected a list of '<instance>:<image>', got {'vm1': 'volume-a'}"),
        (["vm1"], "not an '<instance>:<image>' entry: 'vm1'"),
        (["vm1:volume-a", 3], "not an '<instance>:<image>' entry: 3"),
        ([":volume-a"], "not an '<instance>:<image>' entry: ':volume-a'"),
        (["vm1:"], "not an '<instance>:<image>' entry: 'vm1:'"),
        ([["vm1", "volume-a"]], "not an '<instance>:<image>' entry: ['vm1', 'volume-a']"),
    ],
)
def test_parse_instance_list_rejects_malformed_answers(raw: object, message: str) -> None:
    with pytest.raises(InvalidResponse) as err:
        parse_instance_list(raw)
    assert str(err.value) == message


def test_parse_target_list_of_the_server_s_dict_is_sorted_by_image() -> None:
    raw = {"volume-b": "2:/srv/b.raw", "volume-a": "1:/dev/loop7"}
    assert parse_target_list(raw) == [
        ImageTarget("volume-a", "1", "/dev/loop7"),
        ImageTarget("volume-b", "2", "/srv/b.raw"),
    ]
    assert parse_target_list({}) == []


def test_parse_target_list_of_the_tutorial_s_list() -> None:
    raw = ["volume-b:2:/srv/b.raw", "volume-a:1:/srv/x:y.raw"]
    assert parse_target_list(raw) == [
        ImageTarget("volume-a", "1", "/srv/x:y.raw"),  # the file keeps its ':'
        ImageTarget("volume-b", "2", "/srv/b.raw"),
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (None, "expected a dict of image targets, got None"),
        ("volume-a:1:/f", "expected a dict of image targets, got 'volume-a:1:/f'"),
        ({"volume-a": 1}, "image target 'volume-a': not '<tid>:<loop_dev>': 1"),
        ({"volume-a": None}, "image target 'volume-a': not '<tid>:<loop_dev>': None"),
        (["volume-a"], "not an '<image>:<tid>:<loop_dev>' entry: 'volume-a'"),
        ([7], "not an '<image>:<tid>:<loop_dev>' entry: 7"),
    ],
)
def test_parse_target_list_rejects_malformed_answers(raw: object, message: str) -> None:
    with pytest.raises(InvalidResponse) as err:
        parse_target_list(raw)
    assert str(err.value) == message


# -- connection dicts ------------------------------------------------------------------------
def test_build_connection_normalises_the_image_name() -> None:
    expected = {
        "target_portal": "10.0.0.9:3260",
        "target_iqn": IQN + "volume-image1",
        "target_lun": 1,
    }
    assert build_connection("10.0.0.9:3260", "image1") == expected
    assert build_connection("10.0.0.9:3260", "volume-image1") == expected


def test_build_connection_with_prefix_and_lun() -> None:
    assert build_connection("[fd00::9]:3261", "img", "iqn.2024-01.org.example:", 3) == {
        "target_portal": "[fd00::9]:3261",
        "target_iqn": "iqn.2024-01.org.example:volume-img",
        "target_lun": 3,
    }


def test_build_connections_one_portal_gives_one_dict() -> None:
    assert build_connections(["10.0.0.9:3260"], "img") == build_connection("10.0.0.9:3260", "img")


def test_build_connections_a_string_is_one_portal_not_its_characters() -> None:
    assert build_connections("10.0.0.9:3260", "img") == build_connection("10.0.0.9:3260", "img")


def test_build_connections_several_portals_give_one_path_each_in_order() -> None:
    conns = build_connections(("10.0.0.9:3260", "10.0.0.10:3260"), "img", lun=2)
    assert conns == [
        build_connection("10.0.0.9:3260", "img", lun=2),
        build_connection("10.0.0.10:3260", "img", lun=2),
    ]
    assert len({c["target_iqn"] for c in conns}) == 1  # virtman wants one IQN over all paths


@pytest.mark.parametrize("portals", [[], (), ""])
def test_build_connections_needs_a_portal(portals: object) -> None:
    with pytest.raises(ValueError, match=r"^at least one portal is needed$"):
        build_connections(portals, "img")  # type: ignore[arg-type]


# -- endpoints ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("10.0.0.5", "http://10.0.0.5:7774/RPC2"),
        ("10.0.0.5:8000", "http://10.0.0.5:8000/RPC2"),
        ("  node1  ", "http://node1:7774/RPC2"),
        ("[fd00::5]", "http://[fd00::5]:7774/RPC2"),
        ("[fd00::5]:8000", "http://[fd00::5]:8000/RPC2"),
        ("http://10.0.0.5", "http://10.0.0.5:7774/RPC2"),
        ("https://node1:443/rpc", "https://node1:443/rpc"),
        ("http://10.0.0.5:7774/RPC2?x=1#frag", "http://10.0.0.5:7774/RPC2?x=1"),
    ],
)
def test_normalise_endpoint(endpoint: str, url: str) -> None:
    assert normalise_endpoint(endpoint) == url


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("", "empty virtman endpoint"),
        ("   ", "empty virtman endpoint"),
        ("ftp://node1", "invalid virtman endpoint 'ftp://node1': use host[:port] or an http URL"),
        ("http://", "invalid virtman endpoint 'http://': use host[:port] or an http URL"),
        ("http://:7774", "invalid virtman endpoint 'http://:7774': use host[:port] or an http URL"),
        ("node1:99999", "invalid virtman endpoint 'node1:99999': bad port"),
        ("node1:abc", "invalid virtman endpoint 'node1:abc': bad port"),
        ("node1:", "invalid virtman endpoint 'node1:': bad port"),
        ("node1:0", "invalid virtman endpoint 'node1:0': bad port"),
        ("no de", "invalid virtman endpoint 'no de': whitespace or control characters"),
        ("no\nde:1", "invalid virtman endpoint 'no\\nde:1': whitespace or control characters"),
        ("node\t1", "invalid virtman endpoint 'node\\t1': whitespace or control characters"),
        ("node\x001", "invalid virtman endpoint 'node\\x001': whitespace or control characters"),
        # a bare IPv6 address is ambiguous (fd00::5:8000: a port or the last group?): refused
        (
            "fd00::5",
            "invalid virtman endpoint 'fd00::5': an IPv6 address needs brackets: [ipv6]:port",
        ),
        (
            "fd00::5:8000",
            "invalid virtman endpoint 'fd00::5:8000': an IPv6 address needs brackets: [ipv6]:port",
        ),
        (
            "[10.0.0.5]:8000",
            "invalid virtman endpoint '[10.0.0.5]:8000': only IPv6 addresses go in brackets",
        ),
        ("[fd00::5", "invalid virtman endpoint '[fd00::5': use host[:port] or an http URL"),
        (
            "[fd00::5]8000",
            "invalid virtman endpoint '[fd00::5]8000': use host[:port] or an http URL",
        ),
    ],
)
def test_normalise_endpoint_rejects(endpoint: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        normalise_endpoint(endpoint)
    assert str(err.value) == message


def test_client_normalises_its_endpoint_and_drops_an_empty_token() -> None:
    client = Client("10.0.0.5", token="", timeout=5)
    assert (client.url, client.token, client.timeout) == ("http://10.0.0.5:7774/RPC2", None, 5)
    assert repr(client) == "Client('http://10.0.0.5:7774/RPC2')"
    assert Client("https://n:1/x", token="t").token == "t"
    with pytest.raises(ValueError, match="bad port"):
        Client("n:0")


def test_the_package_exports_the_pure_api() -> None:
    for name in ("parse_result", "check_result", "build_connections", "parse_target_list"):
        assert getattr(virtmanclient, name) is globals()[name]


# -- validation ------------------------------------------------------------------------------
NAME_RULE = "use 1-64 of A-Z a-z 0-9 _ . - (not starting with _ . -)"
SHELL_AND_PATHS = [
    "a/b",
    "../etc",
    "a\\b",
    "a;b",
    "a|b",
    "a&b",
    "$(id)",
    "`id`",
    "a b",
    "a\nb",
    "vm1\n",
    "a*",
    "a?",
    "a'b",
    'a"b',
    "a>b",
    "a<b",
    "a$b",
    "~root",
    "a\x00b",
    "a:b",
    "é",
]


@pytest.mark.parametrize("value", ["a", "vm1", "Vm_1.2-3", "0", "a" * 64, "a..b", "x-"])
def test_name_accepts(value: str) -> None:
    assert validation.name(value) == value


@pytest.mark.parametrize(
    "value", ["", ".", "..", "_a", ".hidden", "-rf", "a" * 65, *SHELL_AND_PATHS]
)
def test_name_rejects_with_the_rule(value: str) -> None:
    with pytest.raises(ValueError) as err:
        validation.name(value, "vm name")
    assert str(err.value) == f"invalid vm name {value!r}: {NAME_RULE}"


@pytest.mark.parametrize("value", [None, 1, b"vm1", ["vm1"]])
def test_name_rejects_non_strings(value: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"invalid name {value!r}: {NAME_RULE}")):
        validation.name(value)


def test_image_name_normalises() -> None:
    assert validation.image_name("image1") == "volume-image1"
    assert validation.image_name("volume-image1") == "volume-image1"
    assert validation.normalise_image_name("x") == "volume-x"
    assert validation.normalise_image_name("volume-x") == "volume-x"


def test_image_name_length_counts_the_normalised_name() -> None:
    assert validation.image_name("a" * 57) == "volume-" + "a" * 57  # 64 characters
    assert validation.image_name("volume-" + "a" * 57) == "volume-" + "a" * 57
    with pytest.raises(ValueError) as err:
        validation.image_name("a" * 58)
    assert str(err.value) == (
        f"invalid image name {'a' * 58!r}: too long once normalised to "
        f"{'volume-' + 'a' * 58!r} (max 64)"
    )


@pytest.mark.parametrize("value", ["", "-x", *SHELL_AND_PATHS])
def test_image_name_rejects(value: str) -> None:
    with pytest.raises(ValueError) as err:
        validation.image_name(value)
    assert str(err.value) == f"invalid image name {value!r}: {NAME_RULE}"


def test_image_name_as_given_checks_but_keeps_the_name() -> None:
    assert validation.image_name_as_given("image1") == "image1"
    assert validation.image_name_as_given("volume-image1") == "volume-image1"
    with pytest.raises(ValueError, match="too long once normalised"):
        validation.image_name_as_given("a" * 58)
    with pytest.raises(ValueError, match=r"^invalid image name 'a/b': "):
        validation.image_name_as_given("a/b")


@pytest.mark.parametrize("value", ["/srv/images/image1.raw", "/", "/dev/loop7", "/a b/c;d"])
def test_absolute_path_accepts(value: str) -> None:
    assert validation.absolute_path(value) == value


@pytest.mark.parametrize("value", ["", "image1.raw", "./x", "~/x", "/a\x00b", None, 3])
def test_absolute_path_rejects(value: object) -> None:
    with pytest.raises(ValueError) as err:
        validation.absolute_path(value)
    assert str(err.value) == f"invalid file {value!r}: must be an absolute path on the server"


@pytest.mark.parametrize(
    ("value", "canonical"),
    [
        ("10.0.0.1", "10.0.0.1"),
        ("127.0.0.1", "127.0.0.1"),
        ("fd00::1", "fd00::1"),
        ("FD00:0:0::1", "fd00::1"),
        ("[fd00::1]", "fd00::1"),
    ],
)
def test_ip_accepts_and_canonicalises(value: str, canonical: str) -> None:
    assert validation.ip(value) == canonical


@pytest.mark.parametrize(
    "value",
    [
        "",
        "node1",
        "10.0.0",
        "10.0.0.256",
        "10.0.0.01",
        " 10.0.0.1",
        "10.0.0.1 ",
        "10.0.0.1:3260",
        "10.0.0.1/24",
        "10.0.0.1;id",
        "[fd00::1",
        "fd00::1]",
        "[[fd00::1]]",
        "[]",
        None,
        167772161,
    ],
)
def test_ip_rejects(value: object) -> None:
    with pytest.raises(ValueError) as err:
        validation.ip(value, "node_ip")
    assert str(err.value) == f"invalid node_ip {value!r}: not an IP address"


@pytest.mark.parametrize(
    ("value", "number"), [(1, 1), ("3260", 3260), (" 7774 ", 7774), ("08", 8), (65535, 65535)]
)
def test_port_accepts(value: object, number: int) -> None:
    assert validation.port(value) == number


@pytest.mark.parametrize(
    "value",
    [0, 65536, -1, "", "0", "65536", "+80", "80a", "1e3", "\u00b2", "\u0663", True, 80.0, None],
)
def test_port_rejects(value: object) -> None:
    with pytest.raises(ValueError) as err:
        validation.port(value)
    assert str(err.value) == f"invalid port {value!r}: must be a port number 1-65535"


def test_join_host_port() -> None:
    assert validation.join_host_port("10.0.0.1", 3260) == "10.0.0.1:3260"
    assert validation.join_host_port("fd00::1", 3260) == "[fd00::1]:3260"


@pytest.mark.parametrize(
    ("value", "canonical"),
    [
        ("10.0.0.9:3260", "10.0.0.9:3260"),
        ("10.0.0.9", "10.0.0.9:3260"),
        ("10.0.0.9:3261", "10.0.0.9:3261"),
        ("[fd00::9]:3260", "[fd00::9]:3260"),
        ("[FD00::9]", "[fd00::9]:3260"),
    ],
)
def test_portal_accepts(value: str, canonical: str) -> None:
    assert validation.portal(value) == canonical


def test_portal_default_port() -> None:
    assert validation.portal("10.0.0.9", default_port=10809) == "10.0.0.9:10809"


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("", "must be ip:port"),
        (None, "must be ip:port"),
        ("[fd00::9", "must be ip:port"),
        ("[fd00::9]3260", "must be ip:port"),
        ("node1:3260", "must be ip:port with an IP address"),
        ("10.0.0.9;id:3260", "must be ip:port with an IP address"),
        ("10.0.0.9:0", "port must be 1-65535"),
        ("10.0.0.9:", "port must be 1-65535"),
        ("10.0.0.9:3260;id", "port must be 1-65535"),
        ("[fd00::9]:", "port must be 1-65535"),
        # a bare IPv6 address is refused: fd00::9:3260 could be a port or the last group
        ("fd00::9", "an IPv6 address needs brackets: [ipv6]:port"),
        ("fd00::9:3260", "an IPv6 address needs brackets: [ipv6]:port"),
        ("[10.0.0.9]:3260", "only IPv6 addresses go in brackets"),
    ],
)
def test_portal_rejects(value: object, rule: str) -> None:
    with pytest.raises(ValueError) as err:
        validation.portal(value)
    assert str(err.value) == f"invalid portal {value!r}: {rule}"


@pytest.mark.parametrize(
    "value",
    [
        IQN + "volume-image1",
        "iqn.2010-10.org.openstack",
        "iqn.2024-01.org.example.host:a.b_c:d-e",
    ],
)
def test_iqn_accepts(value: str) -> None:
    assert validation.iqn(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        IQN,  # empty suffix
        "iqn.2010-10.ORG.openstack:x",
        "iqn.10-10.org:x",
        "eui.02004567A425678D",
        IQN + "a b",
        IQN + "a/b",
        IQN + "a;b",
        IQN + "$(id)",
        IQN + "a" * 200,  # over 223 characters
        None,
    ],
)
def test_iqn_rejects(value: object) -> None:
    with pytest.raises(ValueError) as err:
        validation.iqn(value)
    assert str(err.value) == (
        f"invalid IQN {value!r}: must be an iSCSI qualified name iqn.YYYY-MM.domain:..."
    )


@pytest.mark.parametrize(("value", "number"), [(0, 0), (1, 1), ("255", 255), (" 2 ", 2)])
def test_lun_accepts(value: object, number: int) -> None:
    assert validation.lun(value) == number


@pytest.mark.parametrize("value", [-1, 256, "", "x", "1.0", "\u00b2", False, 1.0, None])
def test_lun_rejects(value: object) -> None:
    with pytest.raises(ValueError) as err:
        validation.lun(value)
    assert str(err.value) == f"invalid LUN {value!r}: must be an integer 0-255"
