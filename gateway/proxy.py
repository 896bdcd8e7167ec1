"""The proxy core shared by real-time views and flex workers: one upstream call, and its usage."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway import clients
from gateway.snapshot import ModelEntry

# Fields the gateway answers itself; the upstream call is always a plain synchronous one.
GATEWAY_FIELDS = ("service_tier", "background")


def upstream_request(model: ModelEntry, endpoint: str, body: dict[str, Any]) -> tuple[str, bytes, dict[str, str]]:
    """Return url, body and headers for the upstream: its model name, its credential, usage on streams."""
    forwarded = {name: value for name, value in body.items() if name not in GATEWAY_FIELDS}
    forwarded["model"] = model.upstream_model
    if endpoint == "chat/completions" and forwarded.get("stream") is True:
        forwarded["stream_options"] = {**(forwarded.get("stream_options") or {}), "include_usage": True}
    headers = {"Content-Type": "application/json", **model.endpoint.auth_headers}
    return f"{model.endpoint.base_url}/{endpoint}", orjson.dumps(forwarded), headers


async def open_upstream(model: ModelEntry, endpoint: str, body: dict[str, Any]) -> clients.UpstreamResponse:
    url, payload, headers = upstream_request(model, endpoint, body)
    return await clients.send(
        url,
        payload,
        headers,
        timeout=model.endpoint.timeout_seconds,
        connect_timeout=model.endpoint.connect_timeout_seconds,
    )


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
    status: int
    body: bytes
    content_type: str
    input_tokens: int | None = None
    output_tokens: int | None = None
    ttfb_ms: float | None = None


async def call_upstream(model: ModelEntry, endpoint: str, body: dict[str, Any]) -> UpstreamResult:
    """Make one non-streaming upstream call. Raises clients.UpstreamTimeout / UpstreamUnreachable."""
    started = time.perf_counter()
    upstream = await open_upstream(model, endpoint, body)
    ttfb_ms = (time.perf_counter() - started) * 1000
    raw = await upstream.read()
    result = UpstreamResult(upstream.status, raw, upstream.content_type, ttfb_ms=ttfb_ms)
    if upstream.status < 400:
        result.input_tokens, result.output_tokens = usage_tokens(parse_json(raw))
    return result


class SSEUsage:
    """Watches a passing SSE stream, event by event, for the last event that carries usage."""

    __slots__ = ("buffer", "usage_event")

    def __init__(self) -> None:
        self.buffer = b""
        self.usage_event: bytes | None = None

    def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        if b"\n\n" not in self.buffer:
            return
        *events, self.buffer = self.buffer.split(b"\n\n")
        for event in events:
            if b'"usage"' in event:
                self.usage_event = event

    def tokens(self) -> tuple[int | None, int | None]:
        if self.usage_event is None:
            return None, None
        for line in self.usage_event.split(b"\n"):
            if line.startswith(b"data:"):
                return usage_tokens(parse_json(line[5:].strip()))
        return None, None


async def relay_stream(
    upstream: clients.UpstreamResponse,
    on_end: Callable[[int, SSEUsage, float | None], None],
    transform: Callable[[bytes], bytes] | None = None,
) -> AsyncIterator[bytes]:
    """Pass an upstream SSE stream through chunk by chunk; report its end (also on disconnect) to `on_end`."""
    started = time.perf_counter()
    watcher = SSEUsage()
    ttfb_ms = None
    status = upstream.status
    try:
        async for chunk in upstream.iter_chunks():
            if ttfb_ms is None:
                ttfb_ms = (time.perf_counter() - started) * 1000
            watcher.feed(chunk)
            yield transform(chunk) if transform else chunk
    except clients.UpstreamTimeout:
        status = 504
    except clients.UpstreamUnreachable:
        status = 502
    finally:
        await upstream.close()
        on_end(status, watcher, ttfb_ms)
