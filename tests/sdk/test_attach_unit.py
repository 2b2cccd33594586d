"""``elect`` against a real Redis, with the worker's part played by the test."""

from __future__ import annotations

import threading

import pytest
import redis

from pluto._attach import CreateRequest, Election, elect
from pluto.protocol import Keys
from tests.helpers import wait_until

pytestmark = pytest.mark.integration


def _waiter(r: redis.Redis, keys: Keys, out: list[Election]) -> threading.Thread:
    """A process waiting for another's create, once it blocks on the announce stream."""
    blocked = int(r.info("clients")["blocked_clients"])
    req = CreateRequest("p", "r1", "mine", None, None)
    client = redis.Redis(connection_pool=r.connection_pool)
    thread = threading.Thread(
        target=lambda: out.append(elect(client, keys, req, 10.0, 20.0, "redis")))
    thread.start()
    wait_until(lambda: int(r.info("clients")["blocked_clients"]) > blocked, 10, "XREAD BLOCK")
    return thread


def test_a_waiter_takes_the_run_name_from_the_announce(r: redis.Redis, keys: Keys) -> None:
    """Woken by the worker's announce, a waiter has the run's id and name from it (the info
    hash is not even there): no second round trip after the wake."""
    r.set(keys.run("p", "r1"), "pending:someone-else", px=10_000)  # another process creates
    out: list[Election] = []
    thread = _waiter(r, keys, out)
    r.set(keys.run("p", "r1"), "42")
    r.xadd(keys.announce("p", "r1"), {"id": "42", "name": "the creator's"})
    thread.join(10)
    assert out == [Election(42, True, "the creator's")]


def test_an_announce_without_a_name_or_for_another_id_names_nothing(r: redis.Redis,
                                                                    keys: Keys) -> None:
    """A resumed run's announce carries no name, and an entry that does not match the run key
    is not trusted: ``init`` then reads the name from the run's info hash."""
    r.set(keys.run("p", "r1"), "pending:someone-else", px=10_000)
    out: list[Election] = []
    thread = _waiter(r, keys, out)
    r.set(keys.run("p", "r1"), "43")
    r.xadd(keys.announce("p", "r1"), {"id": "7", "name": "stale"})
    thread.join(10)
    assert out == [Election(43, True, None)]
