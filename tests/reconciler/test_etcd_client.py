"""etcd_client.py: the --store URL and calls that fail over between etcd members (real etcd)."""

from __future__ import annotations

import pytest

from starmesh.reconciler.errors import StoreUnavailable
from starmesh.reconciler.etcd_client import EtcdConnection, EtcdURL, parse_etcd_url


def test_url_members_and_prefix() -> None:
    assert parse_etcd_url("etcd://127.0.0.1:2379") == EtcdURL((("127.0.0.1", 2379),), "/starmesh/")
    url = parse_etcd_url("etcd://a:1,[::1]:2/mesh/prod")
    assert url.members == (("a", 1), ("::1", 2)) and url.prefix == "/mesh/prod/"
    assert str(url) == "etcd://a:1,[::1]:2/mesh/prod"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("http://127.0.0.1:2379", "not an etcd URL"),
        ("etcd://127.0.0.1", "not HOST:PORT"),
        ("etcd://127.0.0.1:0", "not HOST:PORT"),
        ("etcd://a:1,,b:2", "not HOST:PORT"),
        ("etcd://a:1/has space", "key prefix"),
    ],
)
def test_bad_urls_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_etcd_url(text)


def test_calls_fail_over_to_a_member_that_answers(etcd_server) -> None:  # type: ignore[no-untyped-def]
    port = etcd_server.client_port
    dead = EtcdURL((("127.0.0.1", 1), ("127.0.0.1", port)))
    connection = EtcdConnection(dead, timeout=2)
    try:
        connection.call(lambda c: c.put(connection.key("k"), "v"), "put k")
        assert connection.member == f"127.0.0.1:{port}"
        assert connection.call(lambda c: c.get(connection.key("k")), "get k") == [b"v"]
    finally:
        connection.close()


def test_no_member_answers_is_store_unavailable(etcd_server) -> None:  # type: ignore[no-untyped-def]
    connection = EtcdConnection(parse_etcd_url(etcd_server.url), timeout=2)
    etcd_server.kill()
    try:
        with pytest.raises(StoreUnavailable, match="etcd cannot be reached for get k"):
            connection.call(lambda c: c.get(connection.key("k")), "get k")
    finally:
        connection.close()
