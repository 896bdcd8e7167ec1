"""A realtime /v1/responses call with server tools: the loop (gateway.loop) served blocking, as one
SSE stream, or in the background.

Every mode makes its model calls in the call's capacity slot, stores the loop's end on the
response's record once (with its steps), and bills every model call on its own
(:func:`record_loop`): each at the tier served, the whole loop settled against its credit
reservation once, with its last call.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from django.http import StreamingHttpResponse
from django.http.response import HttpResponseBase

from gateway import admission, clients, errors, flex
from gateway.call import GatewayCall, Route
from gateway.db import DATABASE_ERRORS, in_thread
from gateway.jobs import GATEWAY_PROCESS, create_job, finish_job, finished_response
from gateway.loop import Loop, LoopEnd, ModelCaller
from gateway.models import InferenceRequest, JobState
from gateway.render import item_events, json_response, response_object
from gateway.step_stream import Event, StepRelay
from gateway.tools import Branch, warm_path_branch
from gateway.translate import sse
from gateway.upstream import UpstreamResult, answer_body, call_upstream, is_event_stream, open_upstream, translates
from gateway.views import CLIENT_CLOSED, calls_model, record_call, respond, with_id

logger = logging.getLogger(__name__)
CLIENT_GONE = "The client went away before the response finished."
# Loops running without their client in this process, kept so they are not garbage-collected mid-flight.
_running: dict[uuid.UUID, asyncio.Task[None]] = {}


def new_loop(call: GatewayCall) -> Loop:
    return Loop(call.served, call.body, call.tools, call.request_id)


def model_caller(call: GatewayCall) -> ModelCaller:
    async def call_model(body: dict[str, Any]) -> UpstreamResult:
        return await call_upstream(call.served, call.path, body)

    return call_model


def streaming_caller(
    call: GatewayCall, loop: Loop, emit: Callable[[list[Event]], None], streamed: set[str]
) -> ModelCaller:
    """Model calls that stream: their events go to `emit` as they come (gateway.step_stream), and
    the finished call is the loop's, as a blocking call's would be."""

    async def call_model(body: dict[str, Any]) -> UpstreamResult:
        started = time.perf_counter()
        response = await open_upstream(call.served, call.path, {**body, "stream": True})
        ttfb_ms = (time.perf_counter() - started) * 1000
        try:
            if not is_event_stream(response):
                raw = answer_body(call.served, call.path, response.status, await response.read())
                return UpstreamResult.of(response.status, raw, response.content_type, ttfb_ms)
            relay = StepRelay(
                offset=len(loop.output),
                taken=loop.seen_ids,
                translated=translates(call.served, call.path),
                prefix=uuid.uuid4().hex,
            )
            async for chunk in response.iter_chunks():
                emit(relay.feed(chunk))
            emit(relay.close())
        finally:
            await response.close()
        streamed.update(relay.streamed)
        if relay.body is None:
            raise clients.UpstreamUnreachable("The upstream's stream ended before its answer.")
        return UpstreamResult.of(200, orjson.dumps(relay.body), "application/json", ttfb_ms)

    return call_model


def record_loop(call: GatewayCall, loop: Loop, job: dict[str, Any] | None = None) -> None:
    """Bill each model call the loop made, once: the last one settles the call's reservation with
    the loop's summed tokens and gives back its slot (a loop that made none gives back its reservation)."""
    if not loop.model_calls:
        admission.finish(call)
    for number, made in enumerate(loop.model_calls, start=1):
        last = number == len(loop.model_calls)
        committed = admission.finish(call, loop.tokens) if last else 0
        record_call(
            call,
            made.status,
            tokens=made.tokens,
            ttfb_ms=made.ttfb_ms,
            step=number,
            committed=committed,
            job=job if last else None,
        )


def stored_body(end: LoopEnd, job_id: uuid.UUID) -> Any:
    return with_id(end.body, job_id) if end.status < 400 else end.body


@calls_model
async def responses(call: GatewayCall) -> HttpResponseBase:
    """POST /v1/responses: the loop when a server tool is offered, else one model call."""
    branch = warm_path_branch(tools=call.tools, stream=call.stream, background=call.route == Route.BACKGROUND)
    if branch == Branch.PASS_THROUGH:
        return await respond(call)
    if branch == Branch.LOOP_BACKGROUND:
        return await start_background(call)
    if branch == Branch.LOOP_STREAM:
        return await stream(call)
    return await blocking(call)


async def blocking(call: GatewayCall) -> HttpResponseBase:
    job_id = uuid.UUID(call.request_id)
    loop = new_loop(call)
    with admission.holding(call):
        try:
            end = await loop.run(model_caller(call))
        except BaseException:
            record_loop(call, loop)  # what was made is billed; calls_model answers the rest
            raise
        outcome = {"status": end.status, "body": stored_body(end, job_id), "tokens": end.tokens, "error": end.error}
        fields = {**call.job_fields(call.requested_alias), **outcome, "steps": loop.steps}
        record = finished_response(**fields)
        try:
            await in_thread(record.save, force_insert=True)
            journaled = None
        except DATABASE_ERRORS:
            logger.warning("The database is unavailable: response %s waits in the journal", job_id)
            journaled = fields
        record_loop(call, loop, journaled)
    if end.status >= 400:
        if isinstance(end.body, dict):
            return json_response(end.body, end.status)  # the upstream's own error envelope
        return errors.openai_error(end.status, end.error, code="upstream_error")
    return json_response(response_object(record), 200)


async def stream(call: GatewayCall) -> HttpResponseBase:
    """One SSE stream for the whole loop: each model call's events as it streams, each tool call's
    output as it comes, numbered on from one sequence."""
    job = await in_thread(
        create_job, **call.job_fields(call.requested_alias), state=JobState.PROCESSING, claimed_by=GATEWAY_PROCESS
    )
    loop = new_loop(call)
    heard: asyncio.Queue[list[Event] | LoopEnd] = asyncio.Queue()
    streamed: set[str] = set()  # ids of the items already sent as they streamed

    async def hear(items: list[dict[str, Any]]) -> None:
        offset = len(loop.output) - len(items)
        events = [
            event
            for index, item in enumerate(items)
            if item.get("id") not in streamed
            for event in item_events(item, offset + index)
        ]
        heard.put_nowait(events)

    async def run() -> None:
        with admission.holding(call):
            try:
                end = await loop.run(streaming_caller(call, loop, heard.put_nowait, streamed), heard=hear)
            except asyncio.CancelledError:
                await finish(LoopEnd(CLIENT_CLOSED, None, loop.tokens, CLIENT_GONE))
                raise
            except Exception:
                logger.exception("Streamed loop %s failed", job.id)
                end = LoopEnd(500, None, loop.tokens, "The loop failed.")
            await finish(end)
            heard.put_nowait(end)

    async def finish(end: LoopEnd) -> None:
        await in_thread(
            finish_job, job.id, status=end.status, body=stored_body(end, job.id), tokens=end.tokens,
            error=end.error, steps=loop.steps,
        )  # fmt: skip
        record_loop(call, loop)

    async def events() -> AsyncIterator[bytes]:
        sequence = 0

        def numbered(kind: str, **fields: Any) -> bytes:
            nonlocal sequence
            sequence += 1
            return sse({"type": kind, "sequence_number": sequence - 1, **fields})

        started = response_object(job)
        yield numbered("response.created", response=started) + numbered("response.in_progress", response=started)
        try:
            while True:
                got = await heard.get()
                if isinstance(got, LoopEnd):
                    break
                if got:
                    yield b"".join(numbered(kind, **fields) for kind, fields in got)
            final = response_object(await in_thread(InferenceRequest.objects.get, pk=job.id))
            status = final["status"] if final["status"] in ("completed", "incomplete") else "failed"
            yield numbered(f"response.{status}", response=final)
        finally:
            if not runner.done():
                runner.cancel()  # the client left: the loop stops, what it made is billed
                await asyncio.gather(runner, return_exceptions=True)

    # Started at once: a client that leaves before reading anything still gets its loop run and recorded.
    runner = asyncio.get_running_loop().create_task(run())
    _running[job.id] = runner
    runner.add_done_callback(lambda _: _running.pop(job.id, None))
    call.recorded = True  # by the loop, when it ends
    call.relaying = True
    response = StreamingHttpResponse(events(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


async def start_background(call: GatewayCall) -> HttpResponseBase:
    """Record the job, reply 202, and run the loop without the client; a cancel stops it."""
    job = await in_thread(
        create_job,
        **call.job_fields(call.requested_alias),
        background=True,
        state=JobState.PROCESSING,
        claimed_by=GATEWAY_PROCESS,
    )
    task = asyncio.get_running_loop().create_task(run_background(call, job))
    _running[job.id] = task
    task.add_done_callback(lambda _: _running.pop(job.id, None))
    call.recorded = True  # by the loop, when it ends
    return flex.accepted(job, stream=call.stream)


async def run_background(call: GatewayCall, job: InferenceRequest) -> None:
    loop = new_loop(call)

    async def cancelled() -> bool:
        state = await in_thread(InferenceRequest.objects.filter(pk=job.id).values_list("state", flat=True).first)
        return state != JobState.PROCESSING

    try:
        with admission.holding(call):
            try:
                end = await loop.run(model_caller(call), stopped=cancelled)
                if not end.cancelled:
                    await in_thread(
                        finish_job, job.id, status=end.status, body=stored_body(end, job.id), tokens=end.tokens,
                        error=end.error, steps=loop.steps,
                    )  # fmt: skip
            finally:
                record_loop(call, loop)
            if end.cancelled:
                await in_thread(InferenceRequest.objects.filter(pk=job.id).update, steps=loop.steps)
    except asyncio.CancelledError:
        await in_thread(InferenceRequest.objects.filter(pk=job.id).update, steps=loop.steps)
    except Exception:
        logger.exception("Background loop %s failed", job.id)
        await in_thread(finish_job, job.id, status=500, body=None, error="The loop failed.", steps=loop.steps)


def stop(job_id: uuid.UUID) -> bool:
    """Stop a background loop this process runs (its job was cancelled or deleted); whether it ran here."""
    running = _running.get(job_id)
    if running is not None:
        running.cancel()
    return running is not None
