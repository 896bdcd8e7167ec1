"""Pricing, charging and request logs: the one path every tier's finished calls go through.

A finished call becomes a :class:`CallRecord`. :func:`account` prices it (tariff of its tier in
force when it started → cost), charges it, logs it and puts the cost on its job record.
Real-time calls reach it in batches off the request path: appended to this process's journal
(gateway.journal) before the client has the call's last byte, and written from there every
``GATEWAY_ACCOUNTING_FLUSH_SECONDS``, one transaction per journal segment (whatever is left is
written at shutdown, or by the next process after a crash). The flex worker calls it inside the
transaction that settles its jobs. Charges are keyed by request id, so writing a record twice
never charges twice.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Sum
from django.utils import timezone

from accounts.models import ApiKey
from billing.models import Tariff
from billing.services import Usage, charge_usages, cost_of, select_tariff
from common.bulk import insert_rows
from gateway import budget, metrics
from gateway.db import in_thread
from gateway.jobs import record_response
from gateway.journal import Segment, journal
from gateway.ledger_cache import PROCESS
from gateway.models import InferenceRequest, RequestLog

logger = logging.getLogger(__name__)
# Every this many flush intervals, look for journals left by processes that died.
ORPHAN_ROUNDS = 20


@dataclass(slots=True)
class CallRecord:
    """One finished upstream call, as every tier reports it for pricing and logging."""

    request_id: str
    user_id: int | None  # None: refused before its key was known
    api_key_id: int | None
    model_id: int | None  # None: the model was retired before the call, nothing to price
    model_alias: str
    path: str
    tier: str
    status_code: int
    started_at: datetime  # the call is priced at the tariff in force then
    latency_ms: float
    ttfb_ms: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    job_id: uuid.UUID | None = None  # the InferenceRequest that records this call, which gets its cost
    usage_estimated: bool = False  # the upstream reported no usage: tokens are the gateway's own count
    committed: int = 0  # nano-credits credit admission holds for it until it is written (gateway.budget)
    process: str = PROCESS  # the process that recorded it
    job: dict[str, Any] | None = None  # a /responses record the database could not take when the call ended
    client_request_id: str = ""  # the X-Client-Request-Id the client sent, if any
    error_code: str = ""  # the code of the OpenAI error it was answered with
    key_prefix: str = ""  # the first characters of the key it presented
    client_ip: str | None = None
    # A model call of a response's loop (gateway.loop): its number from 1, each charged on its own
    # (the first as any single call is); 0 for a call that is not part of a loop.
    step: int = 0
    completion_window: str = ""  # a batch line's window: it is priced at that window's batch tariff

    @classmethod
    def from_line(cls, line: list[Any] | dict[str, Any]) -> CallRecord:
        """A record as the journal holds it: a :func:`journal_line` (or, from a journal of an
        earlier version, an object of the fields)."""
        if isinstance(line, dict):
            line["started_at"] = datetime.fromisoformat(line["started_at"])
            if line["job_id"] is not None:
                line["job_id"] = uuid.UUID(line["job_id"])
            return cls(**line)
        record = cls(*line)
        record.started_at = datetime.fromtimestamp(line[8], tz=UTC)
        if record.job_id is not None:
            record.job_id = uuid.UUID(hex=line[13])
        return record

    @property
    def billable(self) -> bool:
        return (
            self.status_code < 400
            and self.model_id is not None
            and self.user_id is not None
            and self.input_tokens is not None
        )

    @property
    def source_id(self) -> str:
        """The ledger's idempotency key: a recorded call is charged under its job's id, a loop's
        later model calls under the job's id and their number."""
        if self.job_id is None:
            return self.request_id
        return f"{self.job_id}:{self.step}" if self.step > 1 else str(self.job_id)


def step_request_id(request_id: str, step: int) -> str:
    """The request id a loop's model call is logged under: the response's own for the first."""
    return f"{request_id}.{step}" if step > 1 else request_id


def journal_line(
    *,
    request_id: str,
    user_id: int | None,
    api_key_id: int | None,
    model_id: int | None,
    model_alias: str,
    path: str,
    tier: str,
    status_code: int,
    started_at: float,
    latency_ms: float,
    ttfb_ms: float | None,
    input_tokens: int | None,
    output_tokens: int | None,
    job_id: str | None,
    usage_estimated: bool,
    committed: int,
    job: dict[str, Any] | None,
    client_request_id: str,
    error_code: str = "",
    key_prefix: str = "",
    client_ip: str | None = None,
    step: int = 0,
) -> tuple[Any, ...]:
    """A finished real-time call as its journal line: CallRecord's fields in their order, the start
    as a POSIX time, the job id as hex. A tuple, not a record: built and written on every call."""
    return (
        request_id,
        user_id,
        api_key_id,
        model_id,
        model_alias,
        path,
        tier,
        status_code,
        started_at,
        latency_ms,
        ttfb_ms,
        input_tokens,
        output_tokens,
        job_id,
        usage_estimated,
        committed,
        PROCESS,
        job,
        client_request_id,
        error_code,
        key_prefix,
        client_ip,
        step,
    )


def price(records: list[CallRecord]) -> dict[str, Decimal]:
    """The cost of each billable record (by request id): its tokens at its tier's tariff when it started."""
    billable = [r for r in records if r.billable]
    tariffs: dict[int, list[Tariff]] = {}
    for version in Tariff.objects.filter(model_id__in={r.model_id for r in billable}):
        tariffs.setdefault(version.model_id, []).append(version)
    return {
        r.request_id: cost_of(
            select_tariff(tariffs.get(r.model_id or 0, ()), r.tier, r.started_at, r.completion_window),
            r.input_tokens or 0,
            r.output_tokens or 0,
        )
        for r in billable
    }


LOG_COLUMNS = (
    "request_id",
    "user_id",
    "api_key_id",
    "model_alias",
    "path",
    "service_tier",
    "status_code",
    "latency_ms",
    "ttfb_ms",
    "input_tokens",
    "output_tokens",
    "cost",
    "usage_estimated",
    "client_request_id",
    "error_code",
    "key_prefix",
    "client_ip",
    "created_at",
)


def account(records: list[CallRecord]) -> dict[str, Decimal]:
    """Price, charge and log finished calls, in the caller's transaction; returns the costs by request id.

    The one path for every tier: a usage ledger row and balance move per billable call (idempotent
    by source id), a request-log row per call, the cost on the call's job record, keys' last use.
    """
    for r in records:
        if r.job is not None and not InferenceRequest.objects.filter(pk=r.job["job_id"]).exists():
            record_response(**r.job)
    costs = price(records)
    charged = charge_usages(
        [
            Usage(
                user_id=r.user_id,  # type: ignore[arg-type]  # a billable record has its user
                source_id=r.source_id,
                model_alias=r.model_alias,
                tier=r.tier,
                input_tokens=r.input_tokens or 0,
                output_tokens=r.output_tokens or 0,
                cost=costs[r.request_id],
            )
            for r in records
            if r.request_id in costs
        ]
    )
    if charged:
        # Counted once committed, and only what was charged now: a batch written again adds nothing.
        fresh = set(charged)
        charges = [(r.model_alias, r.tier, float(costs[r.request_id])) for r in records if r.source_id in fresh]
        transaction.on_commit(lambda: metrics.count_credits(charges))
    insert_rows(
        RequestLog,
        LOG_COLUMNS,
        [
            (
                f"req_{r.request_id}",  # the x-request-id its client saw
                r.user_id,
                r.api_key_id,
                r.model_alias,
                r.path,
                r.tier,
                r.status_code,
                r.latency_ms,
                r.ttfb_ms,
                r.input_tokens,
                r.output_tokens,
                costs.get(r.request_id),
                r.usage_estimated,
                r.client_request_id,
                r.error_code,
                r.key_prefix,
                r.client_ip,
                r.started_at,
            )
            for r in records
        ],
        skip_conflicts=True,
    )
    looped: dict[uuid.UUID, int] = {}
    for r in records:
        if r.job_id is not None and r.step:
            looped[r.job_id] = max(looped.get(r.job_id, 0), r.step)
        elif r.job_id is not None and r.request_id in costs:
            InferenceRequest.objects.filter(pk=r.job_id).update(cost=costs[r.request_id])
    for job_id, last in looped.items():
        # A loop's cost is the sum of its model calls' (written in any order, any number of times).
        ids = [f"req_{step_request_id(job_id.hex, step)}" for step in range(1, last + 1)]
        total = RequestLog.objects.filter(request_id__in=ids).aggregate(total=Sum("cost"))["total"]
        if total is not None:
            InferenceRequest.objects.filter(pk=job_id).update(cost=total)
    key_ids = {r.api_key_id for r in records if r.api_key_id is not None}
    if key_ids:
        # A plain UPDATE: no signal, so last-used times never invalidate the auth snapshot.
        ApiKey.objects.filter(id__in=key_ids).update(last_used_at=timezone.now())
    return costs


def write_records(records: list[CallRecord]) -> None:
    """Account a batch in one transaction; if the batch is refused, write record by record.

    A record refused on its own (its user or key was deleted meanwhile) is logged and dropped,
    so one bad record never blocks the others.
    """
    try:
        with transaction.atomic():
            account(records)
    except IntegrityError:
        if len(records) == 1:
            logger.exception("Dropped a call record the database refused: %s", records[0])
            return
        for record in records:
            write_records([record])


class _Accountant:
    """Journals each finished call at once and writes the journal to the database in batches."""

    def __init__(self) -> None:
        self.flusher: asyncio.Task[None] | None = None
        # Held while segments are written, so flush() returns only when everything sealed is written.
        self.writing = threading.Lock()

    def add(self, line: tuple[Any, ...]) -> None:
        """Journal a finished call (a :func:`journal_line`), to be written with the next batch."""
        journal().append(line)
        loop = asyncio.get_running_loop()
        if self.flusher is None or self.flusher.done() or self.flusher.get_loop() is not loop:
            self.flusher = loop.create_task(self._run())

    @property
    def pending(self) -> int:
        """Journal segments not yet written."""
        return journal().backlog

    def _write(self, segment: Segment) -> None:
        records = [CallRecord.from_line(line) for line in segment.lines()]
        if records:
            write_records(records)
            budget.written((r.user_id, r.committed, r.process) for r in records if r.user_id is not None)

    def flush(self) -> None:
        """Write every sealed segment of this process, oldest first (sync: the flusher, shutdown,
        tests). A failure leaves the rest on disk for the next flush; request ids make writing a
        segment again harmless."""
        with self.writing:
            for segment in journal().seal():
                self._write(segment)
                journal().done(segment)

    def drain_orphans(self) -> int:
        """Write the journals of processes that died; returns how many segments."""
        drained = 0
        with self.writing:
            for segment in journal().orphans():
                try:
                    self._write(segment)
                except Exception:
                    os.close(segment.fd)  # unlocked: the next look tries it again
                    raise
                segment.remove()
                drained += 1
        if drained:
            logger.warning("Wrote %d journal segments left by processes that stopped", drained)
        return drained

    async def aflush(self) -> None:
        await in_thread(self.flush)

    async def _run(self) -> None:
        rounds = 0
        while True:
            try:
                if rounds % ORPHAN_ROUNDS == 0:
                    await in_thread(self.drain_orphans)
                rounds += 1
                await asyncio.sleep(settings.GATEWAY_ACCOUNTING_FLUSH_SECONDS)
                if journal().backlog:
                    await in_thread(self.flush)
                metrics.set_journal_backlog(journal().backlog)
            except Exception as exc:
                logger.warning("Could not write call records; they wait in the journal: %s", exc)


accountant = _Accountant()


@atexit.register
def _flush_at_exit() -> None:
    if accountant.pending:
        try:
            accountant.flush()
        except Exception:
            logger.exception("Could not write the journal at exit; the next process will")
