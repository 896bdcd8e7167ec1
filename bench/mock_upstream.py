#!/usr/bin/env python3
"""A fast fake OpenAI upstream for benchmarks.

It is a small HTTP/1.1 server written directly on asyncio Protocols (no framework),
with keep-alive and pipelined requests. It uses uvloop and orjson when they can be
imported and falls back to the standard library otherwise.

Routes:
  POST /v1/chat/completions   JSON with a usage block, or SSE when "stream": true
  POST /v1/embeddings         one vector per input
  POST /v1/responses          Responses API object with usage.input_tokens/output_tokens
  GET  /v1/models             a fixed model list
  GET  /health                "ok"

Options (flags win over the environment):
  --host / MOCK_HOST            default 127.0.0.1
  --port / MOCK_PORT            default 8001
  --delay-ms / MOCK_DELAY_MS    fixed delay before every response (default 0)
  --chunk-delay-ms / MOCK_CHUNK_DELAY_MS   delay between SSE chunks (default 0)
  --embed-dim / MOCK_EMBED_DIM  embedding length (default 64)
"""

import argparse
import asyncio
import os
import sys

from mock_api import MAX_BODY, REASONS, Config, dispatch, error, orjson

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

# ---------------------------------------------------------------- HTTP/1.1 protocol


class HTTPProtocol(asyncio.Protocol):
    __slots__ = ("buf", "busy", "closed", "loop", "transport")

    def __init__(self):
        self.transport = None
        self.buf = bytearray()
        self.busy = False  # a delayed/streaming response is in flight
        self.closed = False
        self.loop = asyncio.get_event_loop()

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.closed = True

    def data_received(self, data):
        self.buf += data
        if not self.busy:
            self.process()

    def process(self):
        """Handle every complete request in the buffer, in order."""
        while not self.busy and not self.closed:
            req = self.parse_one()
            if req is None:
                return
            method, path, body, keep_alive = req
            result = dispatch(method, path, body)
            if Config.delay > 0 or (result[0] == "sse" and Config.chunk_delay > 0):
                self.busy = True
                self.loop.create_task(self.respond_later(result, keep_alive))
                return
            self.write_result(result, keep_alive)

    def parse_one(self):
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > 65536:
                self.fail(413)
            return None
        head = bytes(buf[:end]).split(b"\r\n")
        try:
            method, path, version = head[0].split(b" ", 2)
        except ValueError:
            self.fail(400)
            return None
        length = 0
        chunked = False
        conn = b""
        for line in head[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    self.fail(400)
                    return None
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                conn = value.strip().lower()
        start = end + 4
        if chunked:
            parsed = self.parse_chunked(start)
            if parsed is None:
                return None
            body, consumed = parsed
        else:
            if length > MAX_BODY:
                self.fail(413)
                return None
            if len(buf) - start < length:
                return None
            body = bytes(buf[start : start + length])
            consumed = start + length
        del buf[:consumed]
        keep_alive = conn == b"keep-alive" if version == b"HTTP/1.0" else conn != b"close"
        return method, path, body, keep_alive

    def parse_chunked(self, pos):
        buf = self.buf
        parts = []
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            try:
                size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
            except ValueError:
                self.fail(400)
                return None
            pos = eol + 2
            if size == 0:
                # skip trailers up to the empty line
                while True:
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        return None
                    if eol == pos:
                        return b"".join(parts), eol + 2
                    pos = eol + 2
            if len(buf) < pos + size + 2:
                return None
            parts.append(bytes(buf[pos : pos + size]))
            pos += size + 2

    def fail(self, status):
        self.write_result(error(status, "bad request"), False)

    @staticmethod
    def head(status, ctype, extra, keep_alive):
        return b"".join(
            [
                b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Error")),
                b"Content-Type: ",
                ctype,
                b"\r\n",
                extra,
                b"Connection: keep-alive\r\n\r\n" if keep_alive else b"Connection: close\r\n\r\n",
            ]
        )

    def write_result(self, result, keep_alive):
        t = self.transport
        if result[0] == "sse":
            out = [
                self.head(
                    200, b"text/event-stream", b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n", keep_alive
                )
            ]
            for event in result[1]:
                out.append(b"%x\r\n%s\r\n" % (len(event), event))
            out.append(b"0\r\n\r\n")
            t.write(b"".join(out))
        else:
            status, ctype, body = result
            t.write(self.head(status, ctype, b"Content-Length: %d\r\n" % len(body), keep_alive) + body)
        if not keep_alive:
            t.close()
            self.closed = True

    async def respond_later(self, result, keep_alive):
        try:
            if Config.delay > 0:
                await asyncio.sleep(Config.delay)
            if self.closed:
                return
            if result[0] == "sse" and Config.chunk_delay > 0:
                t = self.transport
                t.write(
                    self.head(
                        200,
                        b"text/event-stream",
                        b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n",
                        keep_alive,
                    )
                )
                for i, event in enumerate(result[1]):
                    if i:
                        await asyncio.sleep(Config.chunk_delay)
                    if self.closed:
                        return
                    t.write(b"%x\r\n%s\r\n" % (len(event), event))
                t.write(b"0\r\n\r\n")
                if not keep_alive:
                    t.close()
                    self.closed = True
            else:
                self.write_result(result, keep_alive)
        finally:
            self.busy = False
        if self.buf and not self.closed:
            self.process()


# ---------------------------------------------------------------- main


def env_float(name, default):
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def main(argv=None):
    ap = argparse.ArgumentParser(description="Fast fake OpenAI upstream for benchmarks")
    ap.add_argument("--host", default=os.environ.get("MOCK_HOST", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("MOCK_PORT", "8001")))
    ap.add_argument("--delay-ms", type=float, default=env_float("MOCK_DELAY_MS", 0))
    ap.add_argument("--chunk-delay-ms", type=float, default=env_float("MOCK_CHUNK_DELAY_MS", 0))
    ap.add_argument("--embed-dim", type=int, default=int(os.environ.get("MOCK_EMBED_DIM", "64")))
    args = ap.parse_args(argv)
    Config.delay = args.delay_ms / 1000.0
    Config.chunk_delay = args.chunk_delay_ms / 1000.0
    Config.embed_dim = args.embed_dim

    if uvloop is not None:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(
        loop.create_server(HTTPProtocol, args.host, args.port, reuse_address=True, backlog=4096)
    )
    print(
        f"mock upstream on http://{args.host}:{args.port} (delay {args.delay_ms:.1f} ms, "
        f"loop={'uvloop' if uvloop else 'asyncio'}, json={'orjson' if orjson else 'json'})",
        file=sys.stderr,
        flush=True,
    )
    try:
        loop.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()
