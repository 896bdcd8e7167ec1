"""Calling the upstream, shared by real-time views and flex workers: build, send, relay, usage, failures."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from django.http import StreamingHttpResponse

from gateway import clients, translate
from gateway.errors import UPSTREAM_TIMEOUT_MESSAGE, UPSTREAM_UNREACHABLE_MESSAGE
from gateway.snapshot import ModelEntry

# Fields the gateway answers itself; the upstream call is always a plain synchronous one, and a
# follow-up comes with its whole conversation (gateway.jobs.conversation).
GATEWAY_FIELDS = ("service_tier", "background", "previous_response_id")


def unstreamed(body: dict[str, Any]) -> dict[str, Any]:
    """A request body for a call made without its client (background, queued): not streamed."""
    return {name: value for name, value in body.items() if name not in ("stream", "stream_options")}


def translates(model: ModelEntry, path: str) -> bool:
    """Whether this call is a /responses call its endpoint serves with chat completions (gateway.translate)."""
    return path == "responses" and model.endpoint.translates_responses


def upstream_request(model: ModelEntry, path: str, body: dict[str, Any]) -> tuple[str, bytes, dict[str, str]]:
    """Return url, body and headers for the upstream: its model name, its credential, usage on streams;
    a translated /responses call as the chat completions call that asks the same."""
    if translates(model, path):
        path, forwarded = "chat/completions", translate.chat_request(body)
    else:
        forwarded = {name: value for name, value in body.items() if name not in GATEWAY_FIELDS}
    forwarded["model"] = model.upstream_model
    if path == "chat/completions" and forwarded.get("stream") is True:
        forwarded["stream_options"] = {**(forwarded.get("stream_options") or {}), "include_usage": True}
    headers = {"Content-Type": "application/json", **model.endpoint.auth_headers}
    return f"{model.endpoint.base_url}/{path}", orjson.dumps(forwarded), headers


async def open_upstream(model: ModelEntry, path: str, body: dict[str, Any]) -> clients.UpstreamResponse:
    """Send the call; the caller reads (or streams) and closes the response. Raises clients.UpstreamError."""
    url, payload, headers = upstream_request(model, path, body)
    return await clients.send(
        url,
        payload,
        headers,
        timeout=model.endpoint.timeout_seconds,
        connect_timeout=model.endpoint.connect_timeout_seconds,
    )


def is_event_stream(response: clients.UpstreamResponse) -> bool:
    return response.status < 400 and "text/event-stream" in response.content_type


def usage_tokens(payload: Any) -> tuple[int | None, int | None]:
    """Tokens from a chat/embeddings body, a Responses object, or a `response.completed` event."""
    if not isinstance(payload, dict):
        return None, None
    usage = payload.get("usage")
    if usage is None and isinstance(payload.get("response"), dict):
        usage = payload["response"].get("usage")
    if not isinstance(usage, dict):
        return None, None
    input_tokens = usage.get("prompt_tokens", usage.get("input_tokens"))
    output_tokens = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(input_tokens, int):
        return None, None
    return input_tokens, output_tokens if isinstance(output_tokens, int) else 0


def parse_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


@dataclass(slots=True)
class UpstreamResult:
    """A whole upstream answer: its status, body and, for a success, the usage it reports."""

    status: int
    body: bytes
    content_type: str
    input_tokens: int | None = None
    output_tokens: int | None = None
    ttfb_ms: float | None = None

    @classmethod
    def of(cls, status: int, body: bytes, content_type: str, ttfb_ms: float | None = None) -> UpstreamResult:
        result = cls(status, body, content_type, ttfb_ms=ttfb_ms)
        if status < 400:
            result.input_tokens, result.output_tokens = usage_tokens(parse_json(body))
        return result

    @property
    def tokens(self) -> tuple[int | None, int | None]:
        return self.input_tokens, self.output_tokens


async def call_upstream(model: ModelEntry, path: str, body: dict[str, Any]) -> UpstreamResult:
    """Make one non-streaming upstream call. Raises clients.UpstreamError."""
    started = time.perf_counter()
    response = await open_upstream(model, path, body)
    ttfb_ms = (time.perf_counter() - started) * 1000
    raw = answer_body(model, path, response.status, await response.read())
    return UpstreamResult.of(response.status, raw, response.content_type, ttfb_ms)


def answer_body(model: ModelEntry, path: str, status: int, raw: bytes) -> bytes:
    """An upstream's whole answer as the client's API has it: a translated call's chat completion
    becomes the Responses-shaped body of the same answer (an error passes as it is: same envelope)."""
    if status >= 400 or not translates(model, path):
        return raw
    completion = parse_json(raw)
    if not isinstance(completion, dict):
        return raw
    return orjson.dumps(translate.responses_body(completion, uuid.uuid4().hex))


# --- failures: the one mapping from a failed call to what the client and the record say -----------


@dataclass(frozen=True, slots=True)
class Failure:
    status: int
    message: str
    code: str


def failure_of(exc: clients.UpstreamError) -> Failure:
    if isinstance(exc, clients.UpstreamTimeout):
        return Failure(504, UPSTREAM_TIMEOUT_MESSAGE, "upstream_timeout")
    return Failure(502, UPSTREAM_UNREACHABLE_MESSAGE, "upstream_unreachable")


def error_message(result: UpstreamResult) -> str:
    """What an upstream's error answer says, for the record of the call it failed."""
    payload = parse_json(result.body)
    upstream_error = payload.get("error") if isinstance(payload, dict) else None
    message = upstream_error.get("message") if isinstance(upstream_error, dict) else None
    return message or result.body[:500].decode(errors="replace") or f"Upstream status {result.status}"


# --- streams -------------------------------------------------------------------------------------


FINAL_EVENTS = (b"data: [DONE]", b"event: response.completed", b"event: response.incomplete", b"event: response.failed")


class SSEUsage:
    """Watches a passing SSE stream, event by event: the last event that carries usage, whether the
    stream's final event has passed, and how many events went by (the gateway's own count)."""

    __slots__ = ("buffer", "events", "finished", "usage_event")

    def __init__(self) -> None:
        self.buffer = b""
        self.usage_event: bytes | None = None
        self.finished = False
        self.events = 0

    def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        if b"\n\n" not in self.buffer:
            return
        *events, self.buffer = self.buffer.split(b"\n\n")
        self.events += len(events)
        for event in events:
            if b'"usage"' in event:
                self.usage_event = event
            if event.startswith(FINAL_EVENTS):
                self.finished = True

    def data(self) -> Any:
        """The JSON data of the last event that carried usage, if any."""
        if self.usage_event is None:
            return None
        for line in self.usage_event.split(b"\n"):
            if line.startswith(b"data:"):
                return parse_json(line[5:].strip())
        return None

    def tokens(self) -> tuple[int | None, int | None]:
        return usage_tokens(self.data())


StreamEnded = Callable[[int, SSEUsage, float | None, bool], None]
USAGE_CHUNK_MARKS = (b'"choices":[]', b'"choices": []')


class UsageChunkDropper:
    """Takes the usage-only chunk (`choices: []`) out of a relayed chat stream whose client did not
    ask for it: the gateway asks every upstream for usage to bill from, and a client that did not
    ask reads `chunk.choices[0]` on every chunk. Passes whole events only, so it holds back the
    tail of a chunk until the event it starts is complete."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = b""

    def __call__(self, chunk: bytes) -> bytes:
        data = self.pending + chunk if self.pending else chunk
        end = data.rfind(b"\n\n") + 2
        complete, self.pending = data[:end], data[end:]
        if not any(mark in complete for mark in USAGE_CHUNK_MARKS):
            return complete
        events = complete.split(b"\n\n")
        kept = [event for event in events if not (event and any(mark in event for mark in USAGE_CHUNK_MARKS))]
        return b"\n\n".join(kept)

    def rest(self) -> bytes:
        rest, self.pending = self.pending, b""
        return rest


class Relay(StreamingHttpResponse):
    """A relayed event stream: gateway.handler sends its parts as they come, past Django's own
    sending, which passes every part through three generators of its own (a stream is a part per
    token). A relay sets no cookies."""

    def __init__(self, parts: AsyncGenerator[bytes], content_type: str) -> None:
        super().__init__(parts, content_type=content_type)
        self.parts = parts


async def relay_stream(
    chunks: AsyncGenerator[bytes],
    status: int,
    on_end: StreamEnded,
    transform: Callable[[bytes], bytes] | None = None,
    *,
    drop_usage: bool = False,
) -> AsyncGenerator[bytes]:
    """Pass an upstream SSE stream through chunk by chunk, and report its end to `on_end` once:
    before the final event goes out, so a finished call is on record before its client has all
    of it. `on_end` also hears whether the stream was cut short before its usage arrived (a
    client that left and was not waited for, see gateway.handler): then only the gateway's own
    count of what passed is known. With `drop_usage`, the usage-only chat chunk is billed from but
    not relayed (see UsageChunkDropper)."""
    dropper = UsageChunkDropper() if drop_usage else None
    started = time.perf_counter()
    watcher = SSEUsage()
    ttfb_ms = None
    ended = False
    try:
        async for chunk in chunks:
            if ttfb_ms is None:
                ttfb_ms = (time.perf_counter() - started) * 1000
            watcher.feed(chunk)
            if watcher.finished and not ended:
                ended = True
                on_end(status, watcher, ttfb_ms, False)
            if dropper is not None:
                chunk = dropper(chunk)
                if not chunk:
                    continue
            yield transform(chunk) if transform else chunk
        if dropper is not None and dropper.pending:
            yield dropper.rest()
    except clients.UpstreamError as exc:
        status = failure_of(exc).status
    finally:
        await chunks.aclose()
        if not ended:
            on_end(status, watcher, ttfb_ms, watcher.usage_event is None and not watcher.finished)
