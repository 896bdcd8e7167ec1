"""A pipelined connection to Redis for the hot path: one per event loop, commands written as they
come and their answers read back in order.

redis-py's asyncio client costs a few hundred microseconds of CPU per command (a pool checkout,
its command packing, a pure-Python reply parser, a lock), measured in bench/ as most of what a call
with Redis costs more than one without. The gateway sends Redis only a few kinds of command from
the event loop, so this connection does only that: every command sent in one turn of the loop goes
out in one write, and hiredis's C reader parses the replies.

Replies are those of redis-py with ``decode_responses`` off (bytes, ints, lists); failures raise
redis-py's exceptions (``ConnectionError``, ``NoScriptError``, ``ResponseError``), so callers catch
``redis.RedisError`` as before. A lost connection fails the commands in flight and the next command
connects again. It speaks RESP2 over TCP, TLS (``rediss://``) or a Unix socket, with the URL's
password, user and database, as redis-py reads them.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Any

import hiredis
from redis import exceptions
from redis.connection import SSLConnection, UnixDomainSocketConnection, parse_url

CONNECT_TIMEOUT_SECONDS = 5.0


class ReplyError(Exception):
    """What hiredis makes of an error reply; turned into redis-py's exception for it."""


def as_redis_error(error: ReplyError) -> exceptions.RedisError:
    message = str(error)
    if message.startswith("NOSCRIPT"):
        return exceptions.NoScriptError(message)
    if message.startswith(("NOAUTH", "WRONGPASS")):
        return exceptions.AuthenticationError(message)
    return exceptions.ResponseError(message)


def pack(args: tuple[Any, ...]) -> bytes:
    """A command in RESP: an array of bulk strings (bytes as they are, str in UTF-8, numbers as text)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bool):
            raise TypeError("Redis has no booleans: send 0 or 1")
        elif isinstance(arg, int):
            data = b"%d" % arg
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            raise TypeError(f"cannot send {type(arg).__name__} to Redis")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.reader = hiredis.Reader(replyError=ReplyError)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.wire.connected(self)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.wire.waiting
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.wire.lost(self, exc)
                return
            if reply is False:
                return
            future = waiting.popleft()
            if future.done():  # its caller gave up waiting
                continue
            if isinstance(reply, ReplyError):
                future.set_exception(as_redis_error(reply))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.wire.lost(self, exc)


class Wire:
    """The connection of one event loop. :meth:`call` may be used from that loop only."""

    def __init__(self, url: str) -> None:
        options = parse_url(url)
        self.unix_path: str | None = options.get("path")
        self.host = options.get("host", "localhost")
        self.port = int(options.get("port", 6379))
        self.tls = options.get("connection_class") is SSLConnection
        assert options.get("connection_class") in (None, SSLConnection, UnixDomainSocketConnection)
        hello: list[tuple[Any, ...]] = []
        if options.get("password") is not None:
            user = options.get("username")
            hello.append(("AUTH", user, options["password"]) if user else ("AUTH", options["password"]))
        if options.get("db"):
            hello.append(("SELECT", int(options["db"])))
        self.hello = hello
        self.protocol: _Protocol | None = None
        self.greetings: list[asyncio.Future[Any]] = []  # the replies to AUTH and SELECT, while connecting
        self.connecting: asyncio.Task[None] | None = None
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.outgoing: list[bytes] = []  # packed commands to write at the end of this turn

    def call(self, *args: Any) -> asyncio.Future[Any]:
        """Send a command with the others of this turn; the future gets its reply or its RedisError."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.waiting.append(future)
        self.outgoing.append(pack(args))
        if len(self.outgoing) == 1:
            if self.protocol is not None:
                loop.call_soon(self._write)
            elif self.connecting is None:
                self.connecting = loop.create_task(self._connect())
        return future

    def _write(self) -> None:
        outgoing, self.outgoing = self.outgoing, []
        if self.protocol is None or self.protocol.transport is None:
            return  # lost meanwhile: its commands were failed with it
        self.protocol.transport.write(b"".join(outgoing))

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                if self.unix_path is not None:
                    await loop.create_unix_connection(lambda: _Protocol(self), self.unix_path)
                else:
                    context = ssl.create_default_context() if self.tls else None
                    await loop.create_connection(lambda: _Protocol(self), self.host, self.port, ssl=context)
                await asyncio.gather(*self.greetings)
        except (OSError, TimeoutError, exceptions.RedisError) as exc:
            self.lost(self.protocol, exc)
        finally:
            self.connecting = None
            self.greetings = []

    def connected(self, protocol: _Protocol) -> None:
        """A new connection: its greeting goes first, then what was queued while it was made."""
        assert protocol.transport is not None
        loop = asyncio.get_running_loop()
        self.greetings = [loop.create_future() for _ in self.hello]
        self.waiting.extendleft(reversed(self.greetings))
        protocol.transport.write(b"".join(pack(command) for command in self.hello))
        self.protocol = protocol
        self._write()

    def lost(self, protocol: _Protocol | None, exc: BaseException | None) -> None:
        """The connection is gone (or never came): every command waiting fails; the next one connects."""
        if protocol is not None and protocol is not self.protocol:
            return  # an older connection's last words: it was let go already
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.abort()
        self.protocol = None
        waiting, self.waiting = self.waiting, collections.deque()
        self.outgoing = []
        error = exc if isinstance(exc, exceptions.RedisError) else exceptions.ConnectionError(f"Redis: {exc or 'gone'}")
        for future in waiting:
            if not future.done():
                future.set_exception(error)

    def close(self) -> None:
        self.lost(self.protocol, exceptions.ConnectionError("closed"))
