from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.utils import timezone

from billing.models import AMOUNT, Tier, price_key
from common.crypto import UndecryptableToken, decrypt, encrypt
from common.limits import rate_limit_errors


class UnreadableCredentials(ValueError):
    """Stored upstream credentials that no key of GATEWAY_ENCRYPTION_KEYS decrypts."""

    def __init__(self, endpoints: Iterable[str], kind: str = "endpoint") -> None:
        self.endpoints = sorted(endpoints)
        names = ", ".join(f"'{name}'" for name in self.endpoints)
        what = "upstream credential" if kind == "endpoint" else "credential"
        super().__init__(
            f"No key in GATEWAY_ENCRYPTION_KEYS decrypts the {what} of "
            f"{kind}{'s' if len(self.endpoints) != 1 else ''} {names}: put back the key it was encrypted "
            "with (after the first), or enter the credential again."
        )


class EncryptedCredential:
    """A credential kept encrypted in ``api_key_encrypted`` (common.crypto), never shown again."""

    api_key_encrypted: str
    name: str
    credential_of = "endpoint"  # what UnreadableCredentials names it

    @property
    def has_credential(self) -> bool:
        return bool(self.api_key_encrypted)

    def set_credential(self, credential: str) -> None:
        """Store the credential encrypted ("" for none); like `User.set_password`, the caller saves."""
        self.api_key_encrypted = encrypt(credential) if credential else ""

    def decrypt_credential(self) -> str:
        """The clear credential, "" for none; `UnreadableCredentials` if no configured key opens it."""
        if not self.api_key_encrypted:
            return ""
        try:
            return decrypt(self.api_key_encrypted)
        except UndecryptableToken:
            raise UnreadableCredentials([self.name], kind=self.credential_of) from None


class ResponsesApi(models.TextChoices):
    """How an endpoint serves /v1/responses: its own Responses API, or chat completions translated both ways."""

    NATIVE = "native", "Native"
    TRANSLATE = "translate", "Translate to chat completions"


class Endpoint(EncryptedCredential, models.Model):
    """An upstream OpenAI-compatible server."""

    name = models.CharField(max_length=100, unique=True)
    base_url = models.URLField(max_length=500, help_text="Up to and including /v1, e.g. https://api.openai.com/v1")
    # Never in clear: a database dump alone must not hand out every upstream credential.
    api_key_encrypted = models.TextField(
        blank=True,
        editable=False,
        help_text="The upstream credential, encrypted (common/crypto.py); empty for none. Write-only.",
    )
    auth_header = models.CharField(max_length=100, default="Authorization")
    auth_prefix = models.CharField(max_length=50, default="Bearer ", blank=True)
    timeout_seconds = models.PositiveIntegerField(default=600, help_text="Whole upstream call, in seconds.")
    connect_timeout_seconds = models.PositiveIntegerField(default=10)
    responses_api = models.CharField(
        "Responses API",
        max_length=20,
        choices=ResponsesApi.choices,
        default=ResponsesApi.NATIVE,
        help_text="Translate: /v1/responses is served by the upstream's /chat/completions (for servers "
        "that speak chat completions only).",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=models.Q(timeout_seconds__gt=0), name="endpoint_timeout_positive")
        ]

    def __str__(self) -> str:
        return self.name


def decrypt_credentials(endpoints: Iterable[Endpoint]) -> dict[int, str]:
    """The clear credential of each endpoint by id; `UnreadableCredentials` names every one that fails."""
    credentials: dict[int, str] = {}
    unreadable: list[str] = []
    for endpoint in endpoints:
        try:
            credentials[endpoint.pk] = endpoint.decrypt_credential()
        except UnreadableCredentials:
            unreadable.append(endpoint.name)
    if unreadable:
        raise UnreadableCredentials(unreadable)
    return credentials


class ModelKind(models.TextChoices):
    CHAT = "chat", "Chat"
    EMBEDDINGS = "embeddings", "Embeddings"


class DeployedModelQuerySet(models.QuerySet["DeployedModel"]):
    def live(self) -> DeployedModelQuerySet:
        return self.filter(deleted_at__isnull=True)


# What `set_model_limits` changes and `--clear` resets (flex concurrency to its default: it is never unlimited).
MODEL_LIMITS = (
    "requests_per_second",
    "burst_size",
    "tokens_per_minute",
    "capacity",
    "flex_concurrency",
    "max_output_tokens",
)


class DeployedModel(models.Model):
    """A model clients can call by its alias, served by one endpoint."""

    alias = models.CharField(max_length=200, unique=True, help_text="What clients send as `model`.")
    upstream_model = models.CharField(max_length=200, help_text="The name the upstream knows it by.")
    endpoint = models.ForeignKey(Endpoint, on_delete=models.PROTECT, related_name="models")
    kind = models.CharField(max_length=20, choices=ModelKind.choices, default=ModelKind.CHAT)
    requests_per_second = models.PositiveIntegerField(null=True, blank=True)
    burst_size = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Input plus output tokens per rolling minute (real-time calls)."
    )
    capacity = models.PositiveIntegerField(null=True, blank=True, help_text="Max concurrent real-time calls.")
    max_output_tokens = models.PositiveIntegerField(
        null=True, blank=True, help_text="Output bound reserved for a call that sets none (credit reservations)."
    )
    flex_concurrency = models.PositiveIntegerField(default=10, help_text="Max concurrent queued (flex) calls.")
    max_model_calls = models.PositiveIntegerField(
        default=10, help_text="Most model calls one /v1/responses request with server tools makes before it stops."
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    deleted_at = models.DateTimeField(null=True, blank=True, help_text="Set to retire the model (soft delete).")

    objects = DeployedModelQuerySet.as_manager()

    class Meta:
        ordering = ["alias"]
        verbose_name = "model"
        constraints = [
            models.CheckConstraint(condition=Q(flex_concurrency__gt=0), name="model_flex_concurrency_positive"),
            models.CheckConstraint(condition=Q(max_model_calls__gt=0), name="model_max_model_calls_positive"),
            models.CheckConstraint(
                condition=Q(burst_size__isnull=True) | Q(requests_per_second__isnull=False),
                name="model_burst_needs_rate",
            ),
        ]

    def __str__(self) -> str:
        return self.alias

    def clean(self) -> None:
        # The admin form and `set_model_limits` both validate here.
        errors = rate_limit_errors(self, MODEL_LIMITS)
        if errors:
            raise ValidationError(errors)


class Tool(EncryptedCredential, models.Model):
    """A server-side tool: an HTTP endpoint the gateway calls when a model asks for it (gateway.tools)."""

    credential_of = "tool"

    name = models.CharField(max_length=64, unique=True, help_text="The function name the model calls.")
    description = models.TextField(blank=True)
    parameters = models.JSONField(default=dict, help_text="The JSON schema of the call's arguments (an object).")
    url = models.URLField(max_length=500, help_text="The gateway POSTs the call's arguments here.")
    # Write-only and encrypted, like an endpoint's credential.
    api_key_encrypted = models.TextField(blank=True, editable=False)
    timeout_seconds = models.PositiveIntegerField(default=30)
    groups = models.ManyToManyField("accounts.AccessGroup", blank=True, related_name="tools")
    # Last: from here on `models` in this class body is the field, not django.db.models.
    models = models.ManyToManyField(DeployedModel, blank=True, related_name="tools")

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=Q(timeout_seconds__gt=0), name="tool_timeout_positive"),
        ]

    def __str__(self) -> str:
        return self.name


class JobState(models.TextChoices):
    PENDING = "pending", "Pending"
    CLAIMED = "claimed", "Claimed"
    PROCESSING = "processing", "Processing"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"
    CANCELED = "canceled", "Canceled"


UNFINISHED_STATES = (JobState.PENDING, JobState.CLAIMED, JobState.PROCESSING)
HELD_STATES = (JobState.CLAIMED, JobState.PROCESSING)
# What `GET /v1/responses/{id}` reports for each state.
OPENAI_STATUS = {
    JobState.PENDING: "queued",
    JobState.CLAIMED: "in_progress",
    JobState.PROCESSING: "in_progress",
    JobState.COMPLETED: "completed",
    JobState.FAILED: "failed",
    JobState.CANCELED: "cancelled",
}


class InferenceRequestQuerySet(models.QuerySet["InferenceRequest"]):
    def unfinished(self) -> InferenceRequestQuerySet:
        return self.filter(state__in=UNFINISHED_STATES)

    def claimable(self, now=None) -> InferenceRequestQuerySet:  # type: ignore[no-untyped-def]
        """Jobs a worker may take now: pending and due, or held on a lease that has lapsed (its worker died)."""
        now = now or timezone.now()
        due = Q(state=JobState.PENDING, not_before__lte=now)
        return self.filter(due | Q(state__in=HELD_STATES, lease_expires_at__lte=now)).order_by("not_before")

    def leased(self, now=None) -> InferenceRequestQuerySet:  # type: ignore[no-untyped-def]
        """Jobs a live worker holds: what counts against a model's flex concurrency."""
        return self.filter(state__in=HELD_STATES, lease_expires_at__gt=now or timezone.now())

    def finish(self, *, state: str, **outcome: Any) -> int:
        """Move the jobs that have not finished yet to an end state; returns how many moved.

        A job that finished meanwhile (completed, cancelled, expired) is left as it is, so the
        caller checks the count: `if jobs.finish(...) != 1: # it got there first`.
        """
        now = timezone.now()
        return self.unfinished().update(state=state, updated_at=now, completed_at=now, **outcome)


class InferenceRequest(models.Model):
    """A request that must be remembered: every queued job, and every /v1/responses call."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="inference_requests")
    api_key = models.ForeignKey("accounts.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    model_alias = models.CharField(max_length=200)
    path = models.CharField(max_length=100, help_text="The upstream path, e.g. /chat/completions.")
    service_tier = models.CharField(max_length=20, choices=Tier.choices, default=Tier.REALTIME)
    background = models.BooleanField(default=False)
    state = models.CharField(max_length=20, choices=JobState.choices, default=JobState.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    not_before = models.DateTimeField(default=timezone.now)
    deadline = models.DateTimeField(null=True, blank=True)
    request_body = models.JSONField()
    response_status = models.PositiveIntegerField(null=True, blank=True)
    response_body = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    input_tokens = models.PositiveIntegerField(null=True, blank=True)
    output_tokens = models.PositiveIntegerField(null=True, blank=True)
    cost = models.DecimalField(**AMOUNT, null=True, blank=True)
    # A response with server tools: each model call and tool call of its loop (gateway.loop).
    steps = models.JSONField(default=list, blank=True)
    # A flex loop's progress after its last finished step (gateway.loop.Loop.progress): a job run
    # again after its worker died resumes from there, and bills the model calls it lists.
    loop_state = models.JSONField(null=True, blank=True)
    claimed_by = models.CharField(max_length=200, blank=True)
    claimed_at = models.DateTimeField(null=True, blank=True)
    # A flex worker holds its claim only while it renews this lease; once it lapses any worker may take
    # the job. None for a call a gateway process holds itself (the sweep watches that process).
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # A batch line: its batch, its place in the input file, its custom_id and the window it is priced at.
    batch = models.ForeignKey("gateway.Batch", null=True, blank=True, on_delete=models.CASCADE, related_name="lines")
    line_number = models.PositiveIntegerField(null=True, blank=True)
    custom_id = models.CharField(max_length=512, blank=True)
    completion_window = models.CharField(max_length=10, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    updated_at = models.DateTimeField(default=timezone.now)
    completed_at = models.DateTimeField(null=True, blank=True)

    objects = InferenceRequestQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["not_before"], condition=Q(state="pending"), name="inference_pending_queue"),
            models.Index(fields=["state", "claimed_at"], name="inference_state_claimed"),
            models.Index(fields=["batch", "state"], condition=Q(batch__isnull=False), name="inference_batch_state"),
        ]

    def __str__(self) -> str:
        return f"resp_{self.id.hex}"

    @property
    def public_id(self) -> str:
        return f"resp_{self.id.hex}"

    @property
    def openai_status(self) -> str:
        return OPENAI_STATUS[JobState(self.state)]

    @property
    def price_key(self) -> str:
        """What the call is priced at: its tier, and a batch line's completion window."""
        return price_key(self.service_tier, self.completion_window)


class RequestLog(models.Model):
    """One row per proxied call, for analytics. Written in batches off the request path."""

    request_id = models.CharField(max_length=64, unique=True, help_text="The x-request-id its client saw.")
    client_request_id = models.CharField(
        max_length=512, blank=True, default="", help_text="The X-Client-Request-Id its client sent."
    )
    error_code = models.CharField(max_length=64, blank=True, default="", help_text="The code of the error it got.")
    key_prefix = models.CharField(
        max_length=16, blank=True, default="", help_text="The first characters of the key it presented."
    )
    client_ip = models.GenericIPAddressField(null=True, blank=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    api_key = models.ForeignKey("accounts.ApiKey", null=True, on_delete=models.SET_NULL, related_name="+")
    model_alias = models.CharField(max_length=200)
    path = models.CharField(max_length=100)
    service_tier = models.CharField(max_length=20, choices=Tier.choices)
    status_code = models.PositiveIntegerField()
    latency_ms = models.FloatField()
    ttfb_ms = models.FloatField(null=True)
    input_tokens = models.PositiveIntegerField(null=True)
    output_tokens = models.PositiveIntegerField(null=True)
    cost = models.DecimalField(**AMOUNT, null=True)
    usage_estimated = models.BooleanField(
        default=False, help_text="The upstream reported no usage: tokens are the gateway's own count."
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["api_key", "created_at"], name="requestlog_key_time"),
            models.Index(fields=["user", "created_at"], name="requestlog_user_time"),
        ]

    def __str__(self) -> str:
        return f"{self.request_id} {self.status_code}"


class FilePurpose(models.TextChoices):
    ASSISTANTS = "assistants", "Assistants"
    BATCH = "batch", "Batch input"
    BATCH_OUTPUT = "batch_output", "Batch output"  # written by the gateway: a batch's output and error files
    EVALS = "evals", "Evals"
    FINE_TUNE = "fine-tune", "Fine-tune"
    USER_DATA = "user_data", "User data"
    VISION = "vision", "Vision"


# What a client may upload; the others are the gateway's own.
UPLOAD_PURPOSES = tuple(sorted(p.value for p in FilePurpose if p != FilePurpose.BATCH_OUTPUT))


class StoredFileQuerySet(models.QuerySet["StoredFile"]):
    def visible_to(self, owner_id: int, now=None) -> StoredFileQuerySet:  # type: ignore[no-untyped-def]
        """The owner's files that have not expired."""
        unexpired = Q(expires_at__isnull=True) | Q(expires_at__gt=now or timezone.now())
        return self.filter(unexpired, owner_id=owner_id)


class StoredFile(models.Model):
    """An OpenAI File: its bytes in the `files` storage (settings.STORAGES), what is known of them here."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="files")
    api_key = models.ForeignKey("accounts.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    filename = models.CharField(max_length=255)
    purpose = models.CharField(max_length=20, choices=FilePurpose.choices)
    bytes = models.PositiveBigIntegerField()
    storage_name = models.CharField(max_length=500, unique=True, help_text="Its name in the files storage.")
    # A batch input file, validated at upload: its number of requests and the url they all call.
    line_count = models.PositiveIntegerField(null=True, blank=True)
    request_url = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)

    objects = StoredFileQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "file"
        indexes = [models.Index(fields=["owner", "created_at"], name="file_owner_time")]
        constraints = [
            models.CheckConstraint(
                condition=~Q(purpose="batch") | Q(line_count__isnull=False, request_url__gt=""),
                name="file_batch_input_validated",
            )
        ]

    def __str__(self) -> str:
        return self.public_id

    @property
    def public_id(self) -> str:
        return f"file-{self.id.hex}"


class SnapshotVersion(models.Model):
    """One row whose token changes whenever data behind the auth snapshot changes.

    A random token rather than a counter: a counter could come back to a value a process has
    already seen (after the table is emptied), a new token never does.
    """

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    token = models.CharField(max_length=32, blank=True)
    changed_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return self.token


# Registers the models kept in modules of their own with the app (the batch refers to the models above by name).
from gateway.batch_models import Batch, BatchStatus  # noqa: E402, F401
from gateway.usage_models import UsageRollup, UsageRollupMark  # noqa: E402, F401
