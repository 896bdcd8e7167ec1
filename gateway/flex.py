"""Flex tier, gateway side: queue the request, then hold the client (or release it with a 202).

A held client costs a future on the event loop, not a thread. Each gateway process keeps one
:class:`_Waiters` hub per event loop that wakes the futures of finished jobs two ways:

- a push: workers send to a channel-layer group per job (``flex.job.<hex>``); the hub has one
  channel of its own, added to the group of each job it waits for, and one task reading it.
  Only with a layer that crosses processes (Redis): the in-memory layer does not.
- a poll, the fallback: one query every ``POLL_SECONDS`` for all the jobs this process waits on,
  however many clients wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

from channels.layers import BaseChannelLayer, InMemoryChannelLayer, get_channel_layer
from django.http import HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from redis.exceptions import TimeoutError as RedisTimeout

from gateway.call import GatewayCall
from gateway.db import in_thread
from gateway.jobs import cancel_abandoned_job, expire_job, finished_job_ids
from gateway.models import UNFINISHED_STATES, InferenceRequest
from gateway.queue import submit_flex_job
from gateway.render import job_reply, json_response, response_events, response_object, sse

logger = logging.getLogger(__name__)
POLL_SECONDS = 0.5
FOLLOW_WAIT_SECONDS = 15.0
PUSHED_POLL_SECONDS = 1.0
# Channel-layer calls in flight per event loop: a thousand clients arriving at once must not
# ask the layer's connection pool for a thousand connections.
LAYER_CONCURRENCY = 16


def job_group(job_id: uuid.UUID) -> str:
    return f"flex.job.{job_id.hex}"


def push_layer() -> BaseChannelLayer | None:
    """The channel layer, when it can carry a wake-up from a worker process to a gateway process."""
    layer = get_channel_layer()
    return None if layer is None or isinstance(layer, InMemoryChannelLayer) else layer


_slots: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}


def layer_slots() -> asyncio.Semaphore:
    """This event loop's share of the channel layer's connections."""
    loop = asyncio.get_running_loop()
    slots = _slots.get(loop)
    if slots is None:
        for old in [other for other in _slots if other.is_closed()]:
            del _slots[old]
        slots = _slots[loop] = asyncio.Semaphore(LAYER_CONCURRENCY)
    return slots


async def announce(job_ids: list[uuid.UUID]) -> None:
    """Wake the clients waiting for these jobs, wherever they are held. Best effort: polling backs it up."""
    layer = push_layer()
    if layer is None:
        return
    for job_id in job_ids:
        try:
            async with layer_slots():
                await layer.group_send(job_group(job_id), {"type": "flex.finished", "job": job_id.hex})
        except Exception:
            logger.warning("Could not announce the end of flex job %s", job_id, exc_info=True)


class _Waiters:
    """The futures of one event loop's held clients, by job id, and the tasks that resolve them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.futures: dict[uuid.UUID, set[asyncio.Future[None]]] = {}
        self.poller: asyncio.Task[None] | None = None
        self.listener: asyncio.Task[None] | None = None
        self.channel: str | None = None
        self.layer = push_layer()
        self.opening = asyncio.Lock()

    def resolve(self, job_id: uuid.UUID) -> None:
        for future in self.futures.pop(job_id, ()):
            if not future.done():
                future.set_result(None)

    async def wait(self, job_id: uuid.UUID, timeout: float) -> bool:
        """Wait until the job finishes (True) or the timeout passes (False)."""
        future: asyncio.Future[None] = self.loop.create_future()
        self.futures.setdefault(job_id, set()).add(future)
        if self.poller is None or self.poller.done():
            self.poller = self.loop.create_task(self._poll())
        subscribed = await self._subscribe(job_id)
        try:
            await asyncio.wait_for(future, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            waiting = self.futures.get(job_id)
            if waiting is not None:
                waiting.discard(future)
                if not waiting:
                    del self.futures[job_id]
            if subscribed and self.layer is not None and self.channel is not None:
                try:
                    async with layer_slots():
                        await self.layer.group_discard(job_group(job_id), self.channel)
                except Exception:
                    logger.debug("Could not leave the group of flex job %s", job_id, exc_info=True)

    async def _subscribe(self, job_id: uuid.UUID) -> bool:
        if self.layer is None:
            return False
        try:
            async with self.opening:  # a thousand clients arriving together share one channel
                if self.channel is None or self.listener is None or self.listener.done():
                    self.channel = await self.layer.new_channel()
                    self.listener = self.loop.create_task(self._listen(self.channel))
            async with layer_slots():
                await self.layer.group_add(job_group(job_id), self.channel)
            return True
        except Exception:
            logger.warning("Channel layer unavailable; flex waiters fall back to polling", exc_info=True)
            return False

    async def _listen(self, channel: str) -> None:
        assert self.layer is not None
        while True:
            try:
                message = await self.layer.receive(channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # With redis-py 8, an idle receive() raises a read timeout every few seconds; the
                # channel and its groups are intact, so keep listening (the poll covers any gap).
                if not isinstance(exc, TimeoutError | RedisTimeout):
                    logger.warning("Flex wake-up channel error; listening again", exc_info=True)
                    await asyncio.sleep(1)
                continue
            try:
                self.resolve(uuid.UUID(message["job"]))
            except (KeyError, ValueError):
                continue

    async def _poll(self) -> None:
        interval = PUSHED_POLL_SECONDS if self.layer is not None else POLL_SECONDS
        while self.futures:
            await asyncio.sleep(interval)
            if not self.futures:
                break
            try:
                finished = await in_thread(finished_job_ids, list(self.futures))
            except Exception:
                logger.exception("Could not poll flex jobs; trying again")
                continue
            for job_id in finished:
                self.resolve(job_id)


_hubs: dict[asyncio.AbstractEventLoop, _Waiters] = {}


def waiters() -> _Waiters:
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        for old in [other for other in _hubs if other.is_closed()]:
            del _hubs[old]
        hub = _hubs[loop] = _Waiters(loop)
    return hub


# --- the request side ----------------------------------------------------------------------------

_abandoned: set[asyncio.Task[bool]] = set()


async def submit(call: GatewayCall) -> HttpResponseBase:
    """Queue a validated flex request; answer 202 for a background one, else hold until it ends."""
    background = call.path == "responses" and call.body.get("background") is True
    # The model actually served (after a redirect) is the one the worker calls.
    job = await in_thread(submit_flex_job, **call.job_fields(call.served.alias), background=background)
    call.recorded = True  # by the worker that runs it
    if background:
        return accepted(job, stream=call.stream)
    return await hold(call, job)


def accepted(job: InferenceRequest, *, stream: bool) -> HttpResponseBase:
    """The answer to a background response just started: a 202 with the response, or its events."""
    if not stream:
        return json_response(response_object(job), 202)
    return follow(job)


def follow(job: InferenceRequest, after: int = -1) -> StreamingHttpResponse:
    """A response's events as a stream, those numbered above `after` (a client resuming with
    `starting_after`): response.created and .in_progress (or .queued) at once, the rest once it ends."""

    async def events() -> AsyncIterator[bytes]:
        current = job
        sent = 2
        if current.state in UNFINISHED_STATES:
            started = response_events(response_object(current))[:2]
            if current.openai_status == "queued":
                started[1] = {**started[1], "type": "response.queued"}
            for event in started[after + 1 :]:
                yield sse(event, event["type"])
            while not await waiters().wait(current.id, FOLLOW_WAIT_SECONDS):
                yield b": waiting\n\n"  # an SSE comment: keeps proxies from closing an idle stream
            finished = await in_thread(InferenceRequest.objects.filter(pk=current.id).first)
            if finished is None:  # deleted meanwhile
                return
            current = finished
        else:
            sent = 0
        for event in response_events(response_object(current))[max(sent, after + 1) :]:
            yield sse(event, event["type"])

    response = StreamingHttpResponse(events(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    return response


async def hold(call: GatewayCall, job: InferenceRequest) -> HttpResponse:
    """Wait, on the event loop, for the job to end or its deadline to pass; answer like the upstream."""
    assert job.deadline is not None
    # A little past the deadline: event-loop timers may fire up to a clock tick early.
    remaining = job.deadline.timestamp() - time.time() + 0.05
    try:
        finished = await waiters().wait(job.id, max(remaining, 0.0))
    except asyncio.CancelledError:
        # The client went away: nobody can read a blocking job's result, so it must not run or be charged.
        task = asyncio.get_running_loop().create_task(in_thread(cancel_abandoned_job, job.id))
        _abandoned.add(task)
        task.add_done_callback(_abandoned.discard)
        raise
    if finished:
        job = await in_thread(InferenceRequest.objects.get, pk=job.id)
    else:
        job = await in_thread(expire_job, job.id)
    return job_reply(job, stream=call.stream)
