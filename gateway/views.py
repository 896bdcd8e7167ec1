"""The OpenAI-compatible API. Requests arrive authorized and routed by TierRoutingMiddleware.

Every view that calls a model holds the capacity slot its call took when admitted for as long as
its upstream call lasts — a JSON call, a relayed stream, a background call — inside ``with
admission.holding(call):``, and reports the call to accounting once it ends (which gives the slot
back with the call's credits and tokens, gateway.admission).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from functools import wraps
from typing import Any

from django.http import HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase

from gateway import admission, budget, clients, errors
from gateway.accounting import accountant, journal_line
from gateway.call import GatewayCall, GatewayRequest, Route
from gateway.db import DATABASE_ERRORS, in_thread
from gateway.jobs import GATEWAY_PROCESS, cancel_job, create_job, find_job, finish_job, record_response
from gateway.models import InferenceRequest, JobState
from gateway.render import json_response, response_object
from gateway.snapshot import aget_snapshot
from gateway.upstream import (
    SSEUsage,
    UpstreamResult,
    call_upstream,
    error_message,
    failure_of,
    is_event_stream,
    open_upstream,
    parse_json,
    relay_stream,
)

logger = logging.getLogger(__name__)
Tokens = tuple[int | None, int | None]
# Background calls running in this process, kept so they are not garbage-collected mid-flight.
_background: dict[uuid.UUID, asyncio.Task[None]] = {}
# Job records being finished after their stream ended, kept for the same reason.
_finishing: set[asyncio.Task[Any]] = set()


def record_call(
    call: GatewayCall,
    status: int,
    *,
    tokens: Tokens = (None, None),
    ttfb_ms: float | None = None,
    estimated: bool = False,
    job: dict[str, Any] | None = None,
) -> None:
    """Hand a finished call to accounting (priced, charged and logged in the next batch); its exact
    cost replaces its credit reservation, and its slot and tokens go back with it."""
    model = call.served
    committed = admission.finish(call, tokens, billed=status < 400)
    accountant.add(
        journal_line(
            request_id=call.request_id,
            user_id=call.key.user_id,
            api_key_id=call.key.id,
            model_id=model.id,
            model_alias=model.alias,
            path=call.path,
            tier=call.tier,
            status_code=status,
            started_at=call.started_at,
            latency_ms=(time.time() - call.started_at) * 1000,
            ttfb_ms=ttfb_ms,
            input_tokens=tokens[0],
            output_tokens=tokens[1],
            job_id=call.request_id if call.path == "responses" else None,
            usage_estimated=estimated,
            committed=committed,
            job=job,
        )
    )


def calls_model(
    view: Callable[[GatewayCall], Awaitable[HttpResponseBase]],
) -> Callable[[GatewayRequest], Coroutine[Any, Any, HttpResponseBase]]:
    """A view that calls the model upstream: gets the admitted call; an upstream that timed out or
    could not be reached is recorded and answered 504 / 502, and a database that cannot be reached
    before the upstream call is answered 503. A call that ends otherwise served nothing: it gives
    back what it holds."""

    @wraps(view)
    async def serve(request: GatewayRequest) -> HttpResponseBase:
        call = request.gateway
        try:
            return await view(call)
        except clients.UpstreamError as exc:
            failure = failure_of(exc)
            record_call(call, failure.status)
            return errors.openai_error(failure.status, failure.message, code=failure.code)
        except DATABASE_ERRORS:
            admission.finish(call)
            logger.warning("The database is unavailable: answered 503", exc_info=True)
            return errors.database_unavailable()
        except BaseException:
            admission.finish(call)  # nothing was served: give the slot and the reservation back
            raise

    return serve


# --- streams -------------------------------------------------------------------------------------


async def upstream_chunks(call: GatewayCall) -> AsyncGenerator[Any]:
    """Open a streamed upstream call and yield its response, then its body chunk by chunk.

    The capacity slot is held until the call is recorded as the relay ends, and at the latest until
    this generator is closed: the client goes away, or the caller gives up after reading the head.
    """
    with admission.holding(call):
        response = await open_upstream(call.served, call.path, call.body)
        try:
            yield response
            async for chunk in response.iter_chunks():
                yield chunk
        finally:
            await response.close()


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """How a streamed call ended, for whoever records it: status, final JSON body, tokens, error."""

    status: int
    body: Any = None
    tokens: Tokens = (None, None)
    error: str = ""


async def stream(
    call: GatewayCall,
    *,
    transform: Callable[[bytes], bytes] | None = None,
    final: Callable[[SSEUsage], Any] | None = None,
    on_end: Callable[[StreamEnd], Coroutine[Any, Any, None]] | None = None,
) -> HttpResponseBase:
    """Serve a `stream: true` call: relay the upstream's event stream, or pass on what it answered instead.

    `on_end` hears how the call ended, once: awaited before replying when the upstream failed or
    answered without a stream, run as a task when a relayed stream ends. `final` picks the final
    body out of a relayed stream.
    """
    chunks = upstream_chunks(call)
    try:
        head: clients.UpstreamResponse = await anext(chunks)
        raw = None if is_event_stream(head) else b"".join([chunk async for chunk in chunks])
    except clients.UpstreamError as exc:
        await chunks.aclose()
        if on_end is not None:
            failure = failure_of(exc)
            await on_end(StreamEnd(failure.status, error=failure.message))
        raise  # answered by calls_model
    if raw is not None:
        result = UpstreamResult.of(head.status, transform(raw) if transform else raw, head.content_type)
        record_call(call, result.status, tokens=result.tokens)  # before the slot is let go: sent with it
        await chunks.aclose()
        if on_end is not None:
            error = error_message(result) if result.status >= 400 else ""
            await on_end(StreamEnd(result.status, parse_json(result.body), result.tokens, error))
        return HttpResponse(result.body, status=result.status, content_type=result.content_type)

    def ended(status: int, usage: SSEUsage, ttfb_ms: float | None, cut: bool) -> None:
        tokens, estimated = usage.tokens(), False
        if cut and status < 400 and usage.events:
            # Bill what went out: the input estimate and an event per output token.
            tokens, estimated = (budget.estimate_input_tokens(call.body_bytes), usage.events), True
        record_call(call, status, tokens=tokens, ttfb_ms=ttfb_ms, estimated=estimated)
        if on_end is not None:
            body = final(usage) if final is not None else None
            end = StreamEnd(status, body, usage.tokens())
            if body is None or status >= 400:
                failed = status if status >= 400 else 502
                end = StreamEnd(failed, tokens=usage.tokens(), error=errors.STREAM_CUT_MESSAGE)
            task = asyncio.get_running_loop().create_task(on_end(end))
            _finishing.add(task)
            task.add_done_callback(_finishing.discard)

    response = StreamingHttpResponse(
        relay_stream(chunks, head.status, ended, transform), content_type=head.content_type
    )
    call.relaying = True  # a client that leaves now is not waited for (gateway.handler)
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


# --- chat completions and embeddings -------------------------------------------------------------


@calls_model
async def proxy(call: GatewayCall) -> HttpResponseBase:
    if call.stream:
        return await stream(call)
    with admission.holding(call):
        result = await call_upstream(call.served, call.path, call.body)
        record_call(call, result.status, tokens=result.tokens, ttfb_ms=result.ttfb_ms)
    return HttpResponse(result.body, status=result.status, content_type=result.content_type)


chat_completions = proxy
embeddings = proxy


# --- /v1/responses -------------------------------------------------------------------------------


def with_id(payload: Any, job_id: uuid.UUID) -> Any:
    if isinstance(payload, dict):
        payload["id"] = f"resp_{job_id.hex}"
    return payload


@calls_model
async def responses(call: GatewayCall) -> HttpResponseBase:
    job_id = uuid.UUID(call.request_id)
    if call.route == Route.BACKGROUND:
        return await start_background(call, job_id)
    if call.stream:
        return await stream_response(call, job_id)
    with admission.holding(call):
        result = await call_upstream(call.served, call.path, call.body)
        payload = with_id(parse_json(result.body), job_id)
        job = {**call.job_fields(call.requested_alias), "status": result.status, "body": payload}
        job["tokens"] = result.tokens
        try:
            # Recorded before the reply, so the id the client receives can be read back at once.
            await in_thread(record_response, **job)
            journaled = None
        except DATABASE_ERRORS:
            # The upstream has answered: never throw that away. The journal records it once the database is back.
            logger.warning("The database is unavailable: response %s waits in the journal", job_id)
            journaled = job
        record_call(call, result.status, tokens=result.tokens, ttfb_ms=result.ttfb_ms, job=journaled)
    if payload is None:
        return HttpResponse(result.body, status=result.status, content_type=result.content_type)
    return json_response(payload, result.status)


UPSTREAM_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"(resp_[^"]+)"')


async def stream_response(call: GatewayCall, job_id: uuid.UUID) -> HttpResponseBase:
    """Relay a streamed /responses call, showing the client our id in place of the upstream's."""
    await in_thread(
        create_job, **call.job_fields(call.requested_alias), state=JobState.PROCESSING, claimed_by=GATEWAY_PROCESS
    )
    ours = f"resp_{job_id.hex}".encode()
    seen: list[bytes] = []

    def transform(chunk: bytes) -> bytes:
        if not seen:
            match = UPSTREAM_RESPONSE_ID.search(chunk)
            if match:
                seen.append(match.group(1))
        return chunk.replace(seen[0], ours) if seen else chunk

    def final(usage: SSEUsage) -> Any:
        event = usage.data()
        return event.get("response") if isinstance(event, dict) else None

    async def finish(end: StreamEnd) -> None:
        body = with_id(end.body, job_id) if end.status < 400 else end.body
        await in_thread(finish_job, job_id, status=end.status, body=body, tokens=end.tokens, error=end.error)

    return await stream(call, transform=transform, final=final, on_end=finish)


async def start_background(call: GatewayCall, job_id: uuid.UUID) -> HttpResponseBase:
    """Record the job, reply 202, and make the call without the client, in the call's capacity slot."""
    accepted: asyncio.Future[InferenceRequest] = asyncio.get_running_loop().create_future()
    task = asyncio.get_running_loop().create_task(run_background(call, job_id, accepted))
    _background[job_id] = task
    task.add_done_callback(lambda _: _background.pop(job_id, None))
    # Shielded: a client that goes away must not cancel the future the call reports to.
    return json_response(response_object(await asyncio.shield(accepted)), 202)


async def run_background(call: GatewayCall, job_id: uuid.UUID, accepted: asyncio.Future[InferenceRequest]) -> None:
    """The whole background call, inside one capacity slot; `accepted` gets the job, or why there is none."""
    try:
        with admission.holding(call):
            accepted.set_result(
                await in_thread(
                    create_job,
                    **call.job_fields(call.requested_alias),
                    background=True,
                    state=JobState.PROCESSING,
                    claimed_by=GATEWAY_PROCESS,
                )
            )
            try:
                result = await call_upstream(call.served, call.path, call.body)
                error = error_message(result) if result.status >= 400 else ""
            except clients.UpstreamError as exc:
                failure = failure_of(exc)
                result, error = UpstreamResult(failure.status, b"", "application/json"), failure.message
            stored = await in_thread(
                finish_job,
                job_id,
                status=result.status,
                body=with_id(parse_json(result.body), job_id),
                tokens=result.tokens,
                error=error,
            )
            # A job cancelled meanwhile is not charged: its outcome was not stored.
            record_call(call, result.status, tokens=result.tokens if stored else (None, None))
    except Exception as exc:
        admission.finish(call)
        if accepted.done():
            logger.exception("Background call %s failed", job_id)
        else:
            accepted.set_exception(exc)


# --- reading, cancelling, listing ----------------------------------------------------------------


def reads_records(
    view: Callable[[GatewayRequest, str], Awaitable[HttpResponseBase]],
) -> Callable[[GatewayRequest, str], Coroutine[Any, Any, HttpResponseBase]]:
    """A view over the stored records: a database that cannot be reached is answered 503."""

    @wraps(view)
    async def serve(request: GatewayRequest, response_id: str) -> HttpResponseBase:
        try:
            return await view(request, response_id)
        except DATABASE_ERRORS:
            logger.warning("The database is unavailable: answered 503", exc_info=True)
            return errors.database_unavailable()

    return serve


@reads_records
async def response_detail(request: GatewayRequest, response_id: str) -> HttpResponseBase:
    if request.method != "GET":
        return errors.method_not_allowed(request.method or "")
    job = await in_thread(find_job, response_id, request.gateway.key.user_id)
    if job is None:
        return errors.response_not_found(response_id)
    return json_response(response_object(job))


@reads_records
async def response_cancel(request: GatewayRequest, response_id: str) -> HttpResponseBase:
    if request.method != "POST":
        return errors.method_not_allowed(request.method or "")
    job = await in_thread(find_job, response_id, request.gateway.key.user_id)
    if job is None:
        return errors.response_not_found(response_id)
    job = await in_thread(cancel_job, job)
    running = _background.get(job.id)
    if running is not None and job.state == JobState.CANCELED:
        running.cancel()
    return json_response(response_object(job))


async def models(request: GatewayRequest) -> HttpResponseBase:
    if request.method != "GET":
        return errors.method_not_allowed(request.method or "")
    snapshot = await aget_snapshot()
    user_id = request.gateway.key.user_id
    data = [
        {"id": model.alias, "object": "model", "created": model.created, "owned_by": "dwctl"}
        for model in sorted(snapshot.models.values(), key=lambda m: m.alias)
        if snapshot.can_access(user_id, model)
    ]
    return json_response({"object": "list", "data": data})
