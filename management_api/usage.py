"""What was called: usage added up by user, key, model or day over a period, and the request log itself."""

# No `from __future__ import annotations`: django-ninja reads the views' annotations at run time.
import re
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any

from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import TruncDate
from django.http import HttpRequest
from django.utils import timezone
from ninja import Query, Router, Schema
from ninja.pagination import CursorPagination, paginate
from pydantic import Field, field_validator, model_validator

from billing.models import Tier
from gateway.models import RequestLog
from management_api.auth import permits
from management_api.schemas import Credits

usage = Router(tags=["usage"])

DEFAULT_PERIOD = timedelta(days=30)
STATUS = re.compile(r"[1-5](xx|\d\d)")


class Period(Schema):
    since: datetime | None = Field(None, description="From (inclusive, ISO 8601). Default: 30 days before `until`.")
    until: datetime | None = Field(None, description="To (exclusive). Default: now.")

    @model_validator(mode="after")
    def ordered(self) -> "Period":
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError("since must be before until")
        return self

    def bounds(self) -> tuple[datetime, datetime]:
        until = self.until or timezone.now()
        return self.since or until - DEFAULT_PERIOD, until


class LogFilters(Period):
    status: str | None = Field(None, description="A status (429) or a class of them (4xx).")
    error_code: str | None = Field(None, description="e.g. invalid_api_key, model_not_found, insufficient_credits.")
    model: str | None = Field(None, description="The alias the client asked for.")
    user_id: int | None = None
    key_id: int | None = None
    key_prefix: str | None = Field(None, description="The first characters of the key a call presented.")
    tier: Tier | None = None

    @field_validator("status")
    @classmethod
    def status_or_class(cls, value: str | None) -> str | None:
        if value is not None and not STATUS.fullmatch(value):
            raise ValueError("use a status such as 429, or a class such as 4xx")
        return value

    def apply(self, rows: QuerySet[RequestLog]) -> QuerySet[RequestLog]:
        since, until = self.bounds()
        rows = rows.filter(created_at__gte=since, created_at__lt=until)
        if self.status is not None:
            if self.status.endswith("xx"):
                low = int(self.status[0]) * 100
                rows = rows.filter(status_code__gte=low, status_code__lt=low + 100)
            else:
                rows = rows.filter(status_code=int(self.status))
        exact = {
            "error_code": self.error_code,
            "model_alias": self.model,
            "user_id": self.user_id,
            "api_key_id": self.key_id,
            "key_prefix": self.key_prefix,
            "service_tier": self.tier,
        }
        return rows.filter(**{name: value for name, value in exact.items() if value is not None})


class GroupBy(StrEnum):
    USER = "user"
    KEY = "key"
    MODEL = "model"
    DAY = "day"


# What each grouping adds up by, and the columns that name a group.
GROUP_COLUMNS: dict[GroupBy, tuple[str, ...]] = {
    GroupBy.USER: ("user_id", "user__username"),
    GroupBy.KEY: ("api_key_id", "key_prefix"),
    GroupBy.MODEL: ("model_alias",),
    GroupBy.DAY: ("day",),
}


class UsageRow(Schema):
    user_id: int | None = None
    username: str | None = None
    key_id: int | None = None
    key_prefix: str | None = None
    model: str | None = None
    day: date | None = Field(None, description="A UTC day.")
    requests: int
    errors: int = Field(description="Calls answered 4xx or 5xx.")
    input_tokens: int
    output_tokens: int
    cost: Credits = Field(description="Credits charged.")


class UsageReport(Schema):
    since: datetime
    until: datetime
    group_by: GroupBy
    totals: UsageRow
    groups: list[UsageRow] = Field(description="Highest cost first (by day: oldest first).")


def totals() -> dict[str, Any]:
    return {
        "requests": Count("id"),
        "errors": Count("id", filter=Q(status_code__gte=400)),
        "input_tokens": Sum("input_tokens"),
        "output_tokens": Sum("output_tokens"),
        "cost": Sum("cost"),
    }


def usage_row(values: dict[str, Any]) -> UsageRow:
    named = {
        "user_id": values.get("user_id"),
        "username": values.get("user__username"),
        "key_id": values.get("api_key_id"),
        "key_prefix": values.get("key_prefix"),
        "model": values.get("model_alias"),
        "day": values.get("day"),
    }
    return UsageRow(
        **named,
        requests=values["requests"],
        errors=values["errors"],
        input_tokens=values["input_tokens"] or 0,
        output_tokens=values["output_tokens"] or 0,
        cost=values["cost"] or Decimal(0),
    )


@usage.get("/usage", response=UsageReport, exclude_none=True, summary="Usage added up over a period")
@permits("gateway.view_requestlog")
def usage_report(request: HttpRequest, filters: Query[LogFilters], group_by: GroupBy = GroupBy.MODEL) -> UsageReport:
    """Requests, errors, tokens and cost from the request log, by user, key, model or UTC day; the same
    filters as the request log narrow it."""
    since, until = filters.bounds()
    rows = filters.apply(RequestLog.objects.order_by())
    if group_by == GroupBy.DAY:
        rows = rows.annotate(day=TruncDate("created_at", tzinfo=UTC))
    columns = GROUP_COLUMNS[group_by]
    grouped = rows.values(*columns).annotate(**totals())
    ordered = grouped.order_by("day") if group_by == GroupBy.DAY else grouped.order_by("-cost", "-requests", *columns)
    return UsageReport(
        since=since,
        until=until,
        group_by=group_by,
        totals=usage_row(rows.aggregate(**totals())),
        groups=[usage_row(values) for values in ordered],
    )


class RequestOut(Schema):
    request_id: str = Field(description="The x-request-id its client saw.")
    client_request_id: str
    created_at: datetime
    user_id: int | None
    key_id: int | None = Field(validation_alias="api_key_id")
    key_prefix: str
    client_ip: str | None
    model: str = Field(validation_alias="model_alias")
    path: str
    tier: str = Field(validation_alias="service_tier")
    status_code: int
    error_code: str
    latency_ms: float
    ttfb_ms: float | None
    input_tokens: int | None
    output_tokens: int | None
    cost: Credits | None
    usage_estimated: bool


class RequestPages(CursorPagination):
    """Newest first, by cursor: no count over millions of rows, and a page stays put as calls arrive."""

    items_attribute = "items"

    class Output(Schema):
        items: list[Any]
        next: str | None = Field(description="The URL of the next (older) page; null on the last.")
        previous: str | None


@usage.get("/requests", response=list[RequestOut], summary="The request log, filtered")
@paginate(RequestPages, ordering=("-created_at", "-id"))
@permits("gateway.view_requestlog")
def list_requests(request: HttpRequest, filters: Query[LogFilters]) -> QuerySet[RequestLog]:
    """Every /ai/ answer, refusals included. The period defaults to the last 30 days."""
    return filters.apply(RequestLog.objects.all())
