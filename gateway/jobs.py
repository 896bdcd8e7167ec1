"""Records of calls that must be remembered: every /v1/responses call and every queued job.

A record is created once and finished once: :meth:`InferenceRequestQuerySet.finish` moves only
unfinished rows, so whichever of the call's end, a cancel, an expiry or a sweep comes first wins.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from django.utils import timezone

from billing.models import Tier
from gateway.errors import CLIENT_GONE_MESSAGE, DEADLINE_MESSAGE, error_envelope
from gateway.models import UNFINISHED_STATES, InferenceRequest, JobState

# Who holds a real-time call's record while this gateway process serves it: host and pid, so the
# sweep can tell a record whose process died (and fail it: nobody else can finish the call).
GATEWAY_CLAIM_PREFIX = "gateway:"
GATEWAY_PROCESS = f"{GATEWAY_CLAIM_PREFIX}{socket.gethostname()}:{os.getpid()}"


def create_job(**fields: Any) -> InferenceRequest:
    """Record a request that must be remembered: a queued job, a background call, a /responses call."""
    job = build_job(**fields)
    job.save(force_insert=True)
    return job


def build_job(
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
    """The record of a request, not yet saved (see create_job).

    `outcome` sets further fields at once (response_status, response_body, …) for a finished call.
    """
    now = timezone.now()
    return InferenceRequest(
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


def outcome_fields(
    status: int,
    body: Any,
    *,
    tokens: tuple[int | None, int | None] = (None, None),
    error: str = "",
    steps: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The stored fields of a call's outcome: its state, status, body, tokens, error (and a loop's steps)."""
    fields = {
        "state": JobState.COMPLETED if status < 400 else JobState.FAILED,
        "response_status": status,
        "response_body": body,
        "input_tokens": tokens[0],
        "output_tokens": tokens[1],
        "error": error[:2000],
    }
    if steps is not None:
        fields["steps"] = steps
    return fields


def failure_fields(status: int, message: str, code: str) -> dict[str, Any]:
    """The stored fields of a call the gateway failed itself, with an OpenAI error body."""
    return {
        "state": JobState.FAILED,
        "response_status": status,
        "response_body": error_envelope(status, message, code=code),
        "error": message,
    }


def finished_response(
    *,
    status: int,
    body: Any,
    tokens: tuple[int | None, int | None],
    error: str = "",
    steps: list[dict[str, Any]] | None = None,
    **fields: Any,
) -> InferenceRequest:
    """The record of a finished real-time /responses call, not yet saved."""
    outcome = outcome_fields(status, body, tokens=tokens, error=error, steps=steps)
    return build_job(**fields, **outcome, completed_at=timezone.now())


def record_response(**fields: Any) -> InferenceRequest:
    """Record a finished real-time /responses call in one write, so GET finds it at once."""
    job = finished_response(**fields)
    job.save(force_insert=True)
    return job


def finish_job(
    job_id: uuid.UUID,
    *,
    status: int,
    body: Any,
    tokens: tuple[int | None, int | None] = (None, None),
    error: str = "",
    steps: list[dict[str, Any]] | None = None,
) -> bool:
    """Store a job's outcome unless it already finished (e.g. was cancelled). Returns whether it was stored."""
    outcome = outcome_fields(status, body, tokens=tokens, error=error, steps=steps)
    return InferenceRequest.objects.filter(pk=job_id).finish(**outcome) == 1


def fail_jobs(job_ids: Iterable[uuid.UUID], *, status: int, message: str, code: str) -> list[uuid.UUID]:
    """Fail unfinished jobs with an OpenAI error; returns the ids actually failed."""
    outcome = failure_fields(status, message, code)
    return [job_id for job_id in job_ids if InferenceRequest.objects.filter(pk=job_id).finish(**outcome)]


def cancel_job(job: InferenceRequest) -> InferenceRequest:
    """Cancel a job that has not finished; a finished job is returned unchanged. Idempotent."""
    InferenceRequest.objects.filter(pk=job.pk).finish(state=JobState.CANCELED)
    job.refresh_from_db()
    return job


def cancel_abandoned_job(job_id: uuid.UUID) -> bool:
    """Cancel a blocking flex job whose client went away: nobody can read its result any more."""
    jobs = InferenceRequest.objects.filter(pk=job_id, background=False)
    return jobs.finish(state=JobState.CANCELED, error=CLIENT_GONE_MESSAGE) == 1


def expire_job(job_id: uuid.UUID) -> InferenceRequest:
    """Fail a job whose deadline has passed (a no-op if it finished meanwhile); return it as it now is."""
    expired = InferenceRequest.objects.filter(pk=job_id, deadline__lte=timezone.now())
    expired.finish(**failure_fields(504, DEADLINE_MESSAGE, "deadline_exceeded"))
    return InferenceRequest.objects.get(pk=job_id)


def find_job(public_id: str, owner_id: int) -> InferenceRequest | None:
    """The owner's job for a `resp_<hex>` id; None for a bad id, someone else's job, or a response
    created with `store: false` (kept for its accounting, never shown again)."""
    try:
        job_id = uuid.UUID(public_id.removeprefix("resp_"))
    except ValueError:
        return None
    job = InferenceRequest.objects.filter(pk=job_id, owner_id=owner_id).first()
    if job is None or job.request_body.get("store") is False:
        return None
    return job


def conversation(body: dict[str, Any], owner_id: int) -> dict[str, Any] | None:
    """A follow-up's body with the conversation it continues: the earlier response's input and
    output, then its own input (an upstream never knows the gateway's ids). None when the earlier
    response is not the owner's, or has not completed."""
    previous = find_job(str(body["previous_response_id"]), owner_id)
    if previous is None or previous.state != JobState.COMPLETED or not isinstance(previous.response_body, dict):
        return None
    output = previous.response_body.get("output") or []
    return {**body, "input": [*as_items(previous.request_body.get("input")), *output, *as_items(body.get("input"))]}


def as_items(given: Any) -> list[Any]:
    """A Responses input (a string or a list of items) as a list of items."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    return list(given) if isinstance(given, list) else []


def delete_job(job: InferenceRequest) -> None:
    """Delete a response: cancelled first if it has not finished, so no worker runs or charges it."""
    InferenceRequest.objects.filter(pk=job.pk).finish(state=JobState.CANCELED)
    InferenceRequest.objects.filter(pk=job.pk).delete()


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
