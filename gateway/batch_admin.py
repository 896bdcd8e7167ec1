"""The admin of batches: owner, progress, cost so far, status filters, a cancel action, a link to the lines."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from django.contrib import admin, messages
from django.db.models import Count, Q, QuerySet, Sum
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from common.admin import ReadOnlyAdmin
from common.numbers import plain_decimal
from gateway.batch_models import Batch, BatchStatus
from gateway.batch_store import cancel_batch
from gateway.models import UNFINISHED_STATES


@admin.register(Batch)
class BatchAdmin(ReadOnlyAdmin):
    list_display = (
        "public_id",
        "owner",
        "status",
        "endpoint",
        "completion_window",
        "progress",
        "cost_so_far",
        "lines_link",
        "created_at",
        "expires_at",
    )
    list_select_related = ("owner",)
    list_filter = ("status", "completion_window", "endpoint")
    search_fields = ("owner__username",)
    readonly_fields = ("public_id", "progress", "cost_so_far", "lines_link")
    actions = ("cancel",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Batch]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                lines_ended=Count("lines", filter=~Q(lines__state__in=UNFINISHED_STATES)),
                lines_cost=Sum("lines__cost"),
            )
        )

    @admin.display(description="done / total")
    def progress(self, batch: Batch) -> str:
        return f"{batch.lines_ended} / {batch.total}"  # type: ignore[attr-defined]

    @admin.display(description="cost so far")
    def cost_so_far(self, batch: Batch) -> str:
        return plain_decimal(batch.lines_cost or Decimal(0))  # type: ignore[attr-defined]

    @admin.display(description="lines")
    def lines_link(self, batch: Batch) -> str:
        url = reverse("admin:gateway_inferencerequest_changelist")
        return format_html('<a href="{}?batch__id__exact={}">{} lines</a>', url, batch.pk, batch.total)

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("gateway.change_batch")

    @admin.action(description="Cancel the selected batches", permissions=["cancel"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[Batch]) -> None:
        running = queryset.filter(status__in=(BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS))
        cancelled = sum(1 for batch in running if cancel_batch(batch).cancelling_at is not None)
        self.message_user(request, f"Cancelled {cancelled} batch{'es' if cancelled != 1 else ''}.", messages.SUCCESS)

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[Batch], search_term: str) -> Any:
        # Operators paste the id clients see: `batch_<hex>` (or the bare uuid).
        try:
            batch_id = uuid.UUID(search_term.strip().removeprefix("batch_"))
        except ValueError:
            return super().get_search_results(request, queryset, search_term)
        return queryset.filter(id=batch_id), False
