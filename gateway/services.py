from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import transaction
from django.utils import timezone

from accounts.models import AccessGroup
from accounts.services import ensure_groups
from billing.models import Tier
from billing.services import set_tariff
from gateway.models import DeployedModel, Endpoint, InferenceRequest, JobState, ModelKind


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
) -> InferenceRequest:
    """Record a request that must be remembered: a queued job, a background call, a /responses call."""
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
    *,
    job_id: uuid.UUID,
    owner_id: int,
    api_key_id: int | None,
    model_alias: str,
    request_body: dict[str, Any],
    status: int,
    body: Any,
    input_tokens: int | None,
    output_tokens: int | None,
) -> InferenceRequest:
    """Record a finished real-time /responses call in one write, so GET finds it at once."""
    now = timezone.now()
    return InferenceRequest.objects.create(
        id=job_id,
        owner_id=owner_id,
        api_key_id=api_key_id,
        model_alias=model_alias,
        path="responses",
        request_body=request_body,
        state=JobState.COMPLETED if status < 400 else JobState.FAILED,
        response_status=status,
        response_body=body,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        created_at=now,
        updated_at=now,
        completed_at=now,
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
