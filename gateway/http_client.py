"""The upstream HTTP/1.1 client: keep-alive connections, a POST per call, its answer read whole or as
it arrives.

aiohttp's client spent about 30 % of a model call's CPU in the gateway (bench/README.md), for what a
call needs of it: one POST of a body already encoded, a status, a content type and a body. This
client does that alone, on asyncio protocols with httptools (the C parser uvicorn uses) reading the
responses, chunked or not:

- connections are kept per origin (scheme, host, port), reused newest first, closed after
  ``IDLE_SECONDS`` unused or when the upstream says so; at most ``size`` are in use at once;
- one deadline per call covers connecting, sending and reading the whole answer (``timeout``), and
  connecting has its own (``connect_timeout``): past either, :class:`UpstreamTimeout`;
- a connection refused, reset or closed before the answer is whole is :class:`UpstreamUnreachable`;
- an answer streamed faster than it is read pauses reading from its connection (``BUFFER_BYTES``).

It sends no ``Accept-Encoding``, so answers come as they are relayed: unencoded.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from functools import cache
from urllib.parse import urlsplit

import httptools

IDLE_SECONDS = 15.0  # a connection unused for longer may have been closed by the upstream: not reused
BUFFER_BYTES = 1 << 20  # of an answer received and not yet read, before its connection stops reading


class UpstreamError(Exception):
    """The upstream call failed before the upstream answered in full."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer in time (→ 504)."""


class UpstreamUnreachable(UpstreamError):
    """The upstream could not be reached or dropped the connection (→ 502)."""


@cache
def _target(url: str) -> tuple[tuple[str, str, int], bytes, bytes]:
    """An upstream URL's origin (scheme, host, port), request target and Host header."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamUnreachable(f"Not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.netloc.rpartition("@")[2]
    return (parts.scheme, parts.hostname, port), target.encode(), host.encode("idna")


def _head(target: bytes, host: bytes, headers: Mapping[str, str], length: int) -> bytes:
    lines = [b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n" % (target, host, length)]
    for name, value in headers.items():
        line = f"{name}: {value}\r\n"
        if "\n" in line[:-2] or "\r" in line[:-2]:
            raise UpstreamUnreachable(f"The header {name!r} has a line break in it.")
        lines.append(line.encode("latin1"))
    lines.append(b"\r\n")
    return b"".join(lines)


class Response:
    """An upstream's answer: its status and content type at once, its body read whole or chunk by
    chunk; ``close`` it when done (reading it whole does)."""

    __slots__ = ("_connection", "_size", "_waiter", "chunks", "complete", "content_type", "error", "status")

    def __init__(self, connection: _Connection) -> None:
        self._connection: _Connection | None = connection
        self.status = 0
        self.content_type = "application/json"
        self.chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self.complete = False
        self.error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None

    # --- what the connection tells it

    def feed(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self._size += len(chunk)
        if self._size > BUFFER_BYTES and self._connection is not None:
            self._connection.pause()
        self._wake()

    def end(self, error: UpstreamError | None = None) -> None:
        if error is None:
            self.complete = True
        elif not self.complete and self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _more(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter
        self._waiter = None

    # --- what the caller does

    async def read(self) -> bytes:
        try:
            while not self.complete and self.error is None:
                await self._more()
            if self.error is not None:
                raise self.error
            return b"".join(self.chunks)
        finally:
            await self.close()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        while True:
            while self.chunks:
                chunk = self.chunks.popleft()
                self._size -= len(chunk)
                if self._size <= BUFFER_BYTES // 2 and self._connection is not None:
                    self._connection.resume()
                yield chunk
            if self.error is not None:
                raise self.error
            if self.complete:
                return
            await self._more()

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.done(reusable=self.complete and self.error is None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an origin, carrying one call at a time."""

    def __init__(self, pool: Client, origin: tuple[str, str, int]) -> None:
        self.pool, self.origin = pool, origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.head: asyncio.Future[None] | None = None  # set once the response's head has arrived
        self.framed = False  # the response says where its body ends (a length, or chunks)
        self.deadline: asyncio.TimerHandle | None = None
        self.keep_alive = True
        self.open = False
        self.idle_since = 0.0

    # --- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.open = True

    def data_received(self, data: bytes) -> None:
        if self.response is None:
            self._close()  # nothing was asked: an idle connection that talks is not to be trusted
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamUnreachable(f"The upstream's answer could not be read: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if exc is None and self.head is not None and self.head.done() and not self.framed:
            self.on_message_complete()  # an answer with neither length nor chunks ends with its connection
            return
        self._fail(UpstreamUnreachable(f"The upstream closed the connection{f': {exc}' if exc else ''}."))

    # --- httptools

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-type" and self.response is not None:
            self.response.content_type = value.decode("latin1")
        elif name in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        assert self.response is not None and self.head is not None
        self.response.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response.feed(body)

    def on_message_complete(self) -> None:
        assert self.response is not None
        self._stop_deadline()
        self.response.end()

    # --- one call

    def start(self, head: bytes, body: bytes, timeout: float) -> Response:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.response, self.framed = Response(self), False
        self.head = loop.create_future()
        self.deadline = loop.call_later(timeout, self._expire)
        self.transport.write(head + body)
        return self.response

    def _expire(self) -> None:
        self.deadline = None
        self._fail(UpstreamTimeout("The upstream did not answer in time."))
        self._close()

    def _stop_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _fail(self, error: UpstreamError) -> None:
        self._stop_deadline()
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
        if self.response is not None:
            self.response.end(error)

    def pause(self) -> None:
        if self.transport is not None and self.open:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and self.open:
            self.transport.resume_reading()

    def done(self, *, reusable: bool) -> None:
        """The call's response was read or closed: back to the pool, or closed."""
        self._stop_deadline()
        self.response, self.head = None, None
        if reusable and self.keep_alive and self.open:
            self.resume()
            self.parser = httptools.HttpResponseParser(self)
            self.idle_since = time.monotonic()
            self.pool.put(self)
        else:
            self._close()
        self.pool.slots.release()

    def _close(self) -> None:
        self.open = False
        if self.transport is not None:
            self.transport.close()


class Client:
    """This event loop's upstream connections."""

    def __init__(self, size: int) -> None:
        self.slots = asyncio.Semaphore(size)  # calls in flight, each on a connection of its own
        self.idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self.tls: ssl.SSLContext | None = None

    def put(self, connection: _Connection) -> None:
        self.idle.setdefault(connection.origin, []).append(connection)

    def _reuse(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self.idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.open and now - connection.idle_since < IDLE_SECONDS:
                return connection
            connection._close()
        return None

    async def _connect(self, origin: tuple[str, str, int], connect_timeout: float) -> _Connection:
        scheme, host, port = origin
        context = None
        if scheme == "https":
            if self.tls is None:
                self.tls = ssl.create_default_context()
            context = self.tls
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                _, connection = await loop.create_connection(lambda: _Connection(self, origin), host, port, ssl=context)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"Connecting to {host}:{port} timed out.") from exc
        except OSError as exc:
            raise UpstreamUnreachable(f"Cannot connect to {host}:{port}: {exc}") from exc
        return connection

    async def send(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float, connect_timeout: float
    ) -> Response:
        """POST the body; returns once the answer's head has arrived. Raises UpstreamError."""
        origin, target, host = _target(url)
        head = _head(target, host, headers, len(body))
        started = time.monotonic()
        await self.slots.acquire()
        try:
            connection = self._reuse(origin) or await self._connect(origin, min(connect_timeout, timeout))
        except BaseException:
            self.slots.release()
            raise
        response = connection.start(head, body, max(timeout - (time.monotonic() - started), 0.001))
        assert connection.head is not None
        try:
            await connection.head
        except BaseException:
            await response.close()
            raise
        return response

    async def aclose(self) -> None:
        for connections in self.idle.values():
            for connection in connections:
                connection._close()
        self.idle.clear()
