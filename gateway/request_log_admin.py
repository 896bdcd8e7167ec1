"""The request log in the admin: every /ai/ answer, filtered, searched by the id its client saw, exported as CSV.

The log grows by a row per call, so no page reads all of it: the unfiltered list is counted from
PostgreSQL's estimate, with no facet counts (common.admin.LargeTableAdmin); the date filter offers
fixed ranges (a date hierarchy lists the dates present: a DISTINCT over the whole log); the
error-code and model filters offer the values of the newest calls; an id a client saw and an
exact username are found through an index.
"""

from __future__ import annotations

import csv
import itertools
from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest, StreamingHttpResponse

from accounts.models import User
from common.admin import LargeTableAdmin
from common.numbers import plain_decimal
from gateway.models import RequestLog

CSV_COLUMNS = (
    "created_at",
    "request_id",
    "client_request_id",
    "user__username",
    "key_prefix",
    "model_alias",
    "path",
    "service_tier",
    "status_code",
    "error_code",
    "latency_ms",
    "ttfb_ms",
    "input_tokens",
    "output_tokens",
    "cost",
    "client_ip",
)


class StatusClassFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status_class"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("2", "2xx served"), ("4", "4xx refused"), ("5", "5xx failed")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[RequestLog]) -> QuerySet[RequestLog]:
        if self.value() in ("2", "4", "5"):
            low = int(self.value()) * 100  # type: ignore[arg-type]
            return queryset.filter(status_code__gte=low, status_code__lt=low + 100)
        return queryset


class NewestValuesFilter(admin.SimpleListFilter):
    """Choices among the values of the newest `NEWEST` calls (a value older than them still filters
    from the URL, and is shown while chosen)."""

    NEWEST = 10_000

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        newest = RequestLog.objects.order_by("-created_at").values_list(str(self.parameter_name), flat=True)
        values = {value for value in newest[: self.NEWEST] if value}
        if self.value():
            values.add(self.value())  # type: ignore[arg-type]
        return [(value, value) for value in sorted(values)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[RequestLog]) -> QuerySet[RequestLog]:
        return queryset.filter(**{str(self.parameter_name): self.value()}) if self.value() else queryset


class ErrorCodeFilter(NewestValuesFilter):
    title = "error code"
    parameter_name = "error_code"


class ModelFilter(NewestValuesFilter):
    title = "model"
    parameter_name = "model_alias"


class Echo:
    """A file-like object whose write returns the line: csv.writer rows, streamed as they are made."""

    def write(self, value: str) -> str:
        return value


@admin.register(RequestLog)
class RequestLogAdmin(LargeTableAdmin):
    list_display = (
        "created_at",
        "request_id",
        "user",
        "api_key_column",
        "model_alias",
        "path",
        "service_tier",
        "status_code",
        "error_code",
        "latency",
        "ttfb",
        "input_tokens",
        "output_tokens",
        "credits",
    )
    list_select_related = ("user", "api_key")
    list_filter = (
        StatusClassFilter,
        ("created_at", admin.DateFieldListFilter),
        ErrorCodeFilter,
        "service_tier",
        ModelFilter,
    )
    search_fields = ("=request_id", "=client_request_id", "user__username", "=key_prefix")
    actions = ("export_csv",)

    @admin.display(description="API key", ordering="key_prefix")
    def api_key_column(self, log: RequestLog) -> str:
        if log.api_key is not None:
            return f"{log.api_key.prefix}… {log.api_key.name}".strip()
        return f"{log.key_prefix}… (unknown)" if log.key_prefix else "—"

    @admin.display(description="latency", ordering="latency_ms")
    def latency(self, log: RequestLog) -> str:
        return f"{log.latency_ms:.1f} ms"

    @admin.display(description="first byte", ordering="ttfb_ms")
    def ttfb(self, log: RequestLog) -> str:
        return "—" if log.ttfb_ms is None else f"{log.ttfb_ms:.1f} ms"

    @admin.display(description="credits", ordering="cost")
    def credits(self, log: RequestLog) -> str:
        return "—" if log.cost is None else plain_decimal(log.cost)

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[RequestLog], search_term: str) -> Any:
        # Operators paste what a client saw: `req_<hex>`, or the `resp_<hex>` of a /responses call; or
        # a username. Both are found through an index; the search below reads the whole log.
        term = search_term.strip()
        if not term:  # every list page comes through here, searched or not
            return queryset, False
        if term.startswith("resp_"):
            term = "req_" + term.removeprefix("resp_")
        exact = queryset.filter(request_id=term)
        if exact.exists():
            return exact, False
        user = User.objects.filter(username=term).first()
        if user is not None:
            return queryset.filter(user=user), False
        return super().get_search_results(request, queryset, term)

    @admin.action(description="Export the selected calls as CSV")
    def export_csv(self, request: HttpRequest, queryset: QuerySet[RequestLog]) -> StreamingHttpResponse:
        """Streamed row by row: an export of a million calls never sits in memory."""
        writer = csv.writer(Echo())
        rows = queryset.order_by("created_at").values_list(*CSV_COLUMNS).iterator(chunk_size=2000)
        lines = (writer.writerow(row) for row in itertools.chain([CSV_COLUMNS], rows))
        response = StreamingHttpResponse(lines, content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = 'attachment; filename="request-log.csv"'
        return response
