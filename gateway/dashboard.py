"""Usage in the admin: the dashboard page, and spend today / this month on the user and key pages.

Every figure comes from gateway/usage.py (the request log's cost, the same amount the ledger was
charged in the same transaction), so the dashboard, a user's page and a key's page always agree.
"""

from __future__ import annotations

import calendar
from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import F, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html, format_html_join

from accounts.admin import ApiKeyAdmin as AccessApiKeyAdmin
from accounts.models import ApiKey, User
from billing.admin import UserAdmin as BillingUserAdmin
from common.numbers import plain_decimal
from gateway.usage import PERIODS, Dashboard, Point, Spend, Spender, dashboard, spend_of


def milliseconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} ms"


def figures(point: Point, *, error_rate: float | None = None) -> list[tuple[str, str]]:
    """A point as the page shows it: counts with thousands separators, credits without trailing zeros."""
    rate = error_rate if error_rate is not None else (point.errors / point.requests if point.requests else 0.0)
    return [
        ("Requests", f"{point.requests:,}"),
        ("Error rate", f"{rate * 100:.1f} %"),
        ("Tokens in", f"{point.input_tokens:,}"),
        ("Tokens out", f"{point.output_tokens:,}"),
        ("Spend (credits)", plain_decimal(point.spend)),
        ("p50 latency", milliseconds(point.latency.get(50))),
        ("p99 latency", milliseconds(point.latency.get(99))),
    ]


def chart_data(board: Dashboard) -> dict[str, list[Any]]:
    """The series uPlot draws (columns: a Unix time, then values; null where a bucket had no call)."""
    points = board.points
    return {
        "time": [calendar.timegm(p.start.utctimetuple()) for p in points],
        "requests": [p.requests for p in points],
        "errors": [p.errors for p in points],
        "input_tokens": [p.input_tokens for p in points],
        "output_tokens": [p.output_tokens for p in points],
        "spend": [float(p.spend) for p in points],  # drawn only; every figure shown is the exact Decimal
        "p50": [p.latency.get(50) for p in points],
        "p99": [p.latency.get(99) for p in points],
    }


def top_rows(spenders: list[Spender], url_name: str | None) -> list[dict[str, str]]:
    return [
        {
            "label": row.label,
            "url": reverse(url_name, args=[row.object_id]) if url_name else "",
            "requests": f"{row.requests:,}",
            "credits": plain_decimal(row.spend),
        }
        for row in spenders
    ]


def usage_view(request: HttpRequest) -> HttpResponse:
    period = request.GET.get("period", "24h")
    if period not in PERIODS:
        period = "24h"
    board = dashboard(period)
    site = admin.site
    context = {
        **site.each_context(request),
        "title": "Usage",
        "period": period,
        "periods": [(name, name.replace("h", " h").replace("d", " d")) for name in PERIODS],
        "board": board,
        "figures": figures(board.totals, error_rate=board.error_rate),
        "chart_data": chart_data(board),
        "tops": [
            ("Top users by spend", top_rows(board.top_users, "admin:accounts_user_change")),
            ("Top keys by spend", top_rows(board.top_keys, "admin:accounts_apikey_change")),
            ("Top models by spend", top_rows(board.top_models, None)),
        ],
    }
    return TemplateResponse(request, "admin/gateway/usage.html", context)


def spend_table(spend: Spend) -> str:
    return format_html(
        '<table class="usage-figures"><thead><tr><th></th><th>requests</th><th>credits spent</th></tr></thead>'
        "<tbody><tr><th>today (UTC)</th><td>{}</td><td>{}</td></tr>"
        "<tr><th>this month</th><td>{}</td><td>{}</td></tr></tbody></table>",
        f"{spend.requests_today:,}",
        plain_decimal(spend.spend_today),
        f"{spend.requests_month:,}",
        plain_decimal(spend.spend_month),
    )


# --- the user page: money and access first -----------------------------------------------------

admin.site.unregister(User)


@admin.register(User)
class UserAdmin(BillingUserAdmin):
    """Balance, spend, groups, keys and the two things done most (grant credits, create a key) come
    first; Django's auth groups and permissions only matter to staff, so only staff pages show them."""

    account = ("Credits and access", {"fields": ("balance_link", "spend", "access_groups", "keys", "shortcuts")})
    identity = (None, {"fields": ("username", "password")})
    personal = ("Personal info", {"fields": ("first_name", "last_name", "email")})
    dates = ("Important dates", {"fields": ("last_login", "date_joined")})

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return super().get_fieldsets(request, obj)
        status = ["is_active", "is_staff", "is_superuser"]
        if obj.is_staff:
            status += ["groups", "user_permissions"]
        return (self.account, self.identity, self.personal, ("Permissions", {"fields": status}), self.dates)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return ("spend", "keys", "shortcuts", *super().get_readonly_fields(request, obj))

    def get_urls(self) -> list[URLPattern]:
        grant = path(
            "<path:object_id>/grant-credits/",
            self.admin_site.admin_view(self.grant_credits_view),
            name="accounts_user_grant_credits",
        )
        return [grant, *super().get_urls()]

    @admin.display(description="spend")
    def spend(self, user: User) -> str:
        return spend_table(spend_of(user_id=user.pk)) if user.pk else "—"

    @admin.display(description="API keys")
    def keys(self, user: User) -> str:
        if user.pk is None:
            return "—"
        rows = ApiKey.objects.filter(owner=user).order_by("revoked_at", "-created_at")
        listed = format_html_join(
            "",
            '<li><a href="{}">{}… {}</a> ({}{})</li>',
            (
                (
                    reverse("admin:accounts_apikey_change", args=[k.pk]),
                    k.prefix,
                    k.name,
                    k.purpose,
                    ", revoked" if k.revoked_at else "",
                )
                for k in rows
            ),
        )
        return format_html('<ul class="user-keys">{}</ul>', listed) if listed else "none yet"

    @admin.display(description="shortcuts")
    def shortcuts(self, user: User) -> str:
        if user.pk is None:
            return ""
        return format_html(
            '<a class="button" href="{}">Grant credits</a> <a class="button" href="{}?owner={}">Create key</a>',
            reverse("admin:accounts_user_grant_credits", args=[user.pk]),
            reverse("admin:accounts_apikey_add"),
            user.pk,
        )

    def grant_credits_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The grant form of the changelist action, for this one user; back to their page once granted."""
        if not self.has_change_permission(request):
            raise PermissionDenied
        users: QuerySet[User] = User.objects.filter(pk=object_id).annotate(balance_amount=F("balance__amount"))
        shown = self._move_credits(request, users, grant=True)
        if shown is not None:
            return shown
        return HttpResponseRedirect(reverse("admin:accounts_user_change", args=[object_id]))


# --- the key page: its spend first ---------------------------------------------------------------

admin.site.unregister(ApiKey)


@admin.register(ApiKey)
class ApiKeyAdmin(AccessApiKeyAdmin):
    def get_fieldsets(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        return fieldsets if obj is None else (("Usage", {"fields": ("spend",)}), *fieldsets)

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        fields = super().get_readonly_fields(request, obj)
        return fields if obj is None else ("spend", *fields)

    @admin.display(description="spend")
    def spend(self, api_key: ApiKey) -> str:
        return spend_table(spend_of(api_key_id=api_key.pk)) if api_key.pk else "—"
