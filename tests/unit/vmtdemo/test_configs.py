"""vmt-demo without servers: image.cfg / nodelist.cfg parsing (vmtimg.py, vmtrun.py), what
their main() sends (vmtapi stubbed) and vmtapi's argument handling (Client.call stubbed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

VMT_DEMO = Path(__file__).resolve().parents[3] / "vmt-demo"
if str(VMT_DEMO) not in sys.path:
    sys.path.insert(0, str(VMT_DEMO))

import vmtapi  # noqa: E402
import vmtimg  # noqa: E402
import vmtrun  # noqa: E402

from virtmanclient import batch  # noqa: E402
from virtmanclient.client import Client  # noqa: E402

NAME_RULE = "use 1-64 of A-Z a-z 0-9 _ . - (not starting with _ . -)"
IQN = "iqn.2010-10.org.openstack:"
ImageAction, NodeAction = vmtimg.ImageAction, vmtrun.NodeAction


def config_errors(parse: Any, text: str, source: str | None = None) -> list[str]:
    with pytest.raises(batch.ConfigError) as err:
        parse(text) if source is None else parse(text, source)
    assert str(err.value) == "\n".join(err.value.errors)
    return err.value.errors


# -- image.cfg -------------------------------------------------------------------------------
IMAGE_CFG = """\
# image_server_ip  image_name  file_path

+ 192.168.137.102 image1 /root/blocks/image1.blk
   # an indented comment
+\t192.168.137.102\timage2   /root/blocks/image2.blk
#+ 192.168.137.102 image3 /root/blocks/image3.blk
- 192.168.137.102 image1
@ 192.168.137.102
+ FD00::2 volume-image4 /srv/a b.raw
"""


def test_image_cfg_every_form_with_comments_blank_lines_and_tabs() -> None:
    text = IMAGE_CFG.replace("/srv/a b.raw", "/srv/a:b.raw")
    assert vmtimg.parse_image_cfg(text) == [
        ImageAction(3, "+", "192.168.137.102", "image1", "/root/blocks/image1.blk"),
        ImageAction(5, "+", "192.168.137.102", "image2", "/root/blocks/image2.blk"),
        ImageAction(7, "-", "192.168.137.102", "image1"),
        ImageAction(8, "@", "192.168.137.102"),
        ImageAction(9, "+", "fd00::2", "volume-image4", "/srv/a:b.raw"),  # IP canonical
    ]


def test_image_cfg_action_addresses_its_server() -> None:
    (action,) = vmtimg.parse_image_cfg("@ 10.0.0.9\n")
    assert action.node == "10.0.0.9"
    assert vmtimg.describe(action) == "list image targets"
    plus, minus = vmtimg.parse_image_cfg("+ 10.0.0.9 img /f.raw\n- 10.0.0.9 img\n")
    assert vmtimg.describe(plus) == "create image target img from /f.raw"
    assert vmtimg.describe(minus) == "destroy image target img"


def test_image_cfg_crlf_bom_and_no_final_newline() -> None:
    text = "\ufeff# c\r\n+ 10.0.0.9 img /f.raw\r\n\r\n@ 10.0.0.9"
    assert vmtimg.parse_image_cfg(text) == [
        ImageAction(2, "+", "10.0.0.9", "img", "/f.raw"),
        ImageAction(4, "@", "10.0.0.9"),
    ]


@pytest.mark.parametrize("text", ["", "\n\n", "# only\n  # comments\n", "\ufeff"])
def test_image_cfg_without_actions(text: str) -> None:
    assert vmtimg.parse_image_cfg(text) == []


def test_image_cfg_reports_every_error_with_its_line() -> None:
    text = """\
+ 10.0.0.9 image1 /srv/image1.raw
* 10.0.0.9
+ 10.0.0.9 image1
- 10.0.0.9 image1 /srv/image1.raw
@
+ 10.0.0.256 image1 /srv/image1.raw
+ 10.0.0.9 ../image1 /srv/image1.raw
+ 10.0.0.9 image1 srv/image1.raw
+ node1 a;b rel
- 10.0.0.9 $(reboot)
@ 10.0.0.9:7774
+10.0.0.9 image1 /srv/image1.raw
+ 10.0.0.9 image1 /srv/image1.raw # trailing words are an error, not a comment
"""
    assert config_errors(vmtimg.parse_image_cfg, text) == [
        "image.cfg line 2: unknown action '*': expected one of '+', '-', '@'",
        "image.cfg line 3: expected '+ <server_ip> <image> <file>'",
        "image.cfg line 4: expected '- <server_ip> <image>'",
        "image.cfg line 5: expected '@ <server_ip>'",
        "image.cfg line 6: invalid server_ip '10.0.0.256': not an IP address",
        f"image.cfg line 7: invalid image name '../image1': {NAME_RULE}",
        "image.cfg line 8: invalid file 'srv/image1.raw': must be an absolute path on the server",
        "image.cfg line 9: invalid server_ip 'node1': not an IP address",
        f"image.cfg line 9: invalid image name 'a;b': {NAME_RULE}",
        "image.cfg line 9: invalid file 'rel': must be an absolute path on the server",
        f"image.cfg line 10: invalid image name '$(reboot)': {NAME_RULE}",
        "image.cfg line 11: invalid server_ip '10.0.0.9:7774': not an IP address",
        "image.cfg line 12: unknown action '+10.0.0.9': expected one of '+', '-', '@'",
        "image.cfg line 13: expected '+ <server_ip> <image> <file>'",
    ]


def test_image_cfg_errors_name_the_source() -> None:
    assert config_errors(vmtimg.parse_image_cfg, "\n@ x\n", "my.cfg") == [
        "my.cfg line 2: invalid server_ip 'x': not an IP address"
    ]


def test_image_cfg_image_name_too_long_once_normalised() -> None:
    name = "a" * 58
    assert config_errors(vmtimg.parse_image_cfg, f"- 10.0.0.9 {name}\n") == [
        f"image.cfg line 1: invalid image name {name!r}: too long once normalised to "
        f"{'volume-' + name!r} (max 64)"
    ]


# -- nodelist.cfg ----------------------------------------------------------------------------
NODELIST = """\
# computenode_ip vm_name image_server_ip image_name
+ 192.168.137.103 vm1 192.168.137.102 image1

+ 192.168.137.104 vm2 192.168.137.102 volume-image2
- 192.168.137.103 vm1
\t# tabbed comment
@ 192.168.137.104
+ fd00::0:3 vm3 FD00::2 image1
"""


def test_nodelist_every_form() -> None:
    assert vmtrun.parse_nodelist(NODELIST) == [
        NodeAction(2, "+", "192.168.137.103", "vm1", "192.168.137.102", "image1"),
        NodeAction(4, "+", "192.168.137.104", "vm2", "192.168.137.102", "volume-image2"),
        NodeAction(5, "-", "192.168.137.103", "vm1"),
        NodeAction(7, "@", "192.168.137.104"),
        NodeAction(8, "+", "fd00::3", "vm3", "fd00::2", "image1"),
    ]


def test_nodelist_action_addresses_its_compute_node() -> None:
    plus, minus, at = vmtrun.parse_nodelist("+ 10.0.0.5 vm1 10.0.0.9 img\n- 10.0.0.5 vm1\n@ ::1")
    assert (plus.node, minus.node, at.node) == ("10.0.0.5", "10.0.0.5", "::1")
    assert vmtrun.describe(plus) == "create vm1 from img on 10.0.0.9"
    assert vmtrun.describe(minus) == "destroy vm1"
    assert vmtrun.describe(at) == "list"


def test_nodelist_reports_every_error_with_its_line() -> None:
    text = """\
# fine
+ 10.0.0.5 vm1 10.0.0.9 image1
+ 10.0.0.5 vm1 10.0.0.9
- 10.0.0.5
@ 10.0.0.5 vm1
? 10.0.0.5
+ 10.0.0.5 vm/1 10.0.0.9 image1
+ 10.0.0.5 vm1 10.0.0.9 image`id`
+ 10.0.0.5. vm1 10.0.0.9x image1
- 10.0.0.5 -rf
- 10.0.0.5 ..

@ localhost
"""
    assert config_errors(vmtrun.parse_nodelist, text) == [
        "nodelist.cfg line 3: expected '+ <node_ip> <vm> <server_ip> <image>'",
        "nodelist.cfg line 4: expected '- <node_ip> <vm>'",
        "nodelist.cfg line 5: expected '@ <node_ip>'",
        "nodelist.cfg line 6: unknown action '?': expected one of '+', '-', '@'",
        f"nodelist.cfg line 7: invalid vm name 'vm/1': {NAME_RULE}",
        f"nodelist.cfg line 8: invalid image name 'image`id`': {NAME_RULE}",
        "nodelist.cfg line 9: invalid node_ip '10.0.0.5.': not an IP address",
        "nodelist.cfg line 9: invalid server_ip '10.0.0.9x': not an IP address",
        f"nodelist.cfg line 10: invalid vm name '-rf': {NAME_RULE}",
        f"nodelist.cfg line 11: invalid vm name '..': {NAME_RULE}",
        "nodelist.cfg line 13: invalid node_ip 'localhost': not an IP address",
    ]


def test_the_samples_parse() -> None:
    images = vmtimg.parse_image_cfg((VMT_DEMO / "image.cfg.sample").read_text())
    nodes = vmtrun.parse_nodelist((VMT_DEMO / "nodelist.cfg.sample").read_text())
    assert [(a.op, a.server_ip, a.image) for a in images] == [
        ("+", "127.0.0.1", "image1"),
        ("@", "127.0.0.1", None),
    ]
    assert [(a.op, a.node_ip, a.vm) for a in nodes] == [
        ("+", "127.0.0.1", "vm1"),
        ("@", "127.0.0.1", None),
    ]


# -- the scripts: nothing is sent for a bad file --------------------------------------------
@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Every vmtapi call the scripts make, answered without a network."""
    calls: list[tuple[Any, ...]] = []

    def stub(name: str, answer: Any) -> None:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append((name, args, kwargs))
            return answer(*args) if callable(answer) else answer

        monkeypatch.setattr(vmtapi, name, call)

    stub(
        "create_image_target",
        lambda ip, image, file: "1:exists" if image == "dup" else "0:1:" + file,
    )
    stub("destroy_image_target", "2:cannot remove")
    stub("list_image_target", {"volume-image1": "1:/srv/image1.raw"})
    stub("create", "0:/var/lib/virtman/instances/vm1.qcow2")
    stub("destroy", "1:no such instance")
    stub("list", ["vm1:volume-image1"])
    return calls


@pytest.mark.parametrize(
    ("script", "name", "bad", "errors"),
    [
        (
            vmtimg,
            "image.cfg",
            "+ 10.0.0.9 image1 /f.raw\n+ 10.0.0.9 a/b /f.raw\n- 10.0.0.9\n",
            [
                f"image.cfg line 2: invalid image name 'a/b': {NAME_RULE}",
                "image.cfg line 3: expected '- <server_ip> <image>'",
            ],
        ),
        (
            vmtrun,
            "nodelist.cfg",
            "+ 10.0.0.5 vm1 10.0.0.9 img\n@ 10.0.0.5\n- 1.2.3 vm1\n+ 10.0.0.5 v;m 10.0.0.9 i\n",
            [
                "nodelist.cfg line 3: invalid node_ip '1.2.3': not an IP address",
                f"nodelist.cfg line 4: invalid vm name 'v;m': {NAME_RULE}",
            ],
        ),
    ],
)
def test_a_bad_file_sends_nothing(
    script: Any,
    name: str,
    bad: str,
    errors: list[str],
    sent: list[Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / name
    path.write_text(bad)
    assert script.main(["--file", str(path)]) == 2
    assert sent == []
    out, err = capsys.readouterr()
    assert out == ""
    prog = script.__name__ + ".py"
    assert err.splitlines() == [
        *(f"{prog}: error: {e}" for e in errors),
        f"{prog}: nothing was sent",
    ]


def test_vmtimg_unreadable_file_and_bad_options_send_nothing(
    sent: list[Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "none.cfg"
    assert vmtimg.main(["--file", str(missing)]) == 2
    assert f"vmtimg.py: error: cannot read {missing}: " in capsys.readouterr().err
    good = tmp_path / "image.cfg"
    good.write_text("@ 10.0.0.9\n")
    assert vmtimg.main(["--file", str(good), "--port", "0"]) == 2
    assert capsys.readouterr().err == "vmtimg.py: error: --port 0: must be a port number 1-65535\n"
    assert vmtimg.main(["--file", str(good), "--workers", "0"]) == 2
    assert capsys.readouterr().err == "vmtimg.py: error: --workers must be at least 1\n"
    assert vmtimg.main(["--file", str(good), "--port", "x"]) == 2  # argparse's own error
    assert sent == []


def test_vmtimg_runs_a_good_file_in_order_with_its_options(
    sent: list[Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "image.cfg"
    path.write_text("+ 10.0.0.9 image1 /srv/image1.raw\n+ 10.0.0.9 dup /srv/d.raw\n@ 10.0.0.9\n")
    argv = ["--file", str(path), "--port", "8000", "--token", "t0k", "--timeout", "9"]
    assert vmtimg.main(argv) == 0  # a warning is not a failure
    options = {"port": 8000, "token": "t0k", "timeout": 9.0, "ca_file": None}
    assert sent == [
        ("create_image_target", ("10.0.0.9", "image1", "/srv/image1.raw"), options),
        ("create_image_target", ("10.0.0.9", "dup", "/srv/d.raw"), options),
        ("list_image_target", ("10.0.0.9",), options),
    ]
    out = capsys.readouterr().out
    assert "line 1: create image target image1 from /srv/image1.raw -> OK 1:/srv/image1.raw" in out
    assert "line 2: create image target dup from /srv/d.raw -> WARNING exists" in out
    assert "line 3: list image targets -> OK volume-image1=1:/srv/image1.raw" in out
    assert "summary: 3 actions on 1 node" in out


def test_vmtimg_a_failed_action_is_exit_1(sent: list[Any], tmp_path: Path) -> None:
    path = tmp_path / "image.cfg"
    path.write_text("- 10.0.0.9 image1\n")
    assert vmtimg.main(["--file", str(path)]) == 1
    assert sent == [
        (
            "destroy_image_target",
            ("10.0.0.9", "image1"),
            {"port": 7774, "token": None, "timeout": 600.0, "ca_file": None},
        )
    ]


def test_vmtrun_runs_every_node_and_keeps_each_node_s_order(
    sent: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VMT_TOKEN", raising=False)
    path = tmp_path / "nodelist.cfg"
    path.write_text(
        "+ 10.0.0.5 vm1 10.0.0.9 image1\n+ 10.0.0.6 vm1 10.0.0.9 image1\n"
        "- 10.0.0.5 vm1\n@ 10.0.0.5\n"
    )
    assert vmtrun.main(["--file", str(path)]) == 0
    options = {"port": 7774, "token": None, "timeout": 600.0, "ca_file": None}
    by_node: dict[str, list[Any]] = {}
    for name, args, kwargs in sent:
        assert kwargs == options
        by_node.setdefault(args[0], []).append((name, args[1:]))
    assert by_node == {
        "10.0.0.5": [
            ("create", ("vm1", "image1", "10.0.0.9")),
            ("destroy", ("vm1",)),
            ("list", ()),
        ],
        "10.0.0.6": [("create", ("vm1", "image1", "10.0.0.9"))],
    }


def test_vmtrun_token_from_the_environment(
    sent: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMT_TOKEN", "from-env")
    path = tmp_path / "nodelist.cfg"
    path.write_text("@ 10.0.0.5\n")
    assert vmtrun.main(["--file", str(path)]) == 0
    assert sent == [
        (
            "list",
            ("10.0.0.5",),
            {"port": 7774, "token": "from-env", "timeout": 600.0, "ca_file": None},
        )
    ]


# -- vmtapi ----------------------------------------------------------------------------------
@pytest.fixture
def rpc(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every XML-RPC call vmtapi makes: the client's settings, the method and arguments."""
    calls: list[dict[str, Any]] = []
    answers = {"list": ["vm1:volume-image1"], "list_image_target": {}}

    def call(self: Client, method: str, *args: Any) -> Any:
        calls.append(
            {
                "url": self.url,
                "token": self.token,
                "timeout": self.timeout,
                "method": method,
                "args": args,
            }
        )
        return answers.get(method, "0:answer")

    monkeypatch.setattr(Client, "call", call)
    monkeypatch.setattr(vmtapi, "TOKEN", None)
    monkeypatch.delenv("VMT_TOKEN", raising=False)
    return calls


def conn(
    portal: str, image: str = "volume-image1", prefix: str = IQN, lun: int = 1
) -> dict[str, Any]:
    return {"target_portal": portal, "target_iqn": prefix + image, "target_lun": lun}


def test_vmtapi_create_the_tutorial_s_way(rpc: list[dict[str, Any]]) -> None:
    assert vmtapi.create("10.0.0.5", "vm1", "image1", "10.0.0.9") == "0:answer"
    assert rpc == [
        {
            "url": "http://10.0.0.5:7774/RPC2",
            "token": None,
            "timeout": 600.0,
            "method": "create",
            "args": ("vm1", "volume-image1", conn("10.0.0.9:3260"), None),
        }
    ]


def test_vmtapi_create_with_every_argument(rpc: list[dict[str, Any]]) -> None:
    vmtapi.create(
        "fd00::5",
        "vm2",
        "volume-img",
        ["10.0.0.9", "[fd00::9]", "fd00::a"],
        3261,
        "iqn.2024-01.org.example:",
        2,
        "/dev/vdb",
        port=8000,
        token="t",
        timeout=5,
    )
    prefix = "iqn.2024-01.org.example:"
    (call,) = rpc
    assert call["url"] == "http://[fd00::5]:8000/RPC2"
    assert (call["token"], call["timeout"]) == ("t", 5)
    assert call["args"] == (
        "vm2",
        "volume-img",
        [
            conn("10.0.0.9:3261", "volume-img", prefix, 2),
            conn("[fd00::9]:3261", "volume-img", prefix, 2),
            conn("[fd00::a]:3261", "volume-img", prefix, 2),
        ],
        "/dev/vdb",
    )


def test_vmtapi_create_one_server_in_a_list_is_one_dict(rpc: list[dict[str, Any]]) -> None:
    vmtapi.create("10.0.0.5", "vm1", "image1", ("10.0.0.9",), snapshot_dev="")
    assert rpc[0]["args"] == ("vm1", "volume-image1", conn("10.0.0.9:3260"), None)


@pytest.mark.parametrize("servers", [[], ()])
def test_vmtapi_create_needs_an_image_server(rpc: list[Any], servers: Any) -> None:
    with pytest.raises(ValueError, match=r"^at least one image server is needed$"):
        vmtapi.create("10.0.0.5", "vm1", "image1", servers)
    assert rpc == []


@pytest.mark.parametrize(
    "address", ["10.0.0.9/x", "10.0.0.9:3260", "a b", "$(id)", "", "http://10.0.0.9", "-x"]
)
def test_vmtapi_rejects_a_bad_address_before_sending(rpc: list[Any], address: str) -> None:
    with pytest.raises(ValueError) as err:
        vmtapi.list(address)
    assert (
        str(err.value) == f"invalid node address {address!r}: must be an IP address or a host name"
    )
    with pytest.raises(ValueError) as err:
        vmtapi.create("10.0.0.5", "vm1", "image1", ["10.0.0.9", address])
    assert str(err.value) == (
        f"invalid image server address {address!r}: must be an IP address or a host name"
    )
    assert rpc == []


def test_vmtapi_host_names_are_accepted(rpc: list[dict[str, Any]]) -> None:
    vmtapi.create("Node1.example", "vm1", "image1", "img-server")
    assert rpc[0]["url"] == "http://node1.example:7774/RPC2"
    assert rpc[0]["args"][2] == conn("img-server:3260")


def test_vmtapi_token_explicit_then_module_then_environment(
    rpc: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    vmtapi.list("10.0.0.5")
    monkeypatch.setenv("VMT_TOKEN", "env")
    vmtapi.list("10.0.0.5")
    monkeypatch.setattr(vmtapi, "TOKEN", "module")
    vmtapi.list("10.0.0.5")
    vmtapi.list("10.0.0.5", token="explicit")
    vmtapi.list("10.0.0.5", token="")  # explicitly none, whatever the settings
    assert [c["token"] for c in rpc] == [None, "env", "module", "explicit", None]


def test_vmtapi_module_port_and_timeout(
    rpc: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vmtapi, "PORT", 9000)
    monkeypatch.setattr(vmtapi, "TIMEOUT", 3.0)
    vmtapi.destroy("10.0.0.5", "vm1")
    vmtapi.destroy("10.0.0.5", "vm1", port=9001, timeout=4)
    assert [(c["url"], c["timeout"]) for c in rpc] == [
        ("http://10.0.0.5:9000/RPC2", 3.0),
        ("http://10.0.0.5:9001/RPC2", 4),
    ]


def test_vmtapi_other_calls_pass_the_original_s_arguments(rpc: list[dict[str, Any]]) -> None:
    assert vmtapi.destroy("10.0.0.5", "vm1") == "0:answer"
    assert vmtapi.list("10.0.0.5") == ["vm1:volume-image1"]
    assert vmtapi.create_image_target("10.0.0.9", "image1", "/srv/i.raw") == "0:answer"
    vmtapi.create_image_target("10.0.0.9", "image2", "/srv/j.raw", "/dev/loop3", "iqn.2024-01.x:")
    assert vmtapi.destroy_image_target("10.0.0.9", "image1") == "0:answer"
    assert vmtapi.list_image_target("10.0.0.9") == {}
    assert [(c["url"].split("/")[2], c["method"], c["args"]) for c in rpc] == [
        ("10.0.0.5:7774", "destroy", ("vm1",)),
        ("10.0.0.5:7774", "list", ()),
        ("10.0.0.9:7774", "create_image_target", ("image1", "/srv/i.raw", None, IQN)),
        (
            "10.0.0.9:7774",
            "create_image_target",
            ("image2", "/srv/j.raw", "/dev/loop3", "iqn.2024-01.x:"),
        ),
        ("10.0.0.9:7774", "destroy_image_target", ("image1",)),
        ("10.0.0.9:7774", "list_image_target", ()),
    ]


def test_vmtapi_exports_the_tutorial_s_six_calls() -> None:
    assert sorted(vmtapi.__all__) == [
        "create",
        "create_image_target",
        "destroy",
        "destroy_image_target",
        "list",
        "list_image_target",
    ]


@pytest.fixture
def ca_file(tmp_path: Path) -> str:
    """A self-signed certificate, usable as a CA file."""
    cert = tmp_path / "ca.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(tmp_path / "key.pem"), "-out", str(cert), "-subj", "/CN=unit"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert)


def test_vmtapi_a_ca_file_means_https(
    rpc: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, ca_file: str
) -> None:
    vmtapi.list("10.0.0.5")
    vmtapi.list("10.0.0.5", ca_file=ca_file)
    monkeypatch.setenv("VMT_CACERT", ca_file)
    vmtapi.list("10.0.0.5")
    assert [c["url"] for c in rpc] == [
        "http://10.0.0.5:7774/RPC2",
        "https://10.0.0.5:7774/RPC2",
        "https://10.0.0.5:7774/RPC2",
    ]
    with pytest.raises(ValueError, match="cannot load the CA file"):
        vmtapi.list("10.0.0.5", ca_file="/no/such/ca.pem")
