from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import connection, transaction
from django.db.models import Count, F, Q
from django.utils import timezone

from accounts.models import AccessGroup
from accounts.services import ensure_groups
from billing.models import Balance, Tariff, Tier
from billing.services import Usage, charge_usages, cost_of, select_tariff, set_tariff, tariff_for
from gateway.errors import BALANCE_TOO_LOW_MESSAGE, error_envelope
from gateway.models import (
    UNFINISHED_STATES,
    DeployedModel,
    Endpoint,
    InferenceRequest,
    JobState,
    ModelKind,
    RequestLog,
)

logger = logging.getLogger(__name__)


@transaction.atomic
def add_endpoint(
    name: str,
    base_url: str,
    *,
    api_key: str | None = None,
    timeout_seconds: int | None = None,
) -> tuple[Endpoint, bool]:
    """Create an endpoint, or update the one with this name. Returns it and whether it was created."""
    if not name.strip():
        raise ValidationError("The endpoint name cannot be empty.")
    URLValidator(schemes=["http", "https"])(base_url)
    if timeout_seconds is not None and timeout_seconds <= 0:
        raise ValidationError(f"The timeout must be a positive number of seconds, not {timeout_seconds}.")
    endpoint, created = Endpoint.objects.get_or_create(name=name, defaults={"base_url": base_url})
    endpoint.base_url = base_url.rstrip("/")
    if api_key is not None:
        endpoint.api_key = api_key
    if timeout_seconds is not None:
        endpoint.timeout_seconds = timeout_seconds
    endpoint.save()
    return endpoint, created


@transaction.atomic
def add_model(
    alias: str,
    *,
    endpoint: Endpoint,
    upstream_model: str | None = None,
    kind: str = ModelKind.CHAT,
    input_price: Decimal | str | None = None,
    output_price: Decimal | str | None = None,
    flex_input_price: Decimal | str | None = None,
    flex_output_price: Decimal | str | None = None,
    public: bool = False,
    groups: Iterable[str] = (),
) -> DeployedModel:
    """Deploy a model with its prices (credits per 1M tokens) and group access, all or nothing."""
    if not alias.strip():
        raise ValidationError("The model alias cannot be empty.")
    if kind not in ModelKind.values:
        raise ValidationError(f"Unknown kind '{kind}': use one of {', '.join(ModelKind.values)}.")
    if DeployedModel.objects.filter(alias=alias).exists():
        raise ValidationError(f"A model with alias '{alias}' already exists.")
    model = DeployedModel.objects.create(
        alias=alias, upstream_model=upstream_model or alias, endpoint=endpoint, kind=kind
    )
    for tier, prices in (
        (Tier.REALTIME, (input_price, output_price)),
        (Tier.FLEX, (flex_input_price, flex_output_price)),
    ):
        if any(price is not None for price in prices):
            try:
                set_tariff(model, tier=tier, input_price=prices[0] or 0, output_price=prices[1] or 0)
            except ValueError as exc:
                raise ValidationError(str(exc)) from None
    attach = list(ensure_groups(groups))
    if public:
        attach.append(AccessGroup.objects.everyone())
    for group in attach:
        group.models.add(model)
    return model


# --- /v1/responses records and jobs ------------------------------------------------------------


def create_job(
    *,
    job_id: uuid.UUID,
    owner_id: int,
    api_key_id: int | None,
    model_alias: str,
    path: str,
    request_body: dict[str, Any],
    service_tier: str = Tier.REALTIME,
    background: bool = False,
    state: str = JobState.PENDING,
    claimed_by: str = "",
    deadline_seconds: int | None = None,
    **outcome: Any,
) -> InferenceRequest:
    """Record a request that must be remembered: a queued job, a background call, a /responses call.

    `outcome` sets further fields at once (response_status, response_body, …) for a finished call.
    """
    now = timezone.now()
    return InferenceRequest.objects.create(
        id=job_id,
        owner_id=owner_id,
        api_key_id=api_key_id,
        model_alias=model_alias,
        path=path,
        request_body=request_body,
        service_tier=service_tier,
        background=background,
        state=state,
        claimed_by=claimed_by,
        claimed_at=now if claimed_by else None,
        deadline=now + timedelta(seconds=deadline_seconds) if deadline_seconds else None,
        created_at=now,
        updated_at=now,
        **outcome,
    )


def finish_job(
    job_id: uuid.UUID,
    *,
    status: int,
    body: Any,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    error: str = "",
) -> bool:
    """Store a job's outcome unless it already finished (e.g. was cancelled). Returns whether it was stored."""
    state = JobState.COMPLETED if status < 400 else JobState.FAILED
    now = timezone.now()
    updated = (
        InferenceRequest.objects.unfinished()
        .filter(pk=job_id)
        .update(
            state=state,
            response_status=status,
            response_body=body,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            error=error,
            updated_at=now,
            completed_at=now,
        )
    )
    return updated == 1


def record_response(
    *, status: int, body: Any, input_tokens: int | None, output_tokens: int | None, **fields: Any
) -> InferenceRequest:
    """Record a finished real-time /responses call in one write, so GET finds it at once."""
    return create_job(
        **fields,
        state=JobState.COMPLETED if status < 400 else JobState.FAILED,
        response_status=status,
        response_body=body,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        completed_at=timezone.now(),
    )


def cancel_job(job: InferenceRequest) -> InferenceRequest:
    """Cancel a job that has not finished; a finished job is returned unchanged. Idempotent."""
    now = timezone.now()
    InferenceRequest.objects.unfinished().filter(pk=job.pk).update(
        state=JobState.CANCELED, updated_at=now, completed_at=now
    )
    job.refresh_from_db()
    return job


def find_job(public_id: str, owner_id: int) -> InferenceRequest | None:
    """The owner's job for a `resp_<hex>` id; None for a bad id or someone else's job."""
    try:
        job_id = uuid.UUID(public_id.removeprefix("resp_"))
    except ValueError:
        return None
    return InferenceRequest.objects.filter(pk=job_id, owner_id=owner_id).first()


# --- the flex queue ------------------------------------------------------------------------------
# A job moves pending → claimed (by one worker, atomically) → processing (balance re-checked, one
# upstream attempt) → completed | failed | back to pending for a retry. Every write after the claim
# is conditional on the job still being held by the same worker and unfinished, so a job that was
# cancelled, expired or handed to another worker is never overwritten and never charged.

DEADLINE_MESSAGE = "The flex request did not finish before its deadline."
RETRYABLE_STATUSES = frozenset({408, 429})
RETRY_FIRST_SECONDS = 1
RETRY_MAX_SECONDS = 10
# How long past its endpoint's timeout a claimed job may stay unfinished before the sweep takes it back.
STUCK_MARGIN_SECONDS = 60
GATEWAY_CLAIM_PREFIX = "gateway:"


def _enqueue_dispatch() -> None:
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
        transaction.on_commit(_enqueue_dispatch)
    return job


def claim_jobs(
    worker: str, *, limit: int, max_call_seconds: float | None = None, now: datetime | None = None
) -> list[InferenceRequest]:
    """Claim up to `limit` due flex jobs for `worker`, keeping each model within its flex_concurrency.

    With `max_call_seconds`, only jobs whose endpoint timeout fits in that time are claimed.
    """
    now = now or timezone.now()
    if limit <= 0:
        return []
    due = (
        InferenceRequest.objects.claimable(now)
        .filter(service_tier=Tier.FLEX)
        .filter(Q(deadline__isnull=True) | Q(deadline__gt=now))
    )
    skip_locked = connection.features.has_select_for_update_skip_locked
    claimed: list[uuid.UUID] = []
    # Read before the transaction: an idle poll must not take SQLite's write lock.
    aliases = sorted(due.order_by().values_list("model_alias", flat=True).distinct())
    if not aliases:
        return []
    with transaction.atomic():
        # One claimer per model at a time (a row lock on PostgreSQL; SQLite serialises writers anyway),
        # so two workers never both see room under the same cap.
        models = DeployedModel.objects.live().select_for_update(of=("self",)).filter(alias__in=aliases)
        if max_call_seconds is not None:
            models = models.filter(endpoint__timeout_seconds__lte=max_call_seconds)
        caps = dict(models.order_by("pk").values_list("alias", "flex_concurrency"))
        busy = dict(
            InferenceRequest.objects.filter(
                service_tier=Tier.FLEX, state__in=(JobState.CLAIMED, JobState.PROCESSING), model_alias__in=aliases
            )
            .values_list("model_alias")
            .annotate(n=Count("id"))
            .values_list("model_alias", "n")
        )
        for alias in aliases:
            if alias not in caps:
                continue  # a retired model (the sweep fails its jobs), or its calls may outlast this runner
            room = min(caps[alias] - busy.get(alias, 0), limit - len(claimed))
            if room <= 0:
                continue
            candidates = due.filter(model_alias=alias)
            if skip_locked:
                candidates = candidates.select_for_update(skip_locked=True)
            ids = list(candidates.values_list("id", flat=True)[:room])
            if ids and InferenceRequest.objects.filter(pk__in=ids, state=JobState.PENDING).update(
                state=JobState.CLAIMED, claimed_by=worker, claimed_at=now, updated_at=now
            ):
                claimed.extend(ids)
    if not claimed:
        return []
    return list(InferenceRequest.objects.filter(pk__in=claimed, claimed_by=worker, state=JobState.CLAIMED))


def _is_paid(model_id: int, tier: str, at: datetime) -> bool:
    tariff = tariff_for(model_id, tier, at=at)
    return tariff is not None and (tariff.input_price > 0 or tariff.output_price > 0)


def start_jobs(worker: str, jobs: dict[uuid.UUID, int | None], *, now: datetime | None = None) -> list[uuid.UUID]:
    """Move claimed jobs (id → model id) to processing; fail, uncalled, those whose owner ran out of credits.

    Returns the ids that may now call the upstream.
    """
    now = now or timezone.now()
    rows = {
        row["id"]: row
        for row in InferenceRequest.objects.filter(pk__in=list(jobs), claimed_by=worker, state=JobState.CLAIMED).values(
            "id", "owner_id", "service_tier"
        )
    }
    funded = set(
        Balance.objects.filter(user_id__in={row["owner_id"] for row in rows.values()}, amount__gt=0).values_list(
            "user_id", flat=True
        )
    )
    paid: dict[int, bool] = {}
    runnable, broke = [], []
    for job_id, row in rows.items():
        model_id = jobs[job_id]
        if model_id is not None and model_id not in paid:
            paid[model_id] = _is_paid(model_id, row["service_tier"], now)
        if model_id is not None and paid[model_id] and row["owner_id"] not in funded:
            broke.append(job_id)
        else:
            runnable.append(job_id)
    with transaction.atomic():
        held = InferenceRequest.objects.filter(claimed_by=worker, state=JobState.CLAIMED)
        if broke:
            held.filter(pk__in=broke).update(
                state=JobState.FAILED,
                response_status=402,
                response_body=error_envelope(402, BALANCE_TOO_LOW_MESSAGE, code="insufficient_credits"),
                error=BALANCE_TOO_LOW_MESSAGE,
                updated_at=now,
                completed_at=now,
            )
        if runnable:
            held.filter(pk__in=runnable).update(state=JobState.PROCESSING, attempts=F("attempts") + 1, updated_at=now)
    return runnable


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
        tariffs: dict[int, list[Tariff]] = {}
        for tariff in Tariff.objects.filter(model_id__in={o.model_id for o in outcomes if o.model_id is not None}):
            tariffs.setdefault(tariff.model_id, []).append(tariff)
        usages: list[Usage] = []
        logs: list[RequestLog] = []
        for outcome in outcomes:
            job = jobs.get(outcome.job_id)
            if job is not None:
                states[job.id] = _settle(job, outcome, now, tariffs, usages, logs)
        charge_usages(usages)
        RequestLog.objects.bulk_create(logs, ignore_conflicts=True)
    return states


def _settle(
    job: InferenceRequest,
    outcome: Outcome,
    now: datetime,
    tariffs: dict[int, list[Tariff]],
    usages: list[Usage],
    logs: list[RequestLog],
) -> str:
    status, error = outcome.status, outcome.error
    if status >= 400 and is_retryable(status):
        delay = min(RETRY_FIRST_SECONDS * 2 ** max(job.attempts - 1, 0), RETRY_MAX_SECONDS)
        not_before = now + timedelta(seconds=delay)
        if job.deadline is None or not_before < job.deadline:
            job.state = JobState.PENDING
            job.not_before = not_before
            job.claimed_by = ""
            job.claimed_at = None
            job.error = f"Attempt {job.attempts} failed with status {status}: {error or 'upstream error'}"[:2000]
            job.updated_at = now
            job.save(update_fields=["state", "not_before", "claimed_by", "claimed_at", "error", "updated_at"])
            return job.state
        error = f"{error or f'The upstream answered {status}'}; no time left to retry before the deadline."
    job.state = JobState.COMPLETED if status < 400 else JobState.FAILED
    job.response_status = status
    job.response_body = outcome.body
    job.error = "" if status < 400 else error[:2000]
    job.updated_at = job.completed_at = now
    if status < 400 and outcome.input_tokens is not None and outcome.model_id is not None:
        job.input_tokens, job.output_tokens = outcome.input_tokens, outcome.output_tokens or 0
        # Priced at the tariff in force when the job was submitted.
        tariff = select_tariff(tariffs.get(outcome.model_id, ()), Tier.FLEX, job.created_at)
        job.cost = cost_of(tariff, job.input_tokens, job.output_tokens)
        usages.append(
            Usage(
                user_id=job.owner_id,
                source_id=str(job.id),
                model_alias=job.model_alias,
                tier=Tier.FLEX,
                input_tokens=job.input_tokens,
                output_tokens=job.output_tokens,
                cost=job.cost,
            )
        )
    job.save()
    logs.append(
        RequestLog(
            request_id=job.id.hex,
            user_id=job.owner_id,
            api_key_id=job.api_key_id,
            model_alias=job.model_alias,
            path=job.path,
            service_tier=Tier.FLEX,
            status_code=status,
            latency_ms=outcome.latency_ms,
            input_tokens=job.input_tokens,
            output_tokens=job.output_tokens,
            cost=job.cost,
            created_at=job.created_at,
        )
    )
    return job.state


def release_jobs(worker: str, job_ids: list[uuid.UUID]) -> int:
    """Give jobs this worker can no longer finish back to the queue, not counting the interrupted attempt."""
    now = timezone.now()
    held = InferenceRequest.objects.filter(pk__in=job_ids, claimed_by=worker)
    back = {"state": JobState.PENDING, "claimed_by": "", "claimed_at": None, "not_before": now, "updated_at": now}
    with transaction.atomic():
        released = held.filter(state=JobState.CLAIMED).update(**back)
        released += held.filter(state=JobState.PROCESSING, attempts__gt=0).update(**back, attempts=F("attempts") - 1)
    return released


def fail_jobs(job_ids: list[uuid.UUID], *, status: int, message: str, code: str) -> list[uuid.UUID]:
    """Fail unfinished jobs with an OpenAI error; returns the ids actually failed."""
    now = timezone.now()
    failed = []
    for job_id in job_ids:
        if (
            InferenceRequest.objects.unfinished()
            .filter(pk=job_id)
            .update(
                state=JobState.FAILED,
                response_status=status,
                response_body=error_envelope(status, message, code=code),
                error=message,
                updated_at=now,
                completed_at=now,
            )
        ):
            failed.append(job_id)
    return failed


def expire_job(job_id: uuid.UUID) -> InferenceRequest:
    """Fail a job whose deadline has passed (a no-op if it finished meanwhile); return it as it now is."""
    now = timezone.now()
    InferenceRequest.objects.unfinished().filter(pk=job_id, deadline__lte=now).update(
        state=JobState.FAILED,
        response_status=504,
        response_body=error_envelope(504, DEADLINE_MESSAGE, code="deadline_exceeded"),
        error=DEADLINE_MESSAGE,
        updated_at=now,
        completed_at=now,
    )
    return InferenceRequest.objects.get(pk=job_id)


def cancel_abandoned_job(job_id: uuid.UUID) -> bool:
    """Cancel a blocking flex job whose client went away: nobody can read its result any more."""
    now = timezone.now()
    return bool(
        InferenceRequest.objects.unfinished()
        .filter(pk=job_id, background=False)
        .update(state=JobState.CANCELED, error="The client disconnected.", updated_at=now, completed_at=now)
    )


def finished_job_ids(job_ids: Iterable[uuid.UUID]) -> list[uuid.UUID]:
    """Which of these jobs have finished (any end state)."""
    ids = list(job_ids)
    finished: list[uuid.UUID] = []
    for start in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
        finished.extend(
            InferenceRequest.objects.filter(pk__in=ids[start : start + 500])
            .exclude(state__in=UNFINISHED_STATES)
            .values_list("id", flat=True)
        )
    return finished


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
    """Fail expired flex jobs and orphaned gateway calls; re-queue jobs of dead or stuck workers.

    Returns the ids of the jobs it finished, so their waiters can be woken.
    """
    now = now or timezone.now()
    finished = fail_jobs(
        list(
            InferenceRequest.objects.unfinished()
            .filter(service_tier=Tier.FLEX, deadline__lte=now)
            .values_list("id", flat=True)
        ),
        status=504,
        message=DEADLINE_MESSAGE,
        code="deadline_exceeded",
    )
    held = list(
        InferenceRequest.objects.filter(state__in=(JobState.CLAIMED, JobState.PROCESSING)).values_list(
            "id", "claimed_by", "claimed_at", "model_alias"
        )
    )
    timeouts = dict(
        DeployedModel.objects.filter(alias__in={row[3] for row in held}).values_list(
            "alias", "endpoint__timeout_seconds"
        )
    )
    orphans: list[uuid.UUID] = []
    requeue: dict[str, list[uuid.UUID]] = {}
    for job_id, claimed_by, claimed_at, alias in held:
        limit = timedelta(seconds=timeouts.get(alias, 600) + STUCK_MARGIN_SECONDS)
        if not (claimed_at is None or claimed_at < now - limit or process_is_gone(claimed_by)):
            continue
        if claimed_by.startswith(GATEWAY_CLAIM_PREFIX):
            orphans.append(job_id)
        else:
            requeue.setdefault(claimed_by, []).append(job_id)
    # A real-time call runs inside the gateway process that accepted it; nobody else can finish it
    # (or know whether the upstream already did the work), so it fails rather than running twice.
    finished += fail_jobs(
        orphans,
        status=502,
        message="The gateway process serving this request stopped before it finished. Please retry.",
        code="gateway_interrupted",
    )
    for claimed_by, ids in requeue.items():
        InferenceRequest.objects.filter(
            pk__in=ids, claimed_by=claimed_by, state__in=(JobState.CLAIMED, JobState.PROCESSING)
        ).update(state=JobState.PENDING, claimed_by="", claimed_at=None, not_before=now, updated_at=now)
    retired = list(
        InferenceRequest.objects.filter(state=JobState.PENDING, service_tier=Tier.FLEX)
        .exclude(model_alias__in=DeployedModel.objects.live().values("alias"))
        .values_list("id", flat=True)
    )
    finished += fail_jobs(
        retired, status=404, message="The model of this request is no longer available.", code="model_not_found"
    )
    return finished
