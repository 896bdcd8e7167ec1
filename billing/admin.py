from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from billing.models import Balance, CreditTransaction, Tariff
from dwctl_site.cli import plain_decimal


class ReadOnlyAdmin(admin.ModelAdmin):
    """History and read models: viewable, never written from the admin."""

    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(CreditTransaction)
class CreditTransactionAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "user", "kind", "signed", "tier", "description", "source_id", "created_by")
    list_select_related = ("user", "created_by")
    list_filter = ("kind", "tier")
    search_fields = ("user__username", "source_id", "description")

    @admin.display(description="amount", ordering="amount")
    def signed(self, entry: CreditTransaction) -> str:
        return plain_decimal(entry.signed_amount)


@admin.register(Balance)
class BalanceAdmin(ReadOnlyAdmin):
    list_display = ("user", "credits", "updated_at")
    list_select_related = ("user",)
    search_fields = ("user__username", "user__email")
    ordering = ("user__username",)

    @admin.display(description="credits", ordering="amount")
    def credits(self, balance: Balance) -> str:
        return plain_decimal(balance.amount)


@admin.register(Tariff)
class TariffAdmin(ReadOnlyAdmin):
    """Prices are changed on the model page, which opens a new version through `set_tariff`."""

    list_display = ("model", "tier", "input_price", "output_price", "valid_from", "valid_until")
    list_select_related = ("model",)
    list_filter = ("tier",)
    search_fields = ("model__alias",)
