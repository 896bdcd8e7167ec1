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
import json
import os
import sys
import time

try:
    import orjson

    def dumps(obj):
        return orjson.dumps(obj)

    loads = orjson.loads
except ImportError:  # pragma: no cover - stdlib fallback
    orjson = None

    def dumps(obj):
        return json.dumps(obj, separators=(",", ":")).encode()

    loads = json.loads

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

# The completion text, one token per SSE content chunk.
PIECES = ["The", " gateway", " forwards", " this", " request", " to", " the", " upstream", " and", " back."]
REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed", 413: b"Payload Too Large"}
MAX_BODY = 16 * 1024 * 1024
MODELS = ["bench-model", "bench-embed", "gpt-4o-mini", "text-embedding-3-small"]


class Config:
    delay = 0.0
    chunk_delay = 0.0
    embed_dim = 64


class Counter:
    n = 0


def next_id():
    Counter.n += 1
    return Counter.n


# ---------------------------------------------------------------- token estimates


def count_tokens(value):
    """A rough tokenizer: about 4 characters a token, like English text."""
    if value is None:
        return 0
    if isinstance(value, str):
        return max(1, (len(value) + 3) // 4)
    if isinstance(value, list):
        return sum(count_tokens(v) for v in value)
    if isinstance(value, dict):
        # content parts like {"type": "text", "text": "..."}
        return count_tokens(value.get("text") or value.get("content"))
    return 1


def prompt_tokens_of_messages(messages):
    if not isinstance(messages, list):
        return 1
    return sum(4 + count_tokens(m.get("content") if isinstance(m, dict) else m) for m in messages) + 3


def completion_pieces(req):
    limit = req.get("max_completion_tokens") or req.get("max_tokens") or req.get("max_output_tokens")
    if isinstance(limit, int) and 0 < limit < len(PIECES):
        return PIECES[:limit], "length"
    return PIECES, "stop"


# ---------------------------------------------------------------- handlers
# Each returns (status, content_type, body_bytes) or ("sse", [event bytes, ...]).


def error(status, message, typ="invalid_request_error"):
    return status, b"application/json", dumps({"error": {"message": message, "type": typ, "code": None}})


def chat_completions(req):
    model = req.get("model") or "bench-model"
    pieces, finish = completion_pieces(req)
    prompt = prompt_tokens_of_messages(req.get("messages"))
    completion = len(pieces)
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }
    cid = f"chatcmpl-mock{next_id()}"
    created = int(time.time())
    if not req.get("stream"):
        body = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(pieces), "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage,
        }
        return 200, b"application/json", dumps(body)

    def chunk(delta, finish_reason=None, with_choice=True, usage_block=None):
        obj = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
            if with_choice
            else [],
        }
        if usage_block is not None:
            obj["usage"] = usage_block
        return b"data: " + dumps(obj) + b"\n\n"

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events.extend(chunk({"content": p}) for p in pieces)
    events.append(chunk({}, finish_reason=finish))
    opts = req.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage"):
        events.append(chunk(None, with_choice=False, usage_block=usage))
    events.append(b"data: [DONE]\n\n")
    return "sse", events


def embeddings(req):
    inp = req.get("input")
    items = inp if isinstance(inp, list) and inp and not isinstance(inp[0], int) else [inp]
    dim = Config.embed_dim
    data = []
    for i, _ in enumerate(items):
        vec = [round(((i + 1) * (j + 3) % 97) / 97.0 - 0.5, 6) for j in range(dim)]
        data.append({"object": "embedding", "index": i, "embedding": vec})
    tokens = count_tokens(
        items if not isinstance(inp, list) or not inp or not isinstance(inp[0], int) else "x" * 4 * len(inp)
    )
    body = {
        "object": "list",
        "data": data,
        "model": req.get("model") or "bench-embed",
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return 200, b"application/json", dumps(body)


def responses(req):
    model = req.get("model") or "bench-model"
    pieces, finish = completion_pieces(req)
    inp = req.get("input")
    in_tokens = count_tokens(inp) if isinstance(inp, str) else prompt_tokens_of_messages(inp)
    in_tokens += count_tokens(req.get("instructions"))
    out_tokens = len(pieces)
    rid = f"resp_mock{next_id()}"
    text = "".join(pieces)
    message = {
        "type": "message",
        "id": f"msg_mock{Counter.n}",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    body = {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed" if finish == "stop" else "incomplete",
        "incomplete_details": None if finish == "stop" else {"reason": "max_output_tokens"},
        "error": None,
        "model": model,
        "output": [message],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": in_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": out_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": in_tokens + out_tokens,
        },
    }
    if not req.get("stream"):
        return 200, b"application/json", dumps(body)
    # Minimal Responses API event stream.
    events = []
    seq = 0

    def ev(name, obj):
        nonlocal seq
        obj["type"] = name
        obj["sequence_number"] = seq
        seq += 1
        events.append(b"event: " + name.encode() + b"\ndata: " + dumps(obj) + b"\n\n")

    pending = dict(body, status="in_progress", output=[], usage=None)
    ev("response.created", {"response": pending})
    for p in pieces:
        ev("response.output_text.delta", {"item_id": message["id"], "output_index": 0, "content_index": 0, "delta": p})
    ev("response.output_text.done", {"item_id": message["id"], "output_index": 0, "content_index": 0, "text": text})
    ev("response.completed", {"response": body})
    return "sse", events


def models(_req):
    data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "mock"} for m in MODELS]
    return 200, b"application/json", dumps({"object": "list", "data": data})


POST_ROUTES = {
    b"/v1/chat/completions": chat_completions,
    b"/v1/embeddings": embeddings,
    b"/v1/responses": responses,
}
GET_ROUTES = {b"/v1/models": models}


def dispatch(method, path, body):
    path = path.split(b"?", 1)[0]
    if method == b"GET":
        if path in GET_ROUTES:
            return GET_ROUTES[path](None)
        if path == b"/health":
            return 200, b"text/plain", b"ok"
        if path in POST_ROUTES:
            return error(405, "use POST")
        return error(404, "no route for GET {}".format(path.decode("latin-1")))
    if method == b"POST":
        handler = POST_ROUTES.get(path)
        if handler is None:
            return error(404, "no route for POST {}".format(path.decode("latin-1")))
        try:
            req = loads(body) if body else {}
        except ValueError:
            return error(400, "request body is not valid JSON")
        if not isinstance(req, dict):
            return error(400, "request body must be a JSON object")
        return handler(req)
    return error(405, "method not allowed")


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
