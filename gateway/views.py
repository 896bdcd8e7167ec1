"""The OpenAI-compatible API. Requests arrive authorized and routed by TierRoutingMiddleware."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
import uuid
from typing import Any

from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase

from gateway import clients, limits
from gateway.accounting import CallRecord, accountant
from gateway.db import in_thread
from gateway.errors import openai_error
from gateway.middleware import GatewayCall
from gateway.models import JobState
from gateway.proxy import (
    SSEUsage,
    UpstreamResult,
    call_upstream,
    open_upstream,
    parse_json,
    relay_stream,
    usage_tokens,
)
from gateway.responses import json_response, response_object
from gateway.routing import Route
from gateway.services import cancel_job, create_job, find_job, finish_job, record_response
from gateway.snapshot import aget_snapshot

logger = logging.getLogger(__name__)
WORKER_NAME = f"gateway:{socket.gethostname()}:{os.getpid()}"
# Background calls running in this process, kept so they are not garbage-collected mid-flight.
_background: dict[uuid.UUID, asyncio.Task[None]] = {}


def record_call(call: GatewayCall, status: int, *, tokens=(None, None), ttfb_ms=None, request_id=None) -> None:  # type: ignore[no-untyped-def]
    assert call.model is not None
    accountant.add(
        CallRecord(
            request_id=request_id or call.request_id,
            user_id=call.key.user_id,
            api_key_id=call.key.id,
            model_id=call.model.id,
            model_alias=call.model.alias,
            path=call.endpoint,
            tier=call.tier,
            status_code=status,
            started_at=call.started_at,
            latency_ms=(time.time() - call.started_at) * 1000,
            ttfb_ms=ttfb_ms,
            input_tokens=tokens[0],
            output_tokens=tokens[1],
        )
    )


def upstream_failure(exc: Exception) -> HttpResponseBase:
    if isinstance(exc, clients.UpstreamTimeout):
        return openai_error(504, "The upstream model server did not answer in time.", code="upstream_timeout")
    return openai_error(502, "The upstream model server could not be reached.", code="upstream_unreachable")


def failure_status(exc: Exception) -> int:
    return 504 if isinstance(exc, clients.UpstreamTimeout) else 502


# --- chat completions and embeddings -------------------------------------------------------------


async def proxy(request: HttpRequest) -> HttpResponseBase:
    call: GatewayCall = request.gateway  # type: ignore[attr-defined]
    assert call.model is not None
    if call.stream:
        return await proxy_stream(call)
    try:
        result = await call_upstream(call.model, call.endpoint, call.body)
    except (clients.UpstreamTimeout, clients.UpstreamUnreachable) as exc:
        record_call(call, failure_status(exc))
        return upstream_failure(exc)
    record_call(call, result.status, tokens=(result.input_tokens, result.output_tokens), ttfb_ms=result.ttfb_ms)
    return HttpResponse(result.body, status=result.status, content_type=result.content_type)


async def proxy_stream(call: GatewayCall, transform=None, on_end=None) -> HttpResponseBase:  # type: ignore[no-untyped-def]
    assert call.model is not None
    try:
        upstream = await open_upstream(call.model, call.endpoint, call.body)
    except (clients.UpstreamTimeout, clients.UpstreamUnreachable) as exc:
        record_call(call, failure_status(exc))
        return upstream_failure(exc)
    if upstream.status >= 400 or "text/event-stream" not in upstream.content_type:
        try:
            raw = await upstream.read()
        except (clients.UpstreamTimeout, clients.UpstreamUnreachable) as exc:
            record_call(call, failure_status(exc))
            return upstream_failure(exc)
        tokens = usage_tokens(parse_json(raw)) if upstream.status < 400 else (None, None)
        record_call(call, upstream.status, tokens=tokens)
        return HttpResponse(raw, status=upstream.status, content_type=upstream.content_type)

    def ended(status: int, usage: SSEUsage, ttfb_ms: float | None) -> None:
        limits.release(call)
        record_call(call, status, tokens=usage.tokens(), ttfb_ms=ttfb_ms)
        if on_end is not None:
            on_end(status, usage)

    response = StreamingHttpResponse(relay_stream(upstream, ended, transform), content_type=upstream.content_type)
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


chat_completions = proxy
embeddings = proxy


# --- /v1/responses -------------------------------------------------------------------------------


def with_id(body: bytes, job_id: uuid.UUID) -> Any:
    payload = parse_json(body)
    if isinstance(payload, dict):
        payload["id"] = f"resp_{job_id.hex}"
    return payload


async def responses(request: HttpRequest) -> HttpResponseBase:
    call: GatewayCall = request.gateway  # type: ignore[attr-defined]
    assert call.model is not None
    job_id = uuid.UUID(call.request_id)
    if call.route == Route.BACKGROUND:
        return await start_background(call, job_id)
    if call.stream:
        return await stream_response(call, job_id)
    try:
        result = await call_upstream(call.model, call.endpoint, call.body)
    except (clients.UpstreamTimeout, clients.UpstreamUnreachable) as exc:
        record_call(call, failure_status(exc))
        return upstream_failure(exc)
    payload = with_id(result.body, job_id)
    # Recorded before the reply, so the id the client receives can be read back at once.
    await in_thread(
        record_response,
        **call.job_fields(call.requested_alias),
        status=result.status,
        body=payload,
        input_tokens=result.input_tokens,
        output_tokens=result.output_tokens,
    )
    record_call(call, result.status, tokens=(result.input_tokens, result.output_tokens), ttfb_ms=result.ttfb_ms)
    if payload is None:
        return HttpResponse(result.body, status=result.status, content_type=result.content_type)
    return json_response(payload, result.status)


UPSTREAM_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"(resp_[^"]+)"')


async def stream_response(call: GatewayCall, job_id: uuid.UUID) -> HttpResponseBase:
    """Relay a streamed /responses call, showing the client our id in place of the upstream's."""
    await in_thread(
        create_job, **call.job_fields(call.requested_alias), state=JobState.PROCESSING, claimed_by=WORKER_NAME
    )
    ours = f"resp_{job_id.hex}".encode()
    seen: list[bytes] = []

    def transform(chunk: bytes) -> bytes:
        if not seen:
            match = UPSTREAM_RESPONSE_ID.search(chunk)
            if match:
                seen.append(match.group(1))
        return chunk.replace(seen[0], ours) if seen else chunk

    def ended(status: int, usage: SSEUsage) -> None:
        tokens = usage.tokens()
        final = None
        if usage.usage_event is not None:
            for line in usage.usage_event.split(b"\n"):
                if line.startswith(b"data:"):
                    event = parse_json(line[5:].strip())
                    final = event.get("response") if isinstance(event, dict) else None
        if isinstance(final, dict):
            final["id"] = ours.decode()
        asyncio.get_running_loop().create_task(
            in_thread(
                finish_job,
                job_id,
                status=status if final else 502,
                body=final,
                input_tokens=tokens[0],
                output_tokens=tokens[1],
                error="" if final else "The stream ended before the response completed.",
            )
        )

    return await proxy_stream(call, transform=transform, on_end=ended)


async def start_background(call: GatewayCall, job_id: uuid.UUID) -> HttpResponseBase:
    """Record the job, reply 202 at once, and make the call without the client."""
    job = await in_thread(
        create_job,
        **call.job_fields(call.requested_alias),
        background=True,
        state=JobState.PROCESSING,
        claimed_by=WORKER_NAME,
    )
    task = asyncio.get_running_loop().create_task(run_background(call, job_id))
    _background[job_id] = task
    task.add_done_callback(lambda _: _background.pop(job_id, None))
    return json_response(response_object(job), 202)


async def run_background(call: GatewayCall, job_id: uuid.UUID) -> None:
    assert call.model is not None
    try:
        result = await call_upstream(call.model, call.endpoint, call.body)
    except (clients.UpstreamTimeout, clients.UpstreamUnreachable) as exc:
        result = UpstreamResult(failure_status(exc), b"", "application/json")
        error = "The upstream model server did not answer in time." if result.status == 504 else "Upstream unreachable."
    else:
        error = ""
    finally:
        limits.release(call)
    payload = with_id(result.body, job_id)
    stored = await in_thread(
        finish_job,
        job_id,
        status=result.status,
        body=payload,
        input_tokens=result.input_tokens,
        output_tokens=result.output_tokens,
        error=error,
    )
    # A job cancelled meanwhile is not charged: its outcome was not stored.
    record_call(call, result.status, tokens=(result.input_tokens, result.output_tokens) if stored else (None, None))


# --- reading, cancelling, listing ----------------------------------------------------------------


async def response_detail(request: HttpRequest, response_id: str) -> HttpResponseBase:
    call: GatewayCall = request.gateway  # type: ignore[attr-defined]
    if request.method != "GET":
        return openai_error(405, f"Method {request.method} is not allowed here.")
    job = await in_thread(find_job, response_id, call.key.user_id)
    if job is None:
        return openai_error(404, f"No response found with id '{response_id}'.", param="response_id", code="not_found")
    return json_response(response_object(job))


async def response_cancel(request: HttpRequest, response_id: str) -> HttpResponseBase:
    call: GatewayCall = request.gateway  # type: ignore[attr-defined]
    if request.method != "POST":
        return openai_error(405, f"Method {request.method} is not allowed here.")
    job = await in_thread(find_job, response_id, call.key.user_id)
    if job is None:
        return openai_error(404, f"No response found with id '{response_id}'.", param="response_id", code="not_found")
    job = await in_thread(cancel_job, job)
    running = _background.get(job.id)
    if running is not None and job.state == JobState.CANCELED:
        running.cancel()
    return json_response(response_object(job))


async def models(request: HttpRequest) -> HttpResponseBase:
    call: GatewayCall = request.gateway  # type: ignore[attr-defined]
    if request.method != "GET":
        return openai_error(405, f"Method {request.method} is not allowed here.")
    snapshot = await aget_snapshot()
    data = [
        {"id": model.alias, "object": "model", "created": model.created, "owned_by": "dwctl"}
        for model in sorted(snapshot.models.values(), key=lambda m: m.alias)
        if snapshot.can_access(call.key.user_id, model)
    ]
    return json_response({"object": "list", "data": data})
