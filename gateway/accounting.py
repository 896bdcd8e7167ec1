"""Billing and request logs, written in batches off the request path.

A finished call becomes a :class:`CallRecord` appended to an in-memory list; a task on the
event loop writes the list every ``GATEWAY_ACCOUNTING_FLUSH_SECONDS`` in one transaction (usage
ledger rows, balances, request-log rows), and whatever is left is written at shutdown. Charges
are keyed by request id, so writing a record twice never charges twice.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.models import ApiKey
from billing.models import Tariff
from billing.services import Usage, charge_usages, cost_of, select_tariff
from dwctl_site.bulk import insert_rows
from gateway.db import in_thread
from gateway.models import RequestLog

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class CallRecord:
    request_id: str
    user_id: int
    api_key_id: int | None
    model_id: int
    model_alias: str
    path: str
    tier: str
    status_code: int
    started_at: float
    latency_ms: float
    ttfb_ms: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


def is_billable(record: CallRecord) -> bool:
    return record.status_code < 400 and (record.input_tokens or record.output_tokens) is not None


def write_records(records: list[CallRecord]) -> None:
    """Charge and log a batch in one transaction; if the batch is refused, write record by record.

    A record refused on its own (its user or key was deleted meanwhile) is logged and dropped,
    so one bad record never blocks the others.
    """
    try:
        _write_batch(records)
    except IntegrityError:
        if len(records) == 1:
            logger.exception("Dropped a call record the database refused: %s", records[0])
            return
        for record in records:
            write_records([record])


def _write_batch(records: list[CallRecord]) -> None:
    started = {id(r): datetime.fromtimestamp(r.started_at, tz=UTC) for r in records}
    tariffs: dict[int, list[Tariff]] = {}
    for version in Tariff.objects.filter(model_id__in={r.model_id for r in records if is_billable(r)}):
        tariffs.setdefault(version.model_id, []).append(version)
    costs: dict[str, Decimal | None] = {}
    usages = []
    for record in records:
        cost: Decimal | None = None
        if is_billable(record):
            tariff = select_tariff(tariffs.get(record.model_id, ()), record.tier, started[id(record)])
            cost = cost_of(tariff, record.input_tokens or 0, record.output_tokens or 0)
            usages.append(
                Usage(
                    user_id=record.user_id,
                    source_id=record.request_id,
                    model_alias=record.model_alias,
                    tier=record.tier,
                    input_tokens=record.input_tokens or 0,
                    output_tokens=record.output_tokens or 0,
                    cost=cost,
                )
            )
        costs[record.request_id] = cost
    with transaction.atomic():
        charge_usages(usages)
        insert_rows(
            RequestLog,
            (
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
                "created_at",
            ),
            [
                (
                    r.request_id,
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
                    costs[r.request_id],
                    started[id(r)],
                )
                for r in records
            ],
            skip_conflicts=True,
        )
        key_ids = {r.api_key_id for r in records if r.api_key_id is not None}
        if key_ids:
            # A plain UPDATE: no signal, so last-used times never invalidate the auth snapshot.
            ApiKey.objects.filter(id__in=key_ids).update(last_used_at=timezone.now())


class _Accountant:
    def __init__(self) -> None:
        self.pending: list[CallRecord] = []
        self.flusher: asyncio.Task[None] | None = None
        # Held while a batch is written, so flush() returns only when everything taken is written.
        self.writing = threading.Lock()

    def add(self, record: CallRecord) -> None:
        self.pending.append(record)
        loop = asyncio.get_running_loop()
        if self.flusher is None or self.flusher.done() or self.flusher.get_loop() is not loop:
            self.flusher = loop.create_task(self._run())

    def _take(self) -> list[CallRecord]:
        batch, self.pending = self.pending, []
        return batch

    def flush(self) -> None:
        """Write everything pending now (sync: shutdown, tests)."""
        with self.writing:
            batch = self._take()
            if not batch:
                return
            try:
                write_records(batch)
            except Exception:
                # Keep them for the next flush; request ids make writing them again harmless.
                self.pending[:0] = batch
                raise

    async def aflush(self) -> None:
        await in_thread(self.flush)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(settings.GATEWAY_ACCOUNTING_FLUSH_SECONDS)
            if not self.pending:
                continue
            try:
                await in_thread(self.flush)
            except Exception:
                logger.exception("Could not write call records; will retry")


accountant = _Accountant()


@atexit.register
def _flush_at_exit() -> None:
    if accountant.pending:
        try:
            accountant.flush()
        except Exception:
            logger.exception("Lost %d call records at exit", len(accountant.pending))
