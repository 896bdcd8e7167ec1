"""The request log in the admin: every /ai/ answer, filtered, searched by the id its client saw, exported as CSV."""

from __future__ import annotations

import csv
import itertools
from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest, StreamingHttpResponse

from common.admin import ReadOnlyAdmin
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


class Echo:
    """A file-like object whose write returns the line: csv.writer rows, streamed as they are made."""

    def write(self, value: str) -> str:
        return value


@admin.register(RequestLog)
class RequestLogAdmin(ReadOnlyAdmin):
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
    list_filter = (StatusClassFilter, "error_code", "service_tier", "model_alias")
    search_fields = ("=request_id", "=client_request_id", "user__username", "=key_prefix")
    date_hierarchy = "created_at"
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
        # Operators paste what a client saw: `req_<hex>`, or the `resp_<hex>` of a /responses call.
        term = search_term.strip()
        if term.startswith("resp_"):
            term = "req_" + term.removeprefix("resp_")
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
