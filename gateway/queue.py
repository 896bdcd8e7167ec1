"""The flex queue: submit, claim, start, renew, settle, release, sweep.

A job moves pending → claimed (by one worker, atomically) → processing (balance re-checked, one
upstream attempt) → completed | failed | back to pending for a retry. A claim is a lease the
worker renews while it runs the job; once a lease lapses (the worker died) the job is claimable
again, by whichever worker claims next. Every write after the claim is conditional on the job
still being held by the same worker and unfinished, so a job that was cancelled, expired or
handed to another worker is never overwritten and never charged. A job is therefore run upstream
at least once, and charged at most once: its charge commits with its end state.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, Exists, F, OuterRef, Q
from django.utils import timezone

from billing.models import Balance, Tier
from gateway import metrics
from gateway.accounting import CallRecord, account, step_request_id
from gateway.budget import to_nanos
from gateway.errors import (
    BALANCE_TOO_LOW_MESSAGE,
    BATCH_EXPIRED,
    BATCH_EXPIRED_MESSAGE,
    DEADLINE_MESSAGE,
    GATEWAY_STOPPED_MESSAGE,
    MODEL_RETIRED_MESSAGE,
)
from gateway.jobs import GATEWAY_CLAIM_PREFIX, create_job, fail_jobs, failure_fields, outcome_fields
from gateway.limits import count_key_tokens
from gateway.models import HELD_STATES, DeployedModel, InferenceRequest, JobState

logger = logging.getLogger(__name__)
RETRYABLE_STATUSES = frozenset({408, 429})
# The tiers the workers run, in the order they take them.
QUEUED_TIERS = (Tier.FLEX, Tier.BATCH)
RETRY_FIRST_SECONDS = 1
RETRY_MAX_SECONDS = 10
# How long past its endpoint's timeout a gateway's call may stay unfinished before the sweep fails it.
STUCK_MARGIN_SECONDS = 60


def enqueue_dispatch() -> None:
    from django_q.tasks import async_task

    try:
        async_task("gateway.tasks.run_flex_jobs", q_options={"task_name": "flex dispatch"})
    except Exception:
        # The job is committed: the periodic drain runs it even if this hand-off is lost.
        logger.exception("Could not enqueue a flex dispatch; the periodic drain will pick the job up")


def submit_flex_job(*, background: bool = False, **fields: Any) -> InferenceRequest:
    """Queue a flex request (`fields` as for create_job) with its deadline; hand it to the workers once committed."""
    with transaction.atomic():
        job = create_job(
            **fields, service_tier=Tier.FLEX, background=background, deadline_seconds=settings.GATEWAY_FLEX_WINDOW
        )
        transaction.on_commit(enqueue_dispatch)
    return job


def claim_jobs(
    worker: str, *, limit: int, max_call_seconds: float | None = None, now: datetime | None = None
) -> list[InferenceRequest]:
    """Claim up to `limit` due queued jobs for `worker` (flex before batch lines), keeping each model
    within its flex_concurrency.

    Each claim is a lease the worker must renew (renew_leases); a job whose lease lapsed is claimed
    like a pending one. With `max_call_seconds`, only jobs whose endpoint timeout fits in that time
    are claimed.
    """
    now = now or timezone.now()
    if limit <= 0:
        return []
    lease = now + timedelta(seconds=settings.GATEWAY_FLEX_LEASE_SECONDS)
    due = InferenceRequest.objects.claimable(now).filter(Q(deadline__isnull=True) | Q(deadline__gt=now))
    skip_locked = connection.features.has_select_for_update_skip_locked
    claimed: list[uuid.UUID] = []
    # Read before the transaction: an idle poll must not take SQLite's write lock. One EXISTS per live
    # model, not a DISTINCT over every due job: a 50,000-line batch makes the queue that deep.
    queued = due.filter(service_tier__in=QUEUED_TIERS, model_alias=OuterRef("alias"))
    aliases = sorted(DeployedModel.objects.live().filter(Exists(queued)).values_list("alias", flat=True))
    if not aliases:
        return []
    with transaction.atomic():
        # One claimer per model at a time (a row lock on PostgreSQL; SQLite serialises writers anyway),
        # so two workers never both see room under the same cap.
        models = DeployedModel.objects.live().select_for_update(of=("self",)).filter(alias__in=aliases)
        if max_call_seconds is not None:
            models = models.filter(endpoint__timeout_seconds__lte=max_call_seconds)
        caps = dict(models.order_by("pk").values_list("alias", "flex_concurrency"))
        # Only live leases count: the claims of a worker that died stop holding the cap as their leases lapse.
        # Flex and batch calls share a model's flex_concurrency.
        busy = dict(
            InferenceRequest.objects.leased(now)
            .filter(service_tier__in=QUEUED_TIERS, model_alias__in=aliases)
            .values_list("model_alias")
            .annotate(n=Count("id"))
            .values_list("model_alias", "n")
        )
        # Every model's flex jobs before any batch line: a batch waits for room, a flex caller should not.
        for tier in QUEUED_TIERS:
            for alias in aliases:
                if alias not in caps:
                    continue  # a retired model (the sweep fails its jobs), or its calls may outlast this runner
                room = min(caps[alias] - busy.get(alias, 0), limit - len(claimed))
                if room <= 0:
                    continue
                candidates = due.filter(service_tier=tier, model_alias=alias)
                if skip_locked:
                    candidates = candidates.select_for_update(skip_locked=True)
                ids = list(candidates.values_list("id", flat=True)[:room])
                # Conditional on the job being claimable still: a pending job, or one whose lease lapsed.
                if ids:
                    taken = (
                        InferenceRequest.objects.filter(pk__in=ids)
                        .claimable(now)
                        .update(
                            state=JobState.CLAIMED,
                            claimed_by=worker,
                            claimed_at=now,
                            lease_expires_at=lease,
                            updated_at=now,
                        )
                    )
                    if taken:
                        claimed.extend(ids)
                        busy[alias] = busy.get(alias, 0) + taken
    if not claimed:
        return []
    return list(InferenceRequest.objects.filter(pk__in=claimed, claimed_by=worker, state=JobState.CLAIMED))


def start_jobs(worker: str, holds: Callable[[dict[int, tuple[int, int]]], list[uuid.UUID]]) -> list[uuid.UUID]:
    """Move this worker's claimed jobs to processing, failing, uncalled, those `holds` refuses: it is
    given the owners' balances as just read (user → version, nano-credits), reserves what the jobs
    may spend and returns the refused ids. Returns the ids that may now call the upstream."""
    claimed = InferenceRequest.objects.filter(claimed_by=worker, state=JobState.CLAIMED)
    owners = set(claimed.values_list("owner_id", flat=True))
    balances = {
        user_id: (version, to_nanos(amount))
        for user_id, version, amount in Balance.objects.filter(user_id__in=owners).values_list(
            "user_id", "version", "amount"
        )
    }
    broke = holds(balances)
    with transaction.atomic():
        if broke:
            claimed.filter(pk__in=broke).finish(**failure_fields(402, BALANCE_TOO_LOW_MESSAGE, "insufficient_credits"))
        runnable = list(claimed.values_list("id", flat=True))
        now = timezone.now()
        claimed.filter(pk__in=runnable).update(state=JobState.PROCESSING, attempts=F("attempts") + 1, updated_at=now)
    return runnable


def renew_leases(worker: str, job_ids: list[uuid.UUID]) -> int:
    """Extend this worker's leases on the jobs it still holds; returns how many it still holds."""
    until = timezone.now() + timedelta(seconds=settings.GATEWAY_FLEX_LEASE_SECONDS)
    held = InferenceRequest.objects.filter(pk__in=job_ids, claimed_by=worker, state__in=HELD_STATES)
    return held.update(lease_expires_at=until)


def keep_loop_progress(worker: str, job_id: uuid.UUID, progress: dict[str, Any]) -> int:
    """Keep a flex loop's progress on its job while this worker still runs it; returns the row count."""
    held = InferenceRequest.objects.filter(pk=job_id, claimed_by=worker, state=JobState.PROCESSING)
    return held.update(loop_state=progress, steps=progress["steps"], updated_at=timezone.now())


def is_retryable(status: int) -> bool:
    return status in RETRYABLE_STATUSES or status >= 500


@dataclass(frozen=True, slots=True)
class Outcome:
    """One upstream attempt of a job, as the worker saw it."""

    job_id: uuid.UUID
    status: int
    body: Any
    model_id: int | None
    input_tokens: int | None = None
    output_tokens: int | None = None
    error: str = ""
    latency_ms: float = 0.0
    endpoint: str = ""  # the name of the endpoint called, if one was
    steps: list[dict[str, Any]] | None = None  # a loop's steps (gateway.loop), for the record
    model_calls: tuple[tuple[int | None, int | None], ...] = ()  # a loop's model calls: the tokens of each

    @property
    def tokens(self) -> tuple[int | None, int | None]:
        return self.input_tokens, self.output_tokens

    def record(self, job: InferenceRequest) -> CallRecord:
        """The attempt that finished `job`, for pricing and logging (priced as of the job's submission)."""
        return CallRecord(
            request_id=job.id.hex,
            user_id=job.owner_id,
            api_key_id=job.api_key_id,
            model_id=self.model_id,
            model_alias=job.model_alias,
            path=job.path,
            tier=job.service_tier,
            status_code=self.status,
            started_at=job.created_at,
            latency_ms=self.latency_ms,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            job_id=job.id,
            completion_window=job.completion_window,
        )

    def records(self, job: InferenceRequest) -> list[CallRecord]:
        """The calls that finished `job`: one, or each model call of its loop, billed on its own."""
        if not self.model_calls:
            return [self.record(job)]
        records = []
        for number, (input_tokens, output_tokens) in enumerate(self.model_calls, start=1):
            record = self.record(job)
            record.request_id = step_request_id(job.id.hex, number)
            record.step = number
            record.input_tokens, record.output_tokens = input_tokens, output_tokens
            if number < len(self.model_calls):
                record.status_code, record.latency_ms = 200, 0.0
            records.append(record)
        return records


def settle_jobs(worker: str, outcomes: list[Outcome]) -> dict[uuid.UUID, str | None]:
    """Store upstream attempts' outcomes: complete and charge, schedule a retry, or fail.

    One transaction for the batch; each job's charge and state change commit together, and only
    while the job is still this worker's and unfinished. Returns each job's new state, or None
    for a job that was no longer ours (cancelled, expired, swept).
    """
    now = timezone.now()
    states: dict[uuid.UUID, str | None] = {outcome.job_id: None for outcome in outcomes}
    with transaction.atomic():
        jobs = {
            job.id: job
            for job in InferenceRequest.objects.select_for_update().filter(
                pk__in=list(states), claimed_by=worker, state=JobState.PROCESSING
            )
        }
        records: list[CallRecord] = []
        ended: list[Outcome] = []
        for outcome in outcomes:
            job = jobs.get(outcome.job_id)
            if job is None:
                continue
            states[job.id] = _retry(job, outcome, now) or _finish(job, outcome, now)
            if states[job.id] != JobState.PENDING:
                for record in outcome.records(job):
                    records.append(record)
                    ended.append(outcome)
        account(records)
    count_key_tokens(records)  # once committed: a key's tokens per minute counts its flex calls too
    for record, outcome in zip(records, ended, strict=True):
        metrics.observe_call(
            record.model_alias,
            record.tier,
            record.status_code,
            record.latency_ms / 1000,
            tokens=(record.input_tokens, record.output_tokens),
            endpoint=outcome.endpoint,
        )
    return states


def _retry(job: InferenceRequest, outcome: Outcome, now: datetime) -> str | None:
    """Put a job whose attempt may succeed later back in the queue, if its deadline leaves time."""
    if not is_retryable(outcome.status) or job.attempts >= settings.GATEWAY_QUEUE_MAX_ATTEMPTS:
        return None
    delay = min(RETRY_FIRST_SECONDS * 2 ** max(job.attempts - 1, 0), RETRY_MAX_SECONDS)
    not_before = now + timedelta(seconds=delay)
    if job.deadline is not None and not_before >= job.deadline:
        return None
    error = f"Attempt {job.attempts} failed with status {outcome.status}: {outcome.error or 'upstream error'}"
    InferenceRequest.objects.filter(pk=job.pk).update(
        state=JobState.PENDING,
        not_before=not_before,
        claimed_by="",
        claimed_at=None,
        lease_expires_at=None,
        error=error[:2000],
        updated_at=now,
    )
    return JobState.PENDING


def _finish(job: InferenceRequest, outcome: Outcome, now: datetime) -> str:
    error = outcome.error
    if is_retryable(outcome.status):
        why = (
            f"given up after {job.attempts} attempts"
            if job.attempts >= settings.GATEWAY_QUEUE_MAX_ATTEMPTS
            else "no time left to retry before the deadline"
        )
        error = f"{error or f'The upstream answered {outcome.status}'}; {why}."
    fields = outcome_fields(outcome.status, outcome.body, tokens=outcome.tokens, error=error, steps=outcome.steps)
    InferenceRequest.objects.filter(pk=job.pk).finish(**fields)
    return str(fields["state"])


def release_jobs(worker: str, job_ids: list[uuid.UUID]) -> int:
    """Give jobs this worker can no longer finish back to the queue, not counting the interrupted attempt."""
    now = timezone.now()
    held = InferenceRequest.objects.filter(pk__in=job_ids, claimed_by=worker)
    back = {
        "state": JobState.PENDING,
        "claimed_by": "",
        "claimed_at": None,
        "lease_expires_at": None,
        "not_before": now,
        "updated_at": now,
    }
    with transaction.atomic():
        released = held.filter(state=JobState.CLAIMED).update(**back)
        released += held.filter(state=JobState.PROCESSING, attempts__gt=0).update(**back, attempts=F("attempts") - 1)
    return released


def process_is_gone(claimed_by: str) -> bool:
    """True when `claimed_by` names a process on this host that no longer runs (or is a zombie)."""
    parts = claimed_by.removeprefix(GATEWAY_CLAIM_PREFIX).split(":")
    if len(parts) < 2 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    try:
        with open(f"/proc/{parts[1]}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False
    return state in {b"Z", b"X"}


def sweep_jobs(*, now: datetime | None = None) -> list[uuid.UUID]:
    """Fail expired flex jobs, orphaned gateway calls and jobs of retired models.

    (A flex job whose worker died needs no sweep: its lease lapses and the next claim takes it.)
    Returns the ids of the jobs it finished, so their waiters can be woken.
    """
    now = now or timezone.now()
    expired = InferenceRequest.objects.unfinished().filter(deadline__lte=now)
    finished = fail_jobs(
        list(expired.filter(service_tier=Tier.FLEX).values_list("id", flat=True)),
        status=504,
        message=DEADLINE_MESSAGE,
        code="deadline_exceeded",
    )
    # A batch line not running when its window ends never will: it goes to the error file as expired
    # (one UPDATE: a 50,000-line batch may expire at once; nobody waits on a line to be woken). A line
    # in flight on a live lease ends at the deadline in its worker.
    expired.filter(service_tier=Tier.BATCH).exclude(state=JobState.PROCESSING, lease_expires_at__gt=now).finish(
        **failure_fields(504, BATCH_EXPIRED_MESSAGE, BATCH_EXPIRED)
    )
    held = list(
        InferenceRequest.objects.filter(state__in=HELD_STATES, claimed_by__startswith=GATEWAY_CLAIM_PREFIX).values_list(
            "id", "claimed_by", "claimed_at", "model_alias"
        )
    )
    timeouts = dict(
        DeployedModel.objects.filter(alias__in={row[3] for row in held}).values_list(
            "alias", "endpoint__timeout_seconds"
        )
    )
    # A real-time call runs inside the gateway process that accepted it; nobody else can finish it
    # (or know whether the upstream already did the work), so it fails rather than running twice.
    orphans = [
        job_id
        for job_id, claimed_by, claimed_at, alias in held
        if claimed_at is None
        or claimed_at < now - timedelta(seconds=timeouts.get(alias, 600) + STUCK_MARGIN_SECONDS)
        or process_is_gone(claimed_by)
    ]
    finished += fail_jobs(orphans, status=502, message=GATEWAY_STOPPED_MESSAGE, code="gateway_interrupted")
    retired = list(
        InferenceRequest.objects.filter(state=JobState.PENDING, service_tier__in=QUEUED_TIERS)
        .exclude(model_alias__in=DeployedModel.objects.live().values("alias"))
        .values_list("id", flat=True)
    )
    finished += fail_jobs(retired, status=404, message=MODEL_RETIRED_MESSAGE, code="model_not_found")
    return finished
