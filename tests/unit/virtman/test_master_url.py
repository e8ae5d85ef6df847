"""virtman's Volt link settings: master_url (https) overrides master_ip/master_port."""

from __future__ import annotations

from pathlib import Path

from oslo_config import cfg

from virtman import conf as virtman_conf
from virtman.voltlink import VoltLink


def settings(tmp_path: Path, lines: str) -> virtman_conf.Settings:
    config = tmp_path / "virtman.conf"
    config.write_text("[DEFAULT]\nmaster_ip = 10.0.0.1\nmaster_port = 7000\n" + lines)
    opts = cfg.ConfigOpts()
    for group, options in virtman_conf.list_opts():
        opts.register_opts(options, group=None if group == "DEFAULT" else group)
    opts(args=[], default_config_files=[str(config)])
    return virtman_conf.Settings.from_conf(opts, "10.0.0.5")


def test_master_url_and_ca_file(tmp_path: Path) -> None:
    plain = settings(tmp_path, "")
    assert (plain.master_url, plain.master_ca_file) == ("http://10.0.0.1:7000", None)
    tls = settings(
        tmp_path, "master_url = https://volt.example:7447\nmaster_ca_file = /etc/volt/ca.pem\n"
    )
    assert (tls.master_url, tls.master_ca_file) == ("https://volt.example:7447", "/etc/volt/ca.pem")
    link = VoltLink(tls.master_url, "t", tls.host_ip, ca_file=tls.master_ca_file)
    assert link.client.http_client.endpoint == "https://volt.example:7447"
    assert link.client.http_client.ca_file == "/etc/volt/ca.pem"


def test_master_url_list(tmp_path: Path) -> None:
    several = settings(tmp_path, "master_url = http://10.0.0.1:7447, https://10.0.0.2:7447\n")
    assert several.master_url == "http://10.0.0.1:7447,https://10.0.0.2:7447"
    link = VoltLink(several.master_url, "t", several.host_ip)
    assert link.client.http_client.endpoints == ["http://10.0.0.1:7447", "https://10.0.0.2:7447"]


def test_master_url_list_refuses_a_bad_url(tmp_path: Path) -> None:
    import pytest

    with pytest.raises(ValueError):
        settings(tmp_path, "master_url = http://10.0.0.1:7447, ftp://10.0.0.2:21\n")
