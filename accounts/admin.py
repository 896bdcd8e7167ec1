from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.actions import delete_selected as django_delete_selected
from django.contrib.admin.widgets import FilteredSelectMultiple
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.forms import UserChangeForm
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

from accounts.models import EVERYONE, KEY_LIMITS, AccessGroup, ApiKey, User
from accounts.services import create_api_key, revoke_api_key, set_user_groups

# --- users ----------------------------------------------------------------------------------


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


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    form = UserForm
    """Identity and access; `billing.admin` extends it with the balance and the credit actions."""

    list_display: tuple[str, ...] = ("username", "email", "is_active", "is_staff", "group_count", "date_joined")
    list_filter = ("is_active", "is_staff", "is_superuser", "access_groups")
    readonly_fields = ("last_login", "date_joined")
    fieldsets = (
        *(DjangoUserAdmin.fieldsets or ()),
        ("Access", {"fields": ("access_groups",)}),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[User]:
        return (
            super()
            .get_queryset(request)
            .annotate(group_count=Count("access_groups", filter=Q(access_groups__is_builtin=False), distinct=True))
        )

    @admin.display(description="groups", ordering="group_count")
    def group_count(self, user: User) -> int:
        return user.group_count  # type: ignore[attr-defined]

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        if "access_groups" in form.cleaned_data:
            set_user_groups(form.instance, form.cleaned_data["access_groups"])


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
    limits = (
        "Limits",
        {
            "fields": (("requests_per_second", "burst_size"), "tokens_per_minute", ("spend_limit", "spend_window")),
            "description": "Empty means no limit. A burst needs a rate; a spend limit needs its window (UTC).",
        },
    )
    key_fields = ("owner", "prefix", "name", "purpose", "expires_at", "created_at", "last_used_at", "revoked_at")
    add_fieldsets = ((None, {"fields": ("owner", "name", "purpose", "expires_at")}), limits)
    change_fieldsets = ((None, {"fields": key_fields}), limits)
    change_readonly = ("owner", "prefix", "created_at", "revoked_at", "last_used_at")

    def get_fieldsets(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        return self.add_fieldsets if obj is None else self.change_fieldsets

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        if obj is None:
            return ()
        if obj.revoked_at is not None:
            return (*self.key_fields, *KEY_LIMITS)  # a revoked key is history
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
            tokens_per_minute=obj.tokens_per_minute,
            spend_limit=obj.spend_limit,
            spend_window=obj.spend_window,
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
