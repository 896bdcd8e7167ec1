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

import orjson
from django.http import HttpResponse
from django.http.response import HttpResponseBase
from django.utils import timezone

from gateway import admission, budget, clients, errors, flex, metrics
from gateway.accounting import accountant, journal_line, step_request_id
from gateway.call import GatewayCall, GatewayRequest, Route
from gateway.db import DATABASE_ERRORS, in_thread
from gateway.jobs import GATEWAY_PROCESS, create_job, finish_job, finished_response
from gateway.models import InferenceRequest, JobState
from gateway.render import include_usage, json_response, response_object
from gateway.translate import ResponsesStream, translated_stream
from gateway.upstream import (
    Relay,
    SSEUsage,
    UpstreamResult,
    answer_body,
    call_upstream,
    error_message,
    failure_of,
    is_event_stream,
    open_upstream,
    parse_json,
    relay_stream,
    translates,
    unstreamed,
)

logger = logging.getLogger(__name__)
Tokens = tuple[int | None, int | None]
CLIENT_CLOSED = 499  # the status a call is recorded with when its client left before any answer
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
    step: int = 0,
    committed: int | None = None,
) -> None:
    """Hand a finished call to accounting (priced, charged and logged in the next batch); its exact
    cost replaces its credit reservation, and its slot and tokens go back with it.

    A model call of a loop (`step` from 1) comes with what it leaves `committed` (gateway.warm_path
    settles the whole loop once, with its last call)."""
    model = call.served
    call.recorded = True
    if committed is None:
        committed = admission.finish(call, tokens, billed=status < 400)
    metrics.observe_call(
        model.alias,
        call.tier,
        status,
        time.time() - call.started_at,
        ttfb_ms=ttfb_ms,
        tokens=tokens,
        endpoint=model.endpoint.name,
    )
    accountant.add(
        journal_line(
            request_id=step_request_id(call.request_id, step),
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
            client_request_id=call.client_request_id,
            step=step,
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
        if request.method != "POST":
            return errors.method_not_allowed(request.method or "")
        call = request.gateway
        try:
            return await view(call)
        except clients.UpstreamError as exc:
            failure = failure_of(exc)
            record_call(call, failure.status)
            return errors.openai_error(failure.status, failure.message, code=failure.code)
        except DATABASE_ERRORS:
            record_call(call, 503)  # nothing was served: the slot and the reservation go back
            logger.warning("The database is unavailable: answered 503", exc_info=True)
            return errors.database_unavailable()
        except asyncio.CancelledError:
            if not call.recorded:
                record_call(call, CLIENT_CLOSED)
            raise
        except BaseException:
            if not call.recorded:
                record_call(call, 500)
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
    on_end: Callable[[StreamEnd], Coroutine[Any, Any, HttpResponseBase | None]] | None = None,
    translator: ResponsesStream | None = None,
) -> HttpResponseBase:
    """Serve a `stream: true` call: relay the upstream's event stream, or pass on what it answered instead.

    `on_end` hears how the call ended, once: awaited before replying when the upstream failed or
    answered without a stream (and what it returns, if anything, is the reply then), run as a task
    when a relayed stream ends. `final` picks the final body out of a relayed stream. With a
    `translator`, the relayed stream is the chat upstream's, converted to the Responses API's events
    before anything watches it: its end is reported and billed as any relayed stream's.
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
        raw = answer_body(call.served, call.path, head.status, raw)
        result = UpstreamResult.of(head.status, transform(raw) if transform else raw, head.content_type)
        record_call(call, result.status, tokens=result.tokens)  # before the slot is let go: sent with it
        await chunks.aclose()
        if on_end is not None:
            error = error_message(result) if result.status >= 400 else ""
            reply = await on_end(StreamEnd(result.status, parse_json(result.body), result.tokens, error))
            if reply is not None:
                return reply
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

    # The gateway always asks a chat upstream for usage (to bill from); the client gets it if it asked.
    drop_usage = call.path == "chat/completions" and not include_usage(call.body)
    events = chunks if translator is None else translated_stream(chunks, translator)
    response = Relay(relay_stream(events, head.status, ended, transform, drop_usage=drop_usage), head.content_type)
    call.relaying = True  # a client that leaves now is not waited for (gateway.handler)
    call.recorded = True  # when the relay ends
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


async def respond(call: GatewayCall) -> HttpResponseBase:
    """A /responses call with no server tool: one model call (the loop's are gateway.warm_path)."""
    job_id = uuid.UUID(call.request_id)
    if call.route == Route.BACKGROUND:
        return await start_background(call, job_id)
    if call.stream:
        return await stream_response(call, job_id)
    with admission.holding(call):
        result = await call_upstream(call.served, call.path, call.body)
        payload = with_id(parse_json(result.body), job_id)
        outcome = {"status": result.status, "body": payload, "tokens": result.tokens}
        fields = {**call.job_fields(call.requested_alias), **outcome}
        record = finished_response(**fields)
        try:
            # Recorded before the reply, so the id the client receives can be read back at once.
            await in_thread(record.save, force_insert=True)
            journaled = None
        except DATABASE_ERRORS:
            # The upstream has answered: never throw that away. The journal records it once the database is back.
            logger.warning("The database is unavailable: response %s waits in the journal", job_id)
            journaled = fields
        record_call(call, result.status, tokens=result.tokens, ttfb_ms=result.ttfb_ms, job=journaled)
    if result.status >= 400 or not isinstance(payload, dict):
        return HttpResponse(result.body, status=result.status, content_type=result.content_type)
    return json_response(response_object(record), result.status)


UPSTREAM_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"(resp_[^"]+)"')


async def stream_response(call: GatewayCall, job_id: uuid.UUID) -> HttpResponseBase:
    """Relay a streamed /responses call, showing the client our id in place of the upstream's, and
    the alias it asked for in place of the upstream's model name."""
    job = await in_thread(
        create_job, **call.job_fields(call.requested_alias), state=JobState.PROCESSING, claimed_by=GATEWAY_PROCESS
    )

    async def finish(end: StreamEnd) -> HttpResponseBase | None:
        body = with_id(end.body, job_id) if end.status < 400 else end.body
        await in_thread(finish_job, job_id, status=end.status, body=body, tokens=end.tokens, error=end.error)
        if end.status >= 400 or not isinstance(body, dict):
            return None
        return json_response(response_object(await in_thread(InferenceRequest.objects.get, pk=job_id)), end.status)

    if translates(call.served, call.path):
        return await stream_translated(call, job, finish)
    ours = f"resp_{job_id.hex}".encode()
    seen: list[bytes] = []
    alias = orjson.dumps(call.body.get("model"))
    upstream_names = [
        b'"model":' + orjson.dumps(call.served.upstream_model),
        b'"model": ' + orjson.dumps(call.served.upstream_model),
    ]

    def transform(chunk: bytes) -> bytes:
        if not seen:
            match = UPSTREAM_RESPONSE_ID.search(chunk)
            if match:
                seen.append(match.group(1))
        if seen:
            chunk = chunk.replace(seen[0], ours)
        for name in upstream_names:
            chunk = chunk.replace(name, b'"model":' + alias)
        return chunk

    def final(usage: SSEUsage) -> Any:
        event = usage.data()
        return event.get("response") if isinstance(event, dict) else None

    return await stream(call, transform=transform, final=final, on_end=finish)


async def stream_translated(
    call: GatewayCall,
    job: InferenceRequest,
    finish: Callable[[StreamEnd], Coroutine[Any, Any, HttpResponseBase | None]],
) -> HttpResponseBase:
    """Stream a /responses call from a chat upstream: its chunks as the Responses API's events, every
    response in them rendered by the one builder (gateway.render.response_object)."""

    def completed(body: dict[str, Any]) -> dict[str, Any]:
        # The finished response as GET will show it; the record itself is written by `finish`.
        job.state, job.response_body, job.completed_at = JobState.COMPLETED, body, timezone.now()
        return response_object(job)

    translator = ResponsesStream(response_object(job), job.id.hex, completed)
    return await stream(call, final=lambda _: translator.body, on_end=finish, translator=translator)


async def start_background(call: GatewayCall, job_id: uuid.UUID) -> HttpResponseBase:
    """Record the job, reply 202, and make the call without the client, in the call's capacity slot."""
    accepted: asyncio.Future[InferenceRequest] = asyncio.get_running_loop().create_future()
    task = asyncio.get_running_loop().create_task(run_background(call, job_id, accepted))
    _background[job_id] = task
    call.recorded = True  # by the background call, when it ends
    task.add_done_callback(lambda _: _background.pop(job_id, None))
    # Shielded: a client that goes away must not cancel the future the call reports to.
    return flex.accepted(await asyncio.shield(accepted), stream=call.stream)


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
                result = await call_upstream(call.served, call.path, unstreamed(call.body))
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


def stop_background(job_id: uuid.UUID) -> None:
    """Stop a background call this process runs (its job was cancelled or deleted)."""
    running = _background.get(job_id)
    if running is not None:
        running.cancel()
