"""image_import's ``remote_host``: Nova's zvm driver always names itself (``user@my_ip``); a
nova-compute on the node itself hands a local file, so an address of this host is a local
import, anything else stays "not supported"."""

from __future__ import annotations

import pytest

from virtman.zvm.host_handlers import is_this_host

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("remote_host", ["nova@127.0.0.1", "root@127.0.0.2", "nova@::1"])
def test_an_address_of_this_host_is_local(remote_host: str) -> None:
    assert is_this_host(remote_host)


@pytest.mark.parametrize(
    "remote_host", ["nova@192.0.2.1", "nova@2001:db8::1", "nova@localhost", "nova@", "nova"]
)
def test_another_host_or_a_name_is_not(remote_host: str) -> None:
    assert not is_this_host(remote_host)
