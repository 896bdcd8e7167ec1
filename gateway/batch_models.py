"""The Batch API's record: one row per batch; its lines are jobs of the queue (InferenceRequest.batch).

Imported by gateway.models, so Django knows it as a model of the gateway app.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone


class BatchStatus(models.TextChoices):
    VALIDATING = "validating", "Validating"
    FAILED = "failed", "Failed"
    IN_PROGRESS = "in_progress", "In progress"
    FINALIZING = "finalizing", "Finalizing"
    COMPLETED = "completed", "Completed"
    EXPIRED = "expired", "Expired"
    CANCELLING = "cancelling", "Cancelling"
    CANCELLED = "cancelled", "Cancelled"


# A batch whose lines may still run: the finalizer looks for the last line of these.
RUNNING_STATUSES = (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING)
ENDED_STATUSES = (BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED, BatchStatus.FAILED)


class BatchQuerySet(models.QuerySet["Batch"]):
    def running(self) -> BatchQuerySet:
        return self.filter(status__in=RUNNING_STATUSES)


class Batch(models.Model):
    """An OpenAI Batch: an input file's requests run as queued jobs within a completion window."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="batches")
    api_key = models.ForeignKey("accounts.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # The input file may be deleted after the batch is created: its id stays on the batch.
    input_file = models.ForeignKey(
        "gateway.StoredFile", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    input_file_public_id = models.CharField(max_length=50)
    endpoint = models.CharField(max_length=100, help_text="The url every line calls, e.g. /v1/chat/completions.")
    completion_window = models.CharField(max_length=10)
    status = models.CharField(max_length=20, choices=BatchStatus.choices, default=BatchStatus.VALIDATING)
    metadata = models.JSONField(null=True, blank=True)
    total = models.PositiveIntegerField(default=0, help_text="Requests in the batch.")
    # Written as the batch ends; while it runs, counts are read from its lines.
    completed_count = models.PositiveIntegerField(default=0)
    failed_count = models.PositiveIntegerField(default=0)
    output_file = models.ForeignKey(
        "gateway.StoredFile", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    error_file = models.ForeignKey(
        "gateway.StoredFile", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    in_progress_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField()
    finalizing_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    expired_at = models.DateTimeField(null=True, blank=True)
    cancelling_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)

    objects = BatchQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "batches"
        indexes = [models.Index(fields=["owner", "created_at"], name="batch_owner_time")]

    def __str__(self) -> str:
        return self.public_id

    @property
    def public_id(self) -> str:
        return f"batch_{self.id.hex}"
