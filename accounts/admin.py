from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.actions import delete_selected as django_delete_selected
from django.contrib.admin.widgets import FilteredSelectMultiple
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.forms import UserChangeForm
from django.core.exceptions import ValidationError
from django.db import DatabaseError
from django.db.models import Count, F, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from accounts.models import EVERYONE, AccessGroup, ApiKey, User
from accounts.services import create_api_key, revoke_api_key
from billing.services import grant_credits, parse_amount, remove_credits
from dwctl_site.cli import plain_decimal

# --- users ----------------------------------------------------------------------------------


class CreditsForm(forms.Form):
    amount = forms.CharField(help_text="Credits, e.g. 100 or 0.5 (at most 9 decimal places).")
    description = forms.CharField(required=False, max_length=500, help_text="Recorded in the ledger.")

    def clean_amount(self) -> Decimal:
        try:
            return parse_amount(self.cleaned_data["amount"])
        except ValueError as exc:
            raise ValidationError(str(exc)) from None


class UserForm(UserChangeForm):
    access_groups = forms.ModelMultipleChoiceField(
        queryset=AccessGroup.objects.filter(is_builtin=False),
        required=False,
        widget=FilteredSelectMultiple("access groups", is_stacked=False),
        help_text=f"Every user is also in '{EVERYONE}'.",
    )

    class Meta(UserChangeForm.Meta):
        model = User

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.fields["access_groups"].initial = list(self.instance.access_groups.filter(is_builtin=False))


class ApiKeyInline(admin.TabularInline):
    """The user's keys, read-only here: keys are created from the API key page (the secret is shown once)."""

    model = ApiKey
    fields = ("prefix", "name", "purpose", "created_at", "expires_at", "revoked_at", "last_used_at")
    readonly_fields = fields
    extra = 0
    show_change_link = True
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    form = UserForm
    list_display = ("username", "email", "is_active", "is_staff", "balance_link", "group_count", "date_joined")
    list_filter = ("is_active", "is_staff", "is_superuser", "access_groups")
    readonly_fields = ("balance_link", "last_login", "date_joined")
    fieldsets = (
        *(DjangoUserAdmin.fieldsets or ()),
        ("Credits and access", {"fields": ("balance_link", "access_groups")}),
    )
    inlines = (ApiKeyInline,)
    actions = ("grant_credits_action", "remove_credits_action")

    def get_queryset(self, request: HttpRequest) -> QuerySet[User]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                balance_amount=F("balance__amount"),
                group_count=Count("access_groups", filter=Q(access_groups__is_builtin=False), distinct=True),
            )
        )

    def get_inlines(self, request: HttpRequest, obj: User | None) -> Any:
        return self.inlines if obj is not None else ()

    @admin.display(description="balance", ordering="balance_amount")
    def balance_link(self, user: User) -> str:
        amount = getattr(user, "balance_amount", None) or Decimal(0)
        if user.pk is None:
            return "0"
        url = reverse("admin:billing_credittransaction_changelist") + f"?user__id__exact={user.pk}"
        return format_html('<a href="{}" title="See the ledger">{}</a>', url, plain_decimal(amount))

    @admin.display(description="groups", ordering="group_count")
    def group_count(self, user: User) -> int:
        return user.group_count  # type: ignore[attr-defined]

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        if "access_groups" in form.cleaned_data:
            # .set() sends m2m_changed, which the auth snapshot listens to.
            builtin = list(form.instance.access_groups.filter(is_builtin=True))
            form.instance.access_groups.set([*form.cleaned_data["access_groups"], *builtin])

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
        return TemplateResponse(request, "admin/accounts/user/credits_form.html", context)


# --- access groups --------------------------------------------------------------------------


@admin.register(AccessGroup)
class AccessGroupAdmin(admin.ModelAdmin):
    list_display = ("name", "is_builtin", "member_count", "model_count", "created_at")
    search_fields = ("name", "description")
    list_filter = ("is_builtin",)
    filter_horizontal = ("members", "models")
    readonly_fields = ("is_builtin", "created_at")
    actions = ("delete_selected",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[AccessGroup]:
        return (
            super()
            .get_queryset(request)
            .annotate(member_total=Count("members", distinct=True), model_total=Count("models", distinct=True))
        )

    @admin.display(description="members", ordering="member_total")
    def member_count(self, group: AccessGroup) -> str | int:
        return "everyone" if group.is_builtin else group.member_total  # type: ignore[attr-defined]

    @admin.display(description="models", ordering="model_total")
    def model_count(self, group: AccessGroup) -> int:
        return group.model_total  # type: ignore[attr-defined]

    def get_readonly_fields(self, request: HttpRequest, obj: AccessGroup | None = None) -> Any:
        if obj is not None and obj.is_builtin:
            return ("name", *self.readonly_fields)
        return self.readonly_fields

    def get_exclude(self, request: HttpRequest, obj: AccessGroup | None = None) -> Any:
        # Everyone's membership is implicit: there is nothing to edit.
        return ("members",) if obj is not None and obj.is_builtin else ()

    def has_delete_permission(self, request: HttpRequest, obj: AccessGroup | None = None) -> bool:
        if obj is not None and obj.is_builtin:
            return False
        return super().has_delete_permission(request, obj)

    @admin.action(description="Delete selected access groups", permissions=["delete"])
    def delete_selected(self, request: HttpRequest, queryset: QuerySet[AccessGroup]) -> HttpResponse | None:
        """Django's bulk delete, with the built-in group left out."""
        if queryset.filter(is_builtin=True).exists():
            self.message_user(
                request, f"The built-in '{EVERYONE}' group cannot be deleted; it was left out.", messages.WARNING
            )
            queryset = queryset.filter(is_builtin=False)
            if not queryset.exists():
                return None
        return django_delete_selected(self, request, queryset)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[AccessGroup]) -> None:
        super().delete_queryset(request, queryset.filter(is_builtin=False))


# --- API keys -------------------------------------------------------------------------------


class RevokedFilter(admin.SimpleListFilter):
    title = "revoked"
    parameter_name = "revoked"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Revoked"), ("no", "Not revoked")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> QuerySet[ApiKey]:
        if self.value() == "yes":
            return queryset.filter(revoked_at__isnull=False)
        if self.value() == "no":
            return queryset.filter(revoked_at__isnull=True)
        return queryset


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys are made by `create_api_key`: the secret is shown once, after saving, and never stored."""

    list_display = ("display_prefix", "name", "owner", "purpose", "status", "created_at", "expires_at", "last_used_at")
    list_select_related = ("owner",)
    list_filter = ("purpose", RevokedFilter)
    search_fields = ("name", "prefix", "owner__username", "owner__email")
    autocomplete_fields = ("owner",)
    exclude = ("secret_hash",)
    actions = ("revoke",)
    add_fields = ("owner", "name", "purpose", "expires_at", "requests_per_second", "burst_size")
    change_readonly = ("owner", "prefix", "created_at", "revoked_at", "last_used_at")

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        if obj is None:
            return self.add_fields
        return ("owner", "prefix", "name", "purpose", "expires_at", "requests_per_second", "burst_size",
                "created_at", "last_used_at", "revoked_at")  # fmt: skip

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        if obj is None:
            return ()
        if obj.revoked_at is not None:
            return self.get_fields(request, obj)  # a revoked key is history
        return self.change_readonly

    def has_delete_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        return False  # revoking is the delete

    @admin.display(description="key", ordering="prefix")
    def display_prefix(self, api_key: ApiKey) -> str:
        return f"{api_key.prefix}…"

    @admin.display(description="status")
    def status(self, api_key: ApiKey) -> str:
        if api_key.revoked_at is not None:
            return "revoked"
        if api_key.expires_at is not None and api_key.expires_at <= timezone.now():
            return "expired"
        return "active"

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        created, secret = create_api_key(
            obj.owner,
            name=obj.name,
            purpose=obj.purpose,
            expires_at=obj.expires_at,
            requests_per_second=obj.requests_per_second,
            burst_size=obj.burst_size,
        )
        # The admin goes on with `obj` (log entry, redirect): make it the saved key.
        for field in ("id", "secret_hash", "prefix", "created_at"):
            setattr(obj, field, getattr(created, field))
        obj._state.adding = False
        obj._state.db = created._state.db
        self.message_user(
            request,
            f"The secret of key {created.prefix}… is {secret} — copy it now: "
            "it is not stored and will not be shown again.",
            messages.SUCCESS,
        )

    @admin.action(description="Revoke the selected keys", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        revoked = 0
        for api_key in queryset.filter(revoked_at__isnull=True):
            revoke_api_key(api_key)
            revoked += 1
        self.message_user(request, f"Revoked {revoked} key{'s' if revoked != 1 else ''}.", messages.SUCCESS)
