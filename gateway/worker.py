"""Flex workers: one django-q2 task runs many queued calls at once on an event loop.

A django-q2 worker process runs one task at a time, and an upstream call can take minutes, so
one task per job would cap in-flight calls at the number of worker processes. Instead a task
starts a :class:`Runner`: it claims up to ``GATEWAY_FLEX_IN_FLIGHT`` due jobs (each model within
its ``flex_concurrency``, counted in the database across all workers), runs them concurrently
with the shared async upstream client, and claims more as calls finish. It claims a job only
while the job's endpoint timeout still fits before django-q2's ``timeout``, and gives back to the
queue whatever it could not finish, so it always returns in time; the atomic claim makes a second
delivery of the same task harmless. Outcomes are written in small batches, one transaction each.

Each claim is a lease the runner renews while the job is in flight; when a worker dies its leases
lapse and the next claim, by any runner, takes those jobs back. A runner that can claim nothing
ends at once, and every runner sweeps (gateway.queue.sweep_jobs) as it goes, so neither a full cap
nor a backlog of tasks keeps the queue from moving.

Run it with ``manage.py qcluster``; tests call :func:`run_flex_jobs` directly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django_q.conf import Conf

from gateway import budget, clients
from gateway.accounting import accountant
from gateway.batch_store import finalize_batches
from gateway.db import in_thread
from gateway.errors import DEADLINE_MESSAGE, MODEL_RETIRED_MESSAGE, error_envelope
from gateway.flex import announce
from gateway.loop import Loop
from gateway.models import InferenceRequest
from gateway.queue import (
    RETRY_MAX_SECONDS,
    Outcome,
    claim_jobs,
    keep_loop_progress,
    release_jobs,
    renew_leases,
    settle_jobs,
    start_jobs,
    sweep_jobs,
)
from gateway.snapshot import ModelEntry, Snapshot, get_snapshot
from gateway.upstream import UpstreamResult, call_upstream, error_message, failure_of, parse_json

logger = logging.getLogger(__name__)
# Fields of the client's request that only the gateway reads: the worker's call is a plain one.
QUEUE_ONLY_FIELDS = ("stream", "stream_options", "service_tier", "background")
POLL_SECONDS = 0.5
# At most this often a busy runner claims more jobs (one claim serves every slot freed meanwhile).
CLAIM_INTERVAL = 0.1
# Outcomes wait this long for company before they are written in one transaction.
SETTLE_BATCH_SECONDS = 0.05
# A runner stays this long after it scheduled a retry (RETRY_MAX_SECONDS at most), to run it.
RETRY_HORIZON_SECONDS = RETRY_MAX_SECONDS + 1
# Every runner sweeps this often (gateway.queue.sweep_jobs), so no queue of tasks can starve the sweep.
SWEEP_SECONDS = 30
# A runner whose batch lines end looks for batches to finalize at most this often.
FINALIZE_SECONDS = 1.0


def worker_name() -> str:
    """Who holds a claim: host and pid (so the sweep can tell a dead process) and a unique suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def task_timeout() -> float:
    """django-q2's task time limit, as django-q2 itself read it."""
    return float(Conf.TIMEOUT or 120)


@dataclass
class Runner:
    """Claims and runs flex jobs concurrently until the queue is empty or its time is up."""

    max_in_flight: int = field(default_factory=lambda: getattr(settings, "GATEWAY_FLEX_IN_FLIGHT", 200))
    # Cancel and give back whatever still runs after this many seconds: always inside django-q2's
    # timeout. Until then a job is claimed only if its endpoint's timeout fits in the time left.
    hard_stop: float = field(default_factory=lambda: max(task_timeout() - 10, 1))
    # Stop claiming after this many seconds (default: the hard stop); with `linger`, stay this long
    # even when the queue is empty.
    lifetime: float | None = None
    linger: bool = False
    sweep_every: float | None = SWEEP_SECONDS
    name: str = field(default_factory=worker_name)
    # Set from another thread to make the runner give its jobs back and return (tests, shutdown).
    stop: threading.Event | None = None
    finished: int = 0
    in_flight: dict[asyncio.Task[None], uuid.UUID] = field(default_factory=dict)
    outcomes: list[tuple[Outcome, asyncio.Future[str | None]]] = field(default_factory=list)
    writer: asyncio.Task[None] | None = None
    snapshot: Snapshot | None = None
    started: float = 0.0
    retries_until: float = 0.0  # seconds into the run until which a retry this runner scheduled may come due
    holds: dict[uuid.UUID, budget.Hold] = field(default_factory=dict)  # credits reserved per job in flight
    batch_lines: set[uuid.UUID] = field(default_factory=set)  # the batch lines in flight: nobody waits on them
    finalizer: asyncio.Task[None] | None = None
    finalize_again: bool = False

    async def run(self) -> int:
        started = self.started = time.monotonic()
        if self.lifetime is None:
            self.lifetime = self.hard_stop
        # A drain sweeps as it starts; any other runner once it has run for a sweep interval, so a
        # burst of dispatches is not a burst of sweeps, and busy workers still sweep.
        last_sweep = -float("inf") if self.linger else 0.0
        last_claim = -float("inf")
        heartbeat = asyncio.get_running_loop().create_task(self.keep_leases())
        try:
            while True:
                now = time.monotonic() - started
                if self.sweep_every is not None and now - last_sweep >= self.sweep_every:
                    last_sweep = now
                    await self.sweep()
                claimed = 0
                if now < self.lifetime and (not self.in_flight or now - last_claim >= CLAIM_INTERVAL):
                    last_claim = now
                    claimed = await self.top_up()
                # Nothing to run and nothing claimable: end (a dispatch never waits on a full cap),
                # unless a retry this runner scheduled is about to come due.
                idle = not self.in_flight and not claimed
                if idle and (now >= self.lifetime or (not self.linger and now >= self.retries_until)):
                    break
                if now >= self.hard_stop or (self.stop is not None and self.stop.is_set()):
                    await self.give_back()
                    break
                if self.in_flight:
                    done, _ = await asyncio.wait(
                        self.in_flight, timeout=POLL_SECONDS, return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in done:
                        self.in_flight.pop(task, None)
                    # Let a few more calls finish, so one claim tops up for several of them.
                    await asyncio.sleep(max(0.0, last_claim + CLAIM_INTERVAL - (time.monotonic() - started)))
                elif not claimed:
                    await asyncio.sleep(POLL_SECONDS)
        finally:
            if self.in_flight:
                await self.give_back()
            heartbeat.cancel()
            if self.writer is not None:
                await asyncio.gather(self.writer, return_exceptions=True)
            if self.finalizer is not None:
                await asyncio.gather(self.finalizer, return_exceptions=True)
            await clients.aclose()
        return self.finished

    async def keep_leases(self) -> None:
        """Renew the leases of the jobs in flight, every third of a lease: a missed renewal or two is harmless."""
        while True:
            await asyncio.sleep(settings.GATEWAY_FLEX_LEASE_SECONDS / 3)
            if self.in_flight:
                try:
                    await in_thread(renew_leases, self.name, list(self.in_flight.values()))
                except Exception:
                    logger.exception("Could not renew flex leases; trying again")

    async def sweep(self) -> None:
        try:
            await in_thread(accountant.drain_orphans)  # a gateway process that died left its journal
            await announce(await in_thread(sweep_jobs))
            await in_thread(finalize_batches)  # the sweep may have expired a batch's last lines
        except Exception:
            logger.exception("The flex sweep failed; it runs again on the next round")

    async def finalize(self) -> None:
        """A batch line ended: end the batches whose last line it was, at most once per FINALIZE_SECONDS
        (lines ending meanwhile are looked at by one more round)."""
        self.finalize_again = True
        if self.finalizer is None or self.finalizer.done():
            self.finalizer = asyncio.get_running_loop().create_task(self.finalize_rounds())

    async def finalize_rounds(self) -> None:
        while self.finalize_again:
            self.finalize_again = False
            try:
                await in_thread(finalize_batches)
            except Exception:
                logger.exception("Could not finalize batches; trying again as lines end and at the next sweep")
            await asyncio.sleep(FINALIZE_SECONDS)

    async def top_up(self) -> int:
        room = self.max_in_flight - len(self.in_flight)
        if room <= 0:
            return 0
        try:
            time_left = self.hard_stop - (time.monotonic() - self.started)
            jobs, refused, self.snapshot, holds = await in_thread(claim_and_start, self.name, room, time_left)
        except Exception:
            logger.exception("Could not claim flex jobs; trying again")
            return 0
        if refused:
            self.finished += len(refused)
            await announce(refused)
            await self.finalize()  # refused lines (no credits left) may have been a batch's last
        self.holds.update(holds)
        for job in jobs:
            task = asyncio.get_running_loop().create_task(self.run_job(job))
            self.in_flight[task] = job.id
            if job.batch_id is not None:
                self.batch_lines.add(job.id)
        return len(jobs)

    async def give_back(self) -> None:
        tasks = list(self.in_flight)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ids = list(self.in_flight.values())
        self.in_flight.clear()
        self.batch_lines.difference_update(ids)
        for job_id in ids:
            hold = self.holds.pop(job_id, None)
            if hold is not None:
                await budget.release_job(hold, 0)
        if ids:
            released = await in_thread(release_jobs, self.name, ids)
            logger.info("Gave %d unfinished flex jobs back to the queue", released)

    async def run_job(self, job: InferenceRequest) -> None:
        assert self.snapshot is not None
        model = self.snapshot.models.get(job.model_alias)
        if model is None:
            await self.settle(job, None, 404, None, MODEL_RETIRED_MESSAGE)
            return
        body = {name: value for name, value in job.request_body.items() if name not in QUEUE_ONLY_FIELDS}
        # Never past the job's deadline; the hard stop cancels the call itself (see give_back).
        remaining = job.deadline.timestamp() - time.time() if job.deadline else model.endpoint.timeout_seconds + 1
        started = time.perf_counter()
        tools = self.snapshot.tools_for(job.owner_id, model) if job.path == "responses" else ()
        if tools:
            await self.run_loop(job, model, Loop(model, body, tools, job.id.hex), remaining, started)
            return
        try:
            async with asyncio.timeout(max(remaining, 0.001)):
                result = await call_upstream(model, job.path, body)
        except clients.UpstreamError as exc:
            failure = failure_of(exc)
            await self.settle(job, model, failure.status, None, failure.message, started)
            return
        except TimeoutError:
            await self.settle(job, model, 504, None, DEADLINE_MESSAGE, started)
            return
        payload = parse_json(result.body)
        if result.status >= 400:
            await self.settle(
                job,
                model,
                result.status,
                payload if isinstance(payload, dict) else None,
                error_message(result),
                started,
            )
            return
        if job.path == "responses" and isinstance(payload, dict):
            payload["id"] = job.public_id
        await self.settle(job, model, result.status, payload, "", started, tokens=result.tokens)

    async def run_loop(
        self, job: InferenceRequest, model: ModelEntry, loop: Loop, remaining: float, started: float
    ) -> None:
        """A flex /responses job with server tools: the same loop as a realtime call (gateway.loop),
        each model call billed on its own when the job settles."""

        async def call_model(body: dict[str, Any]) -> UpstreamResult:
            return await call_upstream(model, job.path, body)

        async def finished_step() -> None:
            # A run again (this worker died, or the job is retried) goes on from here.
            await in_thread(keep_loop_progress, self.name, job.id, loop.progress())

        loop.resume(job.loop_state)
        try:
            async with asyncio.timeout(max(remaining, 0.001)):
                end = await loop.run(call_model, finished_step=finished_step)
        except TimeoutError:
            made = tuple(call.tokens for call in loop.model_calls)  # the calls it finished are billed
            await self.settle(job, model, 504, None, DEADLINE_MESSAGE, started, steps=loop.steps, model_calls=made)
            return
        body = end.body
        if end.status < 400 and isinstance(body, dict):
            body["id"] = job.public_id
        calls = tuple(made.tokens for made in loop.model_calls)
        await self.settle(
            job, model, end.status, body, end.error, started, tokens=end.tokens, steps=loop.steps, model_calls=calls
        )

    async def settle(
        self,
        job: InferenceRequest,
        model: ModelEntry | None,
        status: int,
        body: object,
        error: str,
        started: float | None = None,
        tokens: tuple[int | None, int | None] = (None, None),
        steps: list[dict[str, Any]] | None = None,
        model_calls: tuple[tuple[int | None, int | None], ...] = (),
    ) -> None:
        if body is None and status >= 400:
            body = error_envelope(status, error, code="upstream_error")
        outcome = Outcome(
            job_id=job.id,
            status=status,
            body=body,
            model_id=model.id if model else None,
            input_tokens=tokens[0],
            output_tokens=tokens[1],
            error=error,
            latency_ms=(time.perf_counter() - started) * 1000 if started is not None else 0.0,
            endpoint=model.endpoint.name if model else "",
            steps=steps,
            model_calls=model_calls,
        )
        settled: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.outcomes.append((outcome, settled))
        if self.writer is None or self.writer.done():
            self.writer = asyncio.get_running_loop().create_task(self.write_outcomes())
        state = await settled
        self.batch_lines.discard(job.id)
        if state in ("completed", "failed"):
            self.finished += 1
        elif state == "pending":  # a retry (due within RETRY_MAX_SECONDS): stay to run it
            self.retries_until = time.monotonic() - self.started + RETRY_HORIZON_SECONDS
        hold = self.holds.pop(job.id, None)
        if hold is not None:
            charged = 0
            if model is not None and state == "completed":
                charged = sum(budget.cost_nanos(model, job.price_key, used) for used in model_calls or (tokens,))
            await budget.release_job(hold, charged)

    async def write_outcomes(self) -> None:
        """Store outcomes in batches: calls that end together share one transaction."""
        while self.outcomes:
            if len(self.in_flight) > len(self.outcomes):  # others may end any moment: wait for them
                await asyncio.sleep(SETTLE_BATCH_SECONDS)
            batch, self.outcomes = self.outcomes, []
            try:
                states = await in_thread(settle_jobs, self.name, [outcome for outcome, _ in batch])
            except Exception:
                # Nothing was stored: the jobs stay claimed by us until the sweep re-queues them.
                logger.exception("Could not store %d flex outcomes", len(batch))
                states = {}
            for outcome, settled in batch:
                if not settled.done():  # a job given back meanwhile stopped waiting
                    settled.set_result(states.get(outcome.job_id))
            ended = [job_id for job_id, state in states.items() if state in ("completed", "failed")]
            await announce([job_id for job_id in ended if job_id not in self.batch_lines])
            if any(job_id in self.batch_lines for job_id in ended):
                await self.finalize()


def claim_and_start(
    worker: str, limit: int, time_left: float
) -> tuple[list[InferenceRequest], list[uuid.UUID], Snapshot, dict[uuid.UUID, budget.Hold]]:
    """Claim due jobs and reserve their credits: the jobs that may run, those refused, and the holds."""
    snapshot = get_snapshot()
    jobs = claim_jobs(worker, limit=limit, max_call_seconds=time_left)
    if not jobs:
        return [], [], snapshot, {}
    holds: dict[uuid.UUID, budget.Hold] = {}

    def reserve(balances: dict[int, tuple[int, int]]) -> list[uuid.UUID]:
        refused = []
        for job in jobs:
            model = snapshot.models.get(job.model_alias)
            if model is None:
                continue  # the call answers 404 without costing anything
            key = snapshot.keys_by_id.get(job.api_key_id) if job.api_key_id else None
            body = job.request_body
            hold = budget.reserve_job(model, job.price_key, body, job.owner_id, balances.get(job.owner_id, (0, 0)), key)
            if isinstance(hold, budget.Hold):
                holds[job.id] = hold
            elif hold is not None:
                refused.append(job.id)
        return refused

    try:
        runnable = set(start_jobs(worker, reserve))
    except BaseException:
        for hold in holds.values():
            budget.release_job_now(hold, 0)
        raise
    for job_id in set(holds) - runnable:
        budget.release_job_now(holds.pop(job_id), 0)
    refused = [job.id for job in jobs if job.id not in runnable]
    return [job for job in jobs if job.id in runnable], refused, snapshot, holds


def run_flex_jobs(**options: object) -> int:
    """Run one runner to its end (sync: a django-q2 task or a test); returns how many jobs it finished."""
    return asyncio.run(Runner(**options).run())  # type: ignore[arg-type]
