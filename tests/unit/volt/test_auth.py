"""volt.auth: node tokens bound to their host, the admin token, and what each may do."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from volt.auth import ADMIN, Authenticator, Credential, node_token
from volt.errors import Forbidden, InvalidInput, Unauthenticated

SECRET = "s3cret-node-secret"


def test_node_token_is_the_hmac_of_the_canonical_host() -> None:
    digest = hmac.new(SECRET.encode(), b"10.0.0.5", hashlib.sha256).hexdigest()
    assert node_token(SECRET, "10.0.0.5") == f"node:10.0.0.5:{digest}"
    assert node_token(SECRET, "FD00:0::5") == node_token(SECRET, "fd00::5")
    assert node_token(SECRET, "Node-1.Example") == node_token(SECRET, "node-1.example")
    with pytest.raises(InvalidInput):
        node_token(SECRET, "10.0.0.5; rm -rf /")
    with pytest.raises(ValueError, match="node_secret"):
        node_token("", "10.0.0.5")


def test_authenticate_each_credential() -> None:
    auth = Authenticator("admin-token", SECRET)
    assert auth.authenticate("admin-token") is ADMIN
    assert auth.authenticate(node_token(SECRET, "10.0.0.5")) == Credential("10.0.0.5")
    assert auth.authenticate(node_token(SECRET, "fd00::5")) == Credential("fd00::5")
    good = node_token(SECRET, "10.0.0.5")
    forged = [
        "",
        "admin-token ",
        "node:10.0.0.6:" + good.rpartition(":")[2],  # another host, the same digest
        node_token("other-secret", "10.0.0.5"),
        good[:-1] + ("0" if good[-1] != "0" else "1"),
        good + "0",
        "node::" + good.rpartition(":")[2],
        "node:" + "é" * 10 + ":" + "0" * 64,
    ]
    for given in forged:
        with pytest.raises(Unauthenticated):
            auth.authenticate(given)


def test_without_node_secret_only_the_admin_token_works() -> None:
    auth = Authenticator("admin-token", None)
    with pytest.raises(Unauthenticated):
        auth.authenticate(node_token(SECRET, "10.0.0.5"))
    assert auth.authenticate("admin-token") is ADMIN


def test_noauth_lets_everyone_in_as_admin() -> None:
    assert Authenticator(None, None).authenticate("") is ADMIN


def test_what_a_node_credential_may_do() -> None:
    node = Credential("10.0.0.5")
    assert node.own_host(None) == "10.0.0.5"
    assert node.own_host("10.0.0.5") == "10.0.0.5"
    with pytest.raises(Forbidden, match=r"'10\.0\.0\.6' is not the host of this node token"):
        node.own_host("10.0.0.6")
    with pytest.raises(Forbidden, match="needs the admin credential"):
        node.require_admin("GET /v1/members")
    assert ADMIN.own_host("10.0.0.6") == "10.0.0.6" and ADMIN.own_host(None) is None
    ADMIN.require_admin("GET /v1/members")
