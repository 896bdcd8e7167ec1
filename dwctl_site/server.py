"""The production server: uvicorn (uvloop + httptools) bounded against clients that hold on.

uvicorn's httptools protocol puts no limit on a request head (the parser keeps, and copies again,
a header value while it grows) and no deadline on reading one, and ``--limit-concurrency`` looks at
a connection only once its head is complete: a client trickling its head is never refused, and the
refusal is plain text. ``GatewayHttpProtocol`` adds, per connection and per process:

- a head larger than ``GATEWAY_MAX_HEADER_BYTES`` gets a 431 before more of it is kept;
- a head not complete ``GATEWAY_HEADER_TIMEOUT`` seconds after the connection or its first byte,
  or a body with no byte for ``GATEWAY_BODY_TIMEOUT`` seconds, gets a 408 (a connection that sent
  nothing, or whose response has begun, is only closed);
- beyond ``GATEWAY_MAX_CONNECTIONS`` a connection gets a 503 at once, and beyond twice as many it is
  closed at once, so client sockets never take the descriptors that upstream calls need.

Under ``/ai/`` these answers are OpenAI error envelopes. A well-behaved request pays for none of
this but a few attribute checks: timers are armed per connection, and per request only when its
head or body arrives in more than one read.

``python -m dwctl_site.server [uvicorn options]`` raises the open-file limit, shortens the GIL's switch
interval and runs uvicorn with this protocol and the project's defaults (README.md, "Production").
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import resource
import sys
from asyncio.events import TimerHandle
from dataclasses import dataclass
from typing import Any, NamedTuple

from django.conf import settings
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

logger = logging.getLogger(__name__)

API_PREFIX = b"/ai/"
# After its answer, a refused connection is read (and the bytes dropped) until the client closes,
# for at most this long: closing with unread input would reset the connection, and a client still
# sending its head would see the reset instead of the answer.
LINGER_SECONDS = 5.0
# Descriptors a process needs besides client and upstream sockets: the database, Redis, the
# listening socket, the event loop's own, log files.
FILES_OF_ITS_OWN = 100
# How long a thread keeps the GIL while another waits for it (Python's default: 5 ms). While the
# usage writer's thread works through a batch, the event loop waits for the GIL at every wake-up; at
# 5 ms that wait made the p99 of a lone client's calls 6.7 ms against a p50 of 0.6 ms (bench/RESULTS.md).
GIL_SWITCH_SECONDS = 0.0005
DEFAULT_ARGS = [
    "dwctl_site.asgi:application",
    "--loop",
    "uvloop",
    "--http",
    "dwctl_site.server:GatewayHttpProtocol",
    "--no-access-log",
    "--lifespan",
    "on",
]


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_header_bytes: int
    header_timeout: float
    body_timeout: float
    max_connections: int


@functools.cache
def server_limits() -> ServerLimits:
    return ServerLimits(
        max_header_bytes=settings.GATEWAY_MAX_HEADER_BYTES,
        header_timeout=float(settings.GATEWAY_HEADER_TIMEOUT),
        body_timeout=float(settings.GATEWAY_BODY_TIMEOUT),
        max_connections=settings.GATEWAY_MAX_CONNECTIONS,
    )


class Refusal(NamedTuple):
    """One answer of the server itself, whole and ready to write: for /ai/ and for any other path."""

    api: bytes
    plain: bytes

    def response(self, target: bytes) -> bytes:
        return self.api if target.startswith(API_PREFIX) else self.plain


class Refusals(NamedTuple):
    headers_too_large: Refusal
    headers_timeout: Refusal
    body_timeout: Refusal
    busy: Refusal


@functools.cache
def refusals() -> Refusals:
    # gateway.errors needs the app registry, which is ready once the first connection arrives.
    from gateway import errors

    limits = server_limits()

    def refusal(status: int, code: str, message: str, *extra: bytes) -> Refusal:
        def whole(content_type: bytes, body: bytes) -> bytes:
            head = [STATUS_LINE[status], b"content-type: ", content_type, b"\r\n", *extra]
            head += [b"content-length: ", str(len(body)).encode(), b"\r\nconnection: close\r\n\r\n"]
            return b"".join([*head, body])

        return Refusal(
            api=whole(b"application/json", errors.error_body(status, message, code=code)),
            plain=whole(b"text/plain; charset=utf-8", message.encode()),
        )

    return Refusals(
        headers_too_large=refusal(
            431,
            "request_headers_too_large",
            errors.HEADERS_TOO_LARGE_MESSAGE.format(limit=limits.max_header_bytes),
        ),
        headers_timeout=refusal(
            408, "request_timeout", errors.HEADERS_TIMEOUT_MESSAGE.format(seconds=f"{limits.header_timeout:g}")
        ),
        body_timeout=refusal(
            408, "request_timeout", errors.BODY_TIMEOUT_MESSAGE.format(seconds=f"{limits.body_timeout:g}")
        ),
        busy=refusal(503, "server_busy", errors.SERVER_BUSY_MESSAGE, b"retry-after: 1\r\n"),
    )


class CoalescingTransport:
    """A client connection's transport that writes what one turn of the event loop sends it in one
    write: uvicorn writes a response's head, each body message and a chunked stream's end each on
    its own, a system call apiece (measured in bench/: one per JSON answer, two per stream saved)."""

    __slots__ = ("loop", "pending", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport, self.loop = transport, loop
        self.pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self.pending:
            self.loop.call_soon(self.flush)
        self.pending.append(data)

    def flush(self) -> None:
        if self.pending:
            data = b"".join(self.pending)
            self.pending.clear()
            self.transport.write(data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def can_write_eof(self) -> bool:
        return self.transport.can_write_eof()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.transport.get_protocol()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head size limit, head and body deadlines and a connection
    cap, writing each turn's output at once (:class:`CoalescingTransport`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = server_limits()
        self.url = b""
        # Between the end of one message and the end of the next one's head; head_bytes counts
        # what arrived meanwhile (exactly, but for a pipelined head that begins inside a read).
        self.reading_head = True
        self.head_bytes = 0
        self.head_timer: TimerHandle | None = None
        self.body_timer: TimerHandle | None = None
        self.body_read_at = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
        held, cap = len(self.connections), self.limits.max_connections
        if held > cap:
            if held > 2 * cap:
                transport.close()
            else:
                self.hand_over(refusals().busy, target=None)
            return
        self.head_timer = self.loop.call_later(self.limits.header_timeout, self.head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.reading_head:
            room = self.limits.max_header_bytes - self.head_bytes
            if len(data) > room:
                self.receive_past_head_limit(data, room)
                return
            self.head_bytes += len(data)
        super().data_received(data)
        if self.reading_head:
            if self.head_bytes and self.head_timer is None:
                self.head_timer = self.loop.call_later(self.limits.header_timeout, self.head_timed_out)
        else:
            self.body_read_at = self.loop.time()
            if self.body_timer is None:
                self.body_timer = self.loop.call_later(self.limits.body_timeout, self.body_timed_out)

    def receive_past_head_limit(self, data: bytes, room: int) -> None:
        # Parse only what the limit leaves room for: a head that ends within it goes on as usual
        # (the rest of the read is its body, or the next request), one that doesn't is refused.
        super().data_received(data[:room])
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return
        if self.reading_head:
            self.hand_over(refusals().headers_too_large, target=self.url)
            return
        self.data_received(data[room:])

    def on_headers_complete(self) -> None:
        self.reading_head = False
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.reading_head = True
        self.head_bytes = 0
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None
        super().on_message_complete()

    def head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or not self.reading_head:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head waits for the answer to the request before it: the client waits for us.
            self.head_timer = self.loop.call_later(self.limits.header_timeout, self.head_timed_out)
        elif self.head_bytes:
            self.hand_over(refusals().headers_timeout, target=self.url)
        else:
            self.transport.close()

    def body_timed_out(self) -> None:
        self.body_timer = None
        if self.reading_head or self.transport.is_closing() or self.transport.get_protocol() is not self:
            return
        now = self.loop.time()
        if self.flow.read_paused:
            # We stopped reading until the app takes what it has: not the client's delay.
            self.body_read_at = now
        idle = now - self.body_read_at
        if idle < self.limits.body_timeout:
            self.body_timer = self.loop.call_later(self.limits.body_timeout - idle, self.body_timed_out)
        elif self.cycle.response_started:
            # The app has answered, or is answering, without the whole body: only closing is left.
            self.transport.close()
        else:
            self.hand_over(refusals().body_timeout, target=self.url)

    def hand_over(self, refusal: Refusal, *, target: bytes | None) -> None:
        """Leave the connection to a `Refusing` protocol that answers `refusal`; this one is done with it."""
        if self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete:
            # An answer is under way (a pipelined head grew too large): no other can follow it.
            self.transport.close()
            return
        self.cancel_timers()
        self.connections.discard(self)
        if self.cycle is not None and not self.cycle.response_complete:
            # The app, if it waits for the body, reads a disconnect; whatever it sends is dropped.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        Refusing(self.transport, self.connections, refusal, target, self.limits.header_timeout)

    def cancel_timers(self) -> None:
        for timer in (self.head_timer, self.body_timer):
            if timer is not None:
                timer.cancel()
        self.head_timer = self.body_timer = None


class Refusing(asyncio.Protocol):
    """Answers one refusal, then reads and drops what the client sends until it closes (lingers).

    With ``target=None`` (a connection over the cap, not read yet) it first waits, up to
    ``wait_seconds``, for the request line, to answer an /ai/ path with the OpenAI envelope. It
    counts among the server's connections, so refusals too stay within the cap's bound.
    """

    def __init__(
        self,
        transport: asyncio.Transport,
        connections: set[Any],
        refusal: Refusal,
        target: bytes | None,
        wait_seconds: float,
    ) -> None:
        self.transport = transport
        self.connections = connections
        self.refusal = refusal
        self.start = b""
        self.answered = False
        self.loop = asyncio.get_running_loop()
        self.timer = self.loop.call_later(wait_seconds, transport.close)
        connections.add(self)
        transport.set_protocol(self)
        if target is not None:
            self.answer(target)

    def answer(self, target: bytes) -> None:
        self.answered = True
        self.transport.write(self.refusal.response(target))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.timer.cancel()
        self.timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return
        self.start += data
        # The request line starts "METHOD /path": its first bytes tell an API path from any other.
        _method, _space, target = self.start.partition(b" ")
        if len(target) >= len(API_PREFIX) or b"\n" in self.start or len(self.start) > 1024:
            self.answer(target)

    def eof_received(self) -> None:
        # The client is done: the transport closes (after writing what is left of the answer).
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        self.connections.discard(self)

    def shutdown(self) -> None:
        """Called by uvicorn on every connection when the server stops."""
        self.transport.close()


def raise_open_file_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; return the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        # An unlimited hard limit may not be set as the soft one (macOS): keep what we have.
        return soft
    return hard


def check_open_file_limit(open_files: int) -> None:
    """Warn at start when the open-file limit cannot hold the connections the settings allow."""
    cap = settings.GATEWAY_MAX_CONNECTIONS
    needed = 2 * cap + settings.GATEWAY_UPSTREAM_POOL_SIZE + FILES_OF_ITS_OWN
    if open_files < needed:
        logger.warning(
            "This process may open %d files, but %d client connections (twice GATEWAY_MAX_CONNECTIONS=%d: "
            "served and refused), GATEWAY_UPSTREAM_POOL_SIZE=%d upstream connections and its own files need "
            "about %d. Raise the limit (LimitNOFILE= in systemd, --ulimit nofile= in Docker) or lower the settings.",
            open_files,
            2 * cap,
            cap,
            settings.GATEWAY_UPSTREAM_POOL_SIZE,
            needed,
        )


def main(argv: list[str]) -> None:
    """Start the gateway: the open-file limit raised, uvicorn with this protocol; uvicorn options may follow."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dwctl_site.settings")
    check_open_file_limit(raise_open_file_limit())
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    from uvicorn.main import main as uvicorn_cli

    # Later options win: anything given on the command line overrides the defaults.
    uvicorn_cli(args=[*DEFAULT_ARGS, *argv], prog_name="python -m dwctl_site.server")


if __name__ == "__main__":
    main(sys.argv[1:])
