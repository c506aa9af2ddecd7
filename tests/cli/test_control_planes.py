"""cli/control_planes.py: the `--control-plane` URLs of every replica, asked in order.

`ReplicaURLs.ask` on its own with a plain function (which URLs are "down" is the test's
choice); the commands that use it (status, rollback) are tested against real control
planes and fake servers in test_status_replicas.py, test_status_rollback.py and
test_rollback_replicas.py.
"""

from __future__ import annotations

import pytest

from starmesh.cli.control_client import base_url
from starmesh.cli.control_planes import ReplicaURLs
from starmesh.cli.errors import InputError


def test_the_replica_that_answered_is_asked_first_next_time() -> None:
    asked: list[str] = []

    def call(url: str) -> str:
        asked.append(url)
        if url in down:
            raise InputError(f"{url} is down")
        return url.upper()

    down = {"a"}
    urls = ReplicaURLs(["a", "b", "c", "b"])  # a repeated URL is asked once
    assert urls.urls == ("a", "b", "c")
    reached = urls.ask(call)
    assert (reached.value, reached.url, reached.skipped) == ("B", "b", ("a is down",))
    assert asked == ["a", "b"] and urls.urls == ("b", "a", "c")
    down = {"b"}
    asked.clear()
    reached = urls.ask(call)
    assert (reached.url, reached.skipped, asked) == ("a", ("b is down",), ["b", "a"])
    down = {"a", "b", "c"}
    with pytest.raises(InputError, match=r"^none of the 3 --control-plane URLs answered: a is down; b is down; c is down$"):
        urls.ask(call)
    with pytest.raises(ValueError, match="no --control-plane URL"):
        ReplicaURLs([])


def test_one_url_fails_with_its_own_reason() -> None:
    def down(url: str) -> str:
        raise InputError(f"{url} is down")

    with pytest.raises(InputError, match=r"^a is down$"):  # as before replicas existed
        ReplicaURLs(["a"]).ask(down)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("127.0.0.1:7000", "is not an http:// or https:// URL with a host"),
        ("ftp://127.0.0.1", "is not an http:// or https:// URL with a host"),
        ("http://127.0.0.1:7000/?x=1", "give the base URL, without a query or fragment"),
        ("http://127.0.0.1:7000/#top", "give the base URL, without a query or fragment"),
    ],
)
def test_base_url_refuses_what_is_not_a_base_url(url: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        base_url(url)


def test_base_url_drops_a_trailing_slash() -> None:
    assert base_url("https://cp-0:8443/") == "https://cp-0:8443"
    assert base_url("http://127.0.0.1:8080/prefix") == "http://127.0.0.1:8080/prefix"
