from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import ValidationError
from django.db import DatabaseError
from django.db.models import F, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html

from accounts.admin import UserAdmin as AccessUserAdmin
from accounts.models import User
from billing.models import Balance, CreditTransaction, Tariff
from billing.services import grant_credits, parse_amount, remove_credits
from common.admin import LargeTableAdmin, ReadOnlyAdmin
from common.numbers import plain_decimal

# --- users: identity and access come from accounts, money is added here ----------------------


class CreditsForm(forms.Form):
    amount = forms.CharField(help_text="Credits, e.g. 100 or 0.5 (at most 9 decimal places).")
    description = forms.CharField(required=False, max_length=500, help_text="Recorded in the ledger.")

    def clean_amount(self) -> Decimal:
        try:
            return parse_amount(self.cleaned_data["amount"])
        except ValueError as exc:
            raise ValidationError(str(exc)) from None


admin.site.unregister(User)


@admin.register(User)
class UserAdmin(AccessUserAdmin):
    list_display = ("username", "email", "is_active", "is_staff", "balance_link", "group_count", "date_joined")
    fieldsets = (
        *(AccessUserAdmin.fieldsets[:-1]),
        ("Credits and access", {"fields": ("balance_link", "access_groups")}),
    )
    actions = ("grant_credits_action", "remove_credits_action")

    def get_queryset(self, request: HttpRequest) -> QuerySet[User]:
        return super().get_queryset(request).annotate(balance_amount=F("balance__amount"))

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return ("balance_link", *super().get_readonly_fields(request, obj))

    @admin.display(description="balance", ordering="balance_amount")
    def balance_link(self, user: User) -> str:
        amount = getattr(user, "balance_amount", None) or Decimal(0)
        if user.pk is None:
            return "0"
        url = reverse("admin:billing_credittransaction_changelist") + f"?user__id__exact={user.pk}"
        return format_html('<a href="{}" title="See the ledger">{}</a>', url, plain_decimal(amount))

    @admin.action(description="Grant credits to the selected users", permissions=["change"])
    def grant_credits_action(self, request: HttpRequest, queryset: QuerySet[User]) -> HttpResponse | None:
        return self._move_credits(request, queryset, grant=True)

    @admin.action(description="Remove credits from the selected users", permissions=["change"])
    def remove_credits_action(self, request: HttpRequest, queryset: QuerySet[User]) -> HttpResponse | None:
        return self._move_credits(request, queryset, grant=False)

    def _move_credits(self, request: HttpRequest, queryset: QuerySet[User], *, grant: bool) -> HttpResponse | None:
        """First call shows the amount form; its submission (`apply`) posts one ledger row per user."""
        form = CreditsForm(request.POST if "apply" in request.POST else None)
        if form.is_valid():
            amount, description = form.cleaned_data["amount"], form.cleaned_data["description"]
            service = grant_credits if grant else remove_credits
            done = []
            for user in queryset:
                try:
                    service(user, amount, description=description, created_by=request.user)  # type: ignore[arg-type]
                except (ValueError, ValidationError, DatabaseError) as exc:
                    self.message_user(request, f"Could not move credits for '{user.username}': {exc}", messages.ERROR)
                else:
                    done.append(user.username)
            if done:
                verb = "Granted" if grant else "Removed"
                direction = "to" if grant else "from"
                names = ", ".join(done)
                self.message_user(
                    request, f"{verb} {plain_decimal(amount)} credits {direction} {names}.", messages.SUCCESS
                )
            return None
        title = "Grant credits" if grant else "Remove credits"
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "intro": "Each selected user gets one ledger entry of this amount."
            + ("" if grant else " Balances may go negative."),
            "submit_label": title,
            "form": form,
            "selected": [
                (user, plain_decimal(getattr(user, "balance_amount", None) or Decimal(0))) for user in queryset
            ],
            "action": request.POST.get("action", ""),
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "opts": self.model._meta,
            "media": self.media + form.media,
        }
        return TemplateResponse(request, "admin/billing/credits_form.html", context)


# --- the ledger and its read models -----------------------------------------------------------


@admin.register(CreditTransaction)
class CreditTransactionAdmin(LargeTableAdmin):
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

    list_display = ("model", "tier", "completion_window", "input_price", "output_price", "valid_from", "valid_until")
    list_select_related = ("model",)
    list_filter = ("tier", "completion_window")
    search_fields = ("model__alias",)
