"""The upstream HTTP/1.1 client against a real server speaking raw HTTP: how an answer may be framed,
keep-alive and when not to reuse, deadlines, and every way a connection can fail."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.http_client import BUFFER_BYTES, Client, UpstreamTimeout, UpstreamUnreachable
from tests.upstream import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A server answering every request with `answer(request_number)`; counts its connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[bytes] = []

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
        )
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Callable[[RawServer], Handler]], Awaitable[tuple[str, RawServer]]]]:
    """Start a server whose connections `make(state)` handles; returns its URL and its state."""
    servers: list[asyncio.Server] = []

    async def start(make: Callable[[RawServer], Handler]) -> tuple[str, RawServer]:
        state = RawServer()
        handler = make(state)

        async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state.connections += 1
            try:
                await handler(reader, writer)
            finally:
                writer.close()

        server = await asyncio.start_server(connected, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1/chat/completions", state

    yield start
    for server in servers:
        server.close()


def keep_answering(*answers: bytes, then_close: bool = False) -> Callable[[RawServer], Handler]:
    def make(state: RawServer) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await state.read_request(reader) is not None:
                writer.write(answers[min(len(state.requests), len(answers)) - 1])
                await writer.drain()
                if then_close:
                    return

        return handler

    return make


OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


async def post(client: Client, url: str, body: bytes = b"{}", timeout: float = 5) -> tuple[int, str, bytes]:
    response = await client.send(url, body, {"Content-Type": "application/json"}, timeout, 2)
    return response.status, response.content_type, await response.read()


async def test_a_call_sends_one_post_with_its_body_and_headers(serve):
    url, state = await serve(keep_answering(OK))
    client = Client(10)

    assert await post(client, url, b'{"model":"m"}') == (200, "application/json", b'{"ok":true}')
    request = state.requests[0]
    assert request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nContent-Type: application/json\r\n" in request and b"\r\nContent-Length: 13\r\n" in request
    assert request.endswith(b'\r\n\r\n{"model":"m"}')
    assert b"accept-encoding" not in request.lower()  # answers come unencoded, as they are relayed


async def test_connections_are_kept_and_reused(serve):
    url, state = await serve(keep_answering(OK))
    client = Client(10)
    for _ in range(5):
        assert (await post(client, url))[0] == 200
    assert state.connections == 1


async def test_a_connection_the_upstream_closes_is_not_reused(serve):
    close = OK.replace(b"Content-Length", b"Connection: close\r\nContent-Length")
    url, state = await serve(keep_answering(close, then_close=True))
    client = Client(10)
    for _ in range(3):
        assert (await post(client, url))[2] == b'{"ok":true}'
    assert state.connections == 3


async def test_an_idle_connection_closed_by_the_upstream_is_dropped_not_used(serve):
    url, state = await serve(keep_answering(OK, then_close=True))  # keep-alive, but it hangs up
    client = Client(10)
    await post(client, url)
    await asyncio.sleep(0.05)  # the upstream's close arrives while the connection is idle
    assert (await post(client, url))[0] == 200
    assert state.connections == 2


async def test_a_chunked_answer_is_read_whole_and_as_it_comes(serve):
    chunked = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"7\r\ndata: 1\r\n7\r\ndata: 2\r\n0\r\n\r\n"
    )
    url, _ = await serve(keep_answering(chunked))
    client = Client(10)
    assert await post(client, url) == (200, "text/event-stream", b"data: 1data: 2")

    response = await client.send(url, b"{}", {}, 5, 2)
    assert b"".join([chunk async for chunk in response.iter_chunks()]) == b"data: 1data: 2"
    await response.close()


def answer_once(raw: bytes, *, then_wait: float = 0) -> Callable[[RawServer], Handler]:
    """A server that answers one request with `raw` (waits `then_wait` seconds) and hangs up."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n{}")
        writer.write(raw)
        await writer.drain()
        await asyncio.sleep(then_wait)

    return lambda _: handler


async def test_an_answer_with_no_length_ends_with_its_connection(serve):
    url, _ = await serve(answer_once(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"a":1}'))
    assert await post(Client(10), url) == (200, "application/json", b'{"a":1}')


async def test_an_answer_cut_before_its_end_is_unreachable(serve):
    url, _ = await serve(answer_once(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"partial'))
    with pytest.raises(UpstreamUnreachable, match="closed the connection"):
        await post(Client(10), url)


async def test_an_answer_slower_than_the_deadline_times_out(serve):
    # The head in time, the body never.
    url, _ = await serve(answer_once(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{", then_wait=5))
    client = Client(1)
    with pytest.raises(UpstreamTimeout):
        await post(client, url, timeout=0.3)
    with pytest.raises(UpstreamTimeout):  # its slot came back: the one-call pool is not stuck
        await post(client, url, timeout=0.3)


async def test_a_refused_connection_is_unreachable():
    with pytest.raises(UpstreamUnreachable, match="Cannot connect"):
        await post(Client(10), f"http://127.0.0.1:{free_port()}/v1/chat/completions")


async def test_a_header_with_a_line_break_is_never_sent():
    with pytest.raises(UpstreamUnreachable, match="line break"):
        await Client(10).send("http://127.0.0.1:9/v1", b"{}", {"Authorization": "Bearer x\r\nEvil: 1"}, 5, 2)


async def test_an_answer_larger_than_the_buffer_arrives_whole_while_read_slowly(serve):
    size = 3 * BUFFER_BYTES
    big = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size
    url, _ = await serve(keep_answering(big))
    response = await Client(10).send(url, b"{}", {}, 10, 2)
    received = 0
    async for chunk in response.iter_chunks():
        received += len(chunk)
        await asyncio.sleep(0)  # a slow reader: the connection pauses and resumes meanwhile
    await response.close()
    assert received == size


async def test_the_pool_holds_calls_beyond_its_size_until_a_connection_is_free(serve):
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n{}")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            await asyncio.sleep(0.05)
            writer.write(OK)
            await writer.drain()

    url, state = await serve(lambda _: handler)
    client = Client(2)
    answers = await asyncio.gather(*[post(client, url) for _ in range(6)])
    assert [status for status, _, _ in answers] == [200] * 6
    assert state.connections == 2
