"""Batches: created from a validated input file, each line a job of the one queue (tier batch).

Creation reads the input file twice, a line at a time: first the models it names, which are
checked in DESIGN §4's order (access, the traffic rule for purpose `batch` whatever the key's own,
credits); then its lines, inserted as jobs in chunks in one transaction with the batch row, so a
refused or failed creation leaves nothing behind. A batch is `in_progress` once created: the
gateway validates its file at upload and its models here, so `validating` lasts no longer than
the request that creates it. Workers run the lines as they run flex jobs (after them); the
finalizer (`finalize_batches`, run by every worker as lines end and as it sweeps) writes the
output and error files once no line of a batch is left unfinished.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q, Sum
from django.http import HttpResponse
from django.utils import timezone

from accounts.models import Purpose
from billing.models import Balance, Tier, price_key
from gateway import errors
from gateway.batch_models import ENDED_STATUSES, RUNNING_STATUSES, Batch, BatchStatus
from gateway.batch_output import write_result_files
from gateway.file_store import file_storage
from gateway.jobs import build_job
from gateway.models import HELD_STATES, FilePurpose, InferenceRequest, JobState, StoredFile
from gateway.policy import authorize
from gateway.queue import enqueue_dispatch
from gateway.snapshot import KeyEntry, ModelEntry, Snapshot

logger = logging.getLogger(__name__)
# Lines inserted per statement: bounded memory whatever the file's size.
INSERT_CHUNK = 1000
# A finalizer that died mid-way leaves its batch `finalizing`: another takes it over after this long.
FINALIZE_STALE = timedelta(minutes=5)
METADATA_PAIRS = 16


class Refused(Exception):
    """A batch that is not created; `response` is the OpenAI error that says why."""

    def __init__(self, response: HttpResponse) -> None:
        super().__init__(response.content.decode())
        self.response = response


@dataclass(frozen=True, slots=True)
class Page:
    batches: list[Batch]
    has_more: bool


def find_batch(public_id: str, owner_id: int) -> Batch | None:
    """The owner's batch for a `batch_<hex>` id; None for a bad id or someone else's."""
    try:
        batch_id = uuid.UUID(public_id.removeprefix("batch_"))
    except ValueError:
        return None
    return Batch.objects.filter(pk=batch_id, owner_id=owner_id).first()


def list_batches(owner_id: int, *, after: Batch | None, limit: int) -> Page:
    """A page of the owner's batches, newest first, after the batch `after`."""
    batches = Batch.objects.filter(owner_id=owner_id).order_by("-created_at", "-id")
    if after is not None:
        batches = batches.filter(Q(created_at__lt=after.created_at) | Q(created_at=after.created_at, id__lt=after.id))
    found = list(batches[: limit + 1])
    return Page(batches=found[:limit], has_more=len(found) > limit)


def request_counts(batch: Batch) -> dict[str, int]:
    """{total, completed, failed}: stored once the batch ended, counted from its lines until then."""
    if batch.status in ENDED_STATUSES:
        return {"total": batch.total, "completed": batch.completed_count, "failed": batch.failed_count}
    by_state = dict(
        InferenceRequest.objects.filter(batch=batch, state__in=(JobState.COMPLETED, JobState.FAILED))
        .values_list("state")
        .annotate(n=Count("id"))
        .values_list("state", "n")
    )
    return {
        "total": batch.total,
        "completed": by_state.get(JobState.COMPLETED, 0),
        "failed": by_state.get(JobState.FAILED, 0),
    }


def batch_progress(batch: Batch) -> tuple[int, int, Any]:
    """(lines ended, total, credits charged so far) for the admin."""
    lines = InferenceRequest.objects.filter(batch=batch)
    ended = lines.exclude(state__in=(JobState.PENDING, *HELD_STATES)).count()
    return ended, batch.total, lines.aggregate(cost=Sum("cost"))["cost"] or 0


# --- creation -------------------------------------------------------------------------------------


def check_request(body: Any, owner_id: int) -> tuple[StoredFile, str, str, dict[str, str] | None]:
    """The create request's fields, checked: its input file, endpoint, window and metadata."""
    if not isinstance(body, dict):
        raise Refused(errors.invalid_request("The request body must be a JSON object.", None))
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(body.get(name), str) or not body[name]:
            raise Refused(errors.invalid_request(f"You must provide '{name}' (a string).", name))
    endpoint, window = body["endpoint"], body["completion_window"]
    if window not in settings.GATEWAY_BATCH_WINDOWS:
        windows = ", ".join(settings.GATEWAY_BATCH_WINDOWS)
        raise Refused(
            errors.invalid_request(
                f"Invalid 'completion_window': '{window}'. Use one of {windows}.", "completion_window"
            )
        )
    metadata = body.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict)
        and len(metadata) <= METADATA_PAIRS
        and all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in metadata.items()
        )
    ):
        raise Refused(
            errors.invalid_request(
                "'metadata' must be an object of at most 16 string values "
                "(keys up to 64 characters, values up to 512).",
                "metadata",
            )
        )
    stored = find_input_file(body["input_file_id"], owner_id)
    if stored.request_url != endpoint:
        raise Refused(
            errors.invalid_request(
                f"The input file's requests call {stored.request_url}, not the batch's endpoint {endpoint}.",
                "endpoint",
            )
        )
    return stored, endpoint, window, metadata


def find_input_file(public_id: str, owner_id: int) -> StoredFile:
    try:
        file_id = uuid.UUID(public_id.removeprefix("file-"))
    except ValueError:
        raise Refused(errors.file_not_found(public_id)) from None
    stored = StoredFile.objects.visible_to(owner_id).filter(pk=file_id).first()
    if stored is None:
        raise Refused(errors.file_not_found(public_id))
    if stored.purpose != FilePurpose.BATCH:
        raise Refused(
            errors.invalid_request(
                f"The file {public_id} was uploaded with purpose '{stored.purpose}': a batch needs purpose 'batch'.",
                "input_file_id",
            )
        )
    return stored


def input_lines(stored: StoredFile) -> Iterator[dict[str, Any]]:
    """The requests of a validated batch input file, one at a time."""
    with file_storage().open(stored.storage_name, "rb") as handle:
        for raw in handle:
            if raw.strip():
                yield orjson.loads(raw)


def served_models(snapshot: Snapshot, key: KeyEntry, stored: StoredFile) -> dict[str, ModelEntry]:
    """Each model the file names → the model that serves it, checked in order for every model:
    it exists, the owner may use it, no traffic rule for purpose `batch` denies it (a redirect
    rule for it is followed)."""
    aliases = list(dict.fromkeys(line["body"]["model"] for line in input_lines(stored)))
    for alias in aliases:
        if alias not in snapshot.models:
            raise Refused(errors.model_not_found(alias))
    for alias in aliases:
        if not snapshot.can_access(key.user_id, snapshot.models[alias]):
            raise Refused(errors.render_denial(errors.Denial(errors.NO_ACCESS, alias)))
    # A batch's requests are checked as purpose `batch`, whatever key created it.
    as_batch = dataclasses.replace(key, purpose=Purpose.BATCH)
    served: dict[str, ModelEntry] = {}
    for alias in aliases:
        decision = authorize(snapshot, as_batch, snapshot.models[alias], Tier.BATCH)
        if isinstance(decision, errors.Denial):
            raise Refused(errors.render_denial(decision))
        served[alias] = decision.model
    return served


def create_batch(snapshot: Snapshot, key: KeyEntry, body: Any) -> Batch:
    """Check a create request and its file's models, then create the batch and a job per line, or `Refused`."""
    stored, endpoint, window, metadata = check_request(body, key.user_id)
    served = served_models(snapshot, key, stored)
    paid = any(price_key(Tier.BATCH, window) in model.paid_tiers for model in served.values())
    if paid and Balance.objects.amount_of(key.user_id) <= 0:
        raise Refused(errors.render_denial(errors.Denial(errors.BALANCE_TOO_LOW, "")))
    now = timezone.now()
    path = endpoint.removeprefix("/v1/")
    with transaction.atomic():
        batch = Batch.objects.create(
            owner_id=key.user_id,
            api_key_id=key.id,
            input_file=stored,
            input_file_public_id=stored.public_id,
            endpoint=endpoint,
            completion_window=window,
            status=BatchStatus.IN_PROGRESS,
            metadata=metadata,
            total=stored.line_count or 0,
            created_at=now,
            in_progress_at=now,
            expires_at=now + timedelta(seconds=settings.GATEWAY_BATCH_WINDOWS[window]),
        )
        chunk: list[InferenceRequest] = []
        for number, line in enumerate(input_lines(stored), start=1):
            job = build_job(
                job_id=uuid.uuid4(),
                owner_id=key.user_id,
                api_key_id=key.id,
                model_alias=served[line["body"]["model"]].alias,
                path=path,
                request_body=line["body"],
                service_tier=Tier.BATCH,
                batch_id=batch.id,
                line_number=number,
                custom_id=line["custom_id"],
                completion_window=window,
            )
            # Priced at the tariff in force when the batch was created, due by its window's end.
            job.created_at = job.not_before = now
            job.deadline = batch.expires_at
            chunk.append(job)
            if len(chunk) >= INSERT_CHUNK:
                InferenceRequest.objects.bulk_create(chunk)
                chunk = []
        InferenceRequest.objects.bulk_create(chunk)
        transaction.on_commit(enqueue_dispatch)
    return batch


# --- cancelling and ending ----------------------------------------------------------------------


def cancel_batch(batch: Batch) -> Batch:
    """Stop a batch: no line starts any more, those in flight finish (and are charged), the rest are
    cancelled into the error file. Idempotent; an ended batch is returned as it is."""
    now = timezone.now()
    with transaction.atomic():
        moved = Batch.objects.filter(pk=batch.pk, status__in=(BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)).update(
            status=BatchStatus.CANCELLING, cancelling_at=now
        )
        if moved:
            InferenceRequest.objects.filter(batch=batch, state__in=(JobState.PENDING, JobState.CLAIMED)).finish(
                state=JobState.CANCELED, error=errors.BATCH_CANCELLED_MESSAGE
            )
    if moved:
        finalize_batch(batch.pk)
    batch.refresh_from_db()
    return batch


def finalize_batches(now: datetime | None = None) -> int:
    """End every running batch whose last line has ended (and take over stale finalizations); returns how many."""
    now = now or timezone.now()
    candidates = Batch.objects.filter(
        Q(status__in=RUNNING_STATUSES) | Q(status=BatchStatus.FINALIZING, finalizing_at__lt=now - FINALIZE_STALE)
    ).values_list("id", flat=True)
    ended = 0
    for batch_id in list(candidates):
        if not InferenceRequest.objects.filter(batch_id=batch_id).unfinished().exists():
            ended += finalize_batch(batch_id)
    return ended


def finalize_batch(batch_id: uuid.UUID) -> bool:
    """Write the output and error files of a batch none of whose lines is unfinished, and end it.

    The batch is taken by a conditional move to `finalizing`, so of two finalizers one writes the files.
    """
    now = timezone.now()
    if InferenceRequest.objects.filter(batch_id=batch_id).unfinished().exists():
        return False
    takeable = Q(status__in=RUNNING_STATUSES) | Q(status=BatchStatus.FINALIZING, finalizing_at__lt=now - FINALIZE_STALE)
    if Batch.objects.filter(takeable, pk=batch_id).update(status=BatchStatus.FINALIZING, finalizing_at=now) != 1:
        return False  # another finalizer has it
    batch = Batch.objects.get(pk=batch_id)
    result = write_result_files(batch)
    if batch.cancelling_at is not None:
        status, stamp = BatchStatus.CANCELLED, "cancelled_at"
    elif result.expired:
        status, stamp = BatchStatus.EXPIRED, "expired_at"
    else:
        status, stamp = BatchStatus.COMPLETED, "completed_at"
    ended = Batch.objects.filter(pk=batch_id, status=BatchStatus.FINALIZING, finalizing_at=now).update(
        status=status,
        output_file=result.output_file,
        error_file=result.error_file,
        completed_count=result.completed,
        failed_count=result.failed,
        **{stamp: timezone.now()},
    )
    if ended != 1:  # taken over meanwhile: its finalizer writes its own files
        result.discard()
        return False
    logger.info("Batch %s %s: %d completed, %d failed", batch.public_id, status, result.completed, result.failed)
    return True
