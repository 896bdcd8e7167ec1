"""The hot path's Redis connection: redis-py's replies and errors, every command of a turn in one
write and answered in order, the URL's database, and a lost connection failing what waits on it."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis
from django.conf import settings

from gateway.redis_wire import Wire, pack
from tests.upstream import free_port


@pytest.fixture
def url() -> str:
    if not settings.REDIS_URL:
        pytest.skip("needs Redis (REDIS_URL)")
    return settings.REDIS_URL


@pytest.fixture
def key() -> str:
    return f"{settings.REDIS_PREFIX}:test:wire:{uuid.uuid4().hex}"


def test_commands_are_packed_as_bulk_strings():
    expected = b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n7\r\n$3\r\n0.5\r\n$2\r\n\xc3\xa9\r\n"
    assert pack(("SET", b"k", 7, 0.5, "é")) == expected
    with pytest.raises(TypeError):
        pack(("SET", "k", True))


async def test_replies_are_those_of_redis_py(url, key):
    wire = Wire(url)
    assert await wire.call("SET", key, "v", "EX", 60) == b"OK"
    assert await wire.call("GET", key) == b"v"
    assert await wire.call("INCRBY", key + ":n", 5) == 5
    assert await wire.call("GET", key + ":missing") is None
    assert await wire.call("EVAL", "return {1, 'two', {3}}", 0) == [1, b"two", [3]]
    assert await wire.call("DEL", key, key + ":n") == 2
    wire.close()


async def test_error_replies_raise_redis_pys_exceptions(url):
    wire = Wire(url)
    with pytest.raises(redis.exceptions.NoScriptError):
        await wire.call("EVALSHA", "0" * 40, 0)
    with pytest.raises(redis.exceptions.ResponseError, match="unknown command"):
        await wire.call("NO-SUCH-COMMAND")
    assert await wire.call("PING") == b"PONG"  # an error answers its own command only
    wire.close()


async def test_the_commands_of_one_turn_go_in_one_write_and_are_answered_in_order(url, key):
    wire = Wire(url)
    await wire.call("PING")  # connected
    sent = [wire.call("RPUSH", key, n) for n in range(50)]
    assert len(wire.outgoing) == 50  # not yet written: they go together at the end of this turn
    assert await asyncio.gather(*sent) == list(range(1, 51))
    assert await wire.call("LRANGE", key, 0, -1) == [str(n).encode() for n in range(50)]
    await wire.call("DEL", key)
    wire.close()


async def test_commands_sent_while_connecting_wait_for_the_connection(url):
    wire = Wire(url)
    first, second = wire.call("PING"), wire.call("ECHO", "x")
    assert await asyncio.gather(first, second) == [b"PONG", b"x"]
    wire.close()


async def test_the_urls_database_is_selected(url, key):
    other = url.rsplit("/", 1)[0] + "/3"
    wire = Wire(other)
    await wire.call("SET", key, "in 3", "EX", 60)
    assert redis.Redis.from_url(other).get(key) == b"in 3"
    assert redis.Redis.from_url(url.rsplit("/", 1)[0] + "/0").get(key) is None
    await wire.call("DEL", key)
    wire.close()


async def test_a_lost_connection_fails_what_waits_and_the_next_command_connects_again(url, key):
    wire = Wire(url)
    name = f"wire-{uuid.uuid4().hex}"
    await wire.call("CLIENT", "SETNAME", name)
    blocked = wire.call("BLPOP", key, 30)  # waits on the server until the connection goes
    await asyncio.sleep(0.1)
    killer = redis.Redis.from_url(url)
    ids = [c["id"] for c in killer.client_list() if c.get("name") == name]
    assert ids, "the wire's connection is listed"
    killer.client_kill_filter(_id=ids[0])

    with pytest.raises(redis.exceptions.ConnectionError):
        await asyncio.wait_for(blocked, 5)
    assert await wire.call("PING") == b"PONG"
    wire.close()


async def test_an_unreachable_redis_fails_fast_with_a_connection_error():
    wire = Wire(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(redis.exceptions.ConnectionError):
        await asyncio.wait_for(wire.call("PING"), 5)
    with pytest.raises(redis.exceptions.ConnectionError):  # and again, each time asked
        await asyncio.wait_for(wire.call("PING"), 5)
