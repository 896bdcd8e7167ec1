from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.widgets import FilteredSelectMultiple
from django.core.exceptions import ValidationError
from django.db.models import Count, Exists, OuterRef, Prefetch, QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from accounts.models import EVERYONE, AccessGroup
from billing.models import PRICE, Tariff, Tier, price_key
from billing.services import set_tariff
from common.admin import LargeTableAdmin, ReadOnlyAdmin
from gateway.credential_form import CredentialForm
from gateway.jobs import cancel_job
from gateway.models import (
    MODEL_LIMITS,
    DeployedModel,
    Endpoint,
    InferenceRequest,
    InferenceRequestQuerySet,
    JobState,
    StoredFile,
)
from gateway.services import (
    ENDPOINT_FIELDS,
    check_endpoint_fields,
    restore_model,
    retire_model,
    set_model_groups,
    update_endpoint,
)
from routing_rules.admin import save_rule
from routing_rules.models import TrafficRule
from routing_rules.services import delete_traffic_rule

# --- endpoints ------------------------------------------------------------------------------


class EndpointForm(CredentialForm):
    """The upstream credential is write-only: never rendered (clear or encrypted), kept when left blank."""

    base_url = forms.URLField(
        max_length=500,
        assume_scheme="https",
        help_text="Up to and including /v1, e.g. https://api.openai.com/v1",
    )

    class Meta:
        model = Endpoint
        fields = (
            "name",
            "base_url",
            "api_key",
            "clear_api_key",
            "auth_header",
            "auth_prefix",
            "timeout_seconds",
            "connect_timeout_seconds",
            "responses_api",
        )

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        given = {name: cleaned[name] for name in ENDPOINT_FIELDS if cleaned.get(name) is not None}
        try:
            check_endpoint_fields(given)  # the rules `update_endpoint` applies, shown on their fields
        except ValidationError as exc:
            for field, messages in exc.message_dict.items():
                self.add_error(field if field in self.fields else None, messages)
        return cleaned


@admin.register(Endpoint)
class EndpointAdmin(admin.ModelAdmin):
    form = EndpointForm
    list_display = (
        "name",
        "base_url",
        "has_credential",
        "auth_header",
        "timeout_seconds",
        "responses_api",
        "model_count",
        "updated_at",
    )
    list_filter = ("responses_api",)
    search_fields = ("name", "base_url")
    readonly_fields = ("created_at", "updated_at")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Endpoint]:
        return super().get_queryset(request).annotate(model_total=Count("models"))

    def save_model(self, request: HttpRequest, obj: Endpoint, form: Any, change: bool) -> None:
        # The credential is not a model field: the service encrypts it, and a blank field keeps it.
        fields = {name: form.cleaned_data[name] for name in ENDPOINT_FIELDS if name in form.cleaned_data}
        update_endpoint(obj, api_key=form.credential(), **fields)

    @admin.display(description="credential", boolean=True)
    def has_credential(self, endpoint: Endpoint) -> bool:
        return endpoint.has_credential

    @admin.display(description="models", ordering="model_total")
    def model_count(self, endpoint: Endpoint) -> int:
        return endpoint.model_total  # type: ignore[attr-defined]


# --- models ---------------------------------------------------------------------------------

# Price key (billing.models.price_key) → its form fields: each batch completion window has its own.
PRICE_FIELDS = {
    Tier.REALTIME: ("realtime_input_price", "realtime_output_price"),
    Tier.FLEX: ("flex_input_price", "flex_output_price"),
    **{
        price_key(Tier.BATCH, window): (f"batch_{window}_input_price", f"batch_{window}_output_price")
        for window in settings.GATEWAY_BATCH_WINDOWS
    },
}


def _price_field(label: str) -> forms.DecimalField:
    return forms.DecimalField(
        label=label,
        required=False,
        min_value=Decimal(0),
        max_digits=PRICE["max_digits"],
        decimal_places=PRICE["decimal_places"],
        help_text="Credits per 1M tokens.",
    )


class DeployedModelForm(forms.ModelForm):
    """Prices are not model fields: a changed price opens a new tariff version (past requests keep theirs)."""

    realtime_input_price = _price_field("Real-time input price")
    realtime_output_price = _price_field("Real-time output price")
    flex_input_price = _price_field("Flex input price")
    flex_output_price = _price_field("Flex output price")
    access_groups = forms.ModelMultipleChoiceField(
        queryset=AccessGroup.objects.all(),
        required=False,
        widget=FilteredSelectMultiple("access groups", is_stacked=False),
        help_text=f"Members of these groups may call the model. '{EVERYONE}' makes it public.",
    )

    class Meta:
        model = DeployedModel
        fields = (
            "alias",
            "upstream_model",
            "endpoint",
            "kind",
            *MODEL_LIMITS,
            "max_model_calls",
            "deleted_at",
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields[
            "flex_input_price"
        ].help_text = "Credits per 1M tokens. With no flex price, flex uses the real-time one."
        self.fields["max_model_calls"].required = False  # left blank: the default
        if self.instance.pk:
            self.initial["access_groups"] = list(self.instance.access_groups.all())
            for tariff in Tariff.objects.current().filter(model=self.instance):
                key = price_key(tariff.tier, tariff.completion_window)
                if key in PRICE_FIELDS:
                    input_name, output_name = PRICE_FIELDS[key]
                    self.initial[input_name] = tariff.input_price
                    self.initial[output_name] = tariff.output_price

    def clean_max_model_calls(self) -> int:
        given = self.cleaned_data.get("max_model_calls")
        return given if given is not None else DeployedModel._meta.get_field("max_model_calls").default

    def price_changes(self) -> dict[str, tuple[Decimal, Decimal]]:
        """The tiers whose price was set or changed, with the new (input, output) price."""
        changes: dict[str, tuple[Decimal, Decimal]] = {}
        for tier, (input_name, output_name) in PRICE_FIELDS.items():
            new_input, new_output = self.cleaned_data.get(input_name), self.cleaned_data.get(output_name)
            if new_input is None and new_output is None:
                continue  # blank keeps whatever is in force
            old_input, old_output = self.initial.get(input_name), self.initial.get(output_name)
            new = (
                new_input if new_input is not None else (old_input or Decimal(0)),
                new_output if new_output is not None else (old_output or Decimal(0)),
            )
            if new != (old_input, old_output):
                changes[tier] = new
        return changes


for _window in settings.GATEWAY_BATCH_WINDOWS:
    # One pair of fields per completion window (from settings), declared on the form as the others are.
    for _name, _side in zip(PRICE_FIELDS[price_key(Tier.BATCH, _window)], ("input", "output"), strict=True):
        _field = _price_field(f"Batch {_window} {_side} price")
        _field.help_text = "Credits per 1M tokens. With none, a batch of this window pays flex, then real-time."
        DeployedModelForm.base_fields[_name] = DeployedModelForm.declared_fields[_name] = _field


class TariffInline(admin.TabularInline):
    """Price history, read-only: prices change through the fields above, which version them."""

    model = Tariff
    fields = ("tier", "completion_window", "input_price", "output_price", "valid_from", "valid_until")
    readonly_fields = fields
    ordering = ("tier", "completion_window", "-valid_from")
    extra = 0
    can_delete = False
    verbose_name_plural = "price history"

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class TrafficRuleInline(admin.TabularInline):
    model = TrafficRule
    fk_name = "model"
    fields = ("purpose", "action", "target")
    autocomplete_fields = ("target",)
    extra = 0


class DeletedFilter(admin.SimpleListFilter):
    title = "retired"
    parameter_name = "retired"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("no", "Live"), ("yes", "Retired")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[DeployedModel]) -> QuerySet[DeployedModel]:
        if self.value() == "yes":
            return queryset.filter(deleted_at__isnull=False)
        if self.value() == "no":
            return queryset.filter(deleted_at__isnull=True)
        return queryset


@admin.register(DeployedModel)
class DeployedModelAdmin(admin.ModelAdmin):
    form = DeployedModelForm
    list_display = ("alias", "upstream_model", "endpoint", "kind", "is_public", "prices", "is_retired")
    list_select_related = ("endpoint",)
    list_filter = ("kind", DeletedFilter, "endpoint")
    search_fields = ("alias", "upstream_model")
    autocomplete_fields = ("endpoint",)
    readonly_fields = ("created_at",)
    fieldsets = (
        (None, {"fields": ("alias", "upstream_model", "endpoint", "kind", "created_at", "deleted_at")}),
        (
            "Prices (credits per 1M tokens)",
            {
                "fields": tuple(PRICE_FIELDS.values()),
                "description": "Changing a price opens a new tariff version; past requests keep the price they had. "
                "A model with no positive price is free.",
            },
        ),
        ("Access", {"fields": ("access_groups",)}),
        (
            "Limits",
            {
                "fields": (
                    ("requests_per_second", "burst_size"),
                    "tokens_per_minute",
                    ("capacity", "flex_concurrency"),
                    "max_output_tokens",
                    "max_model_calls",
                ),
                "description": "Empty means no limit. A burst needs a rate. Tokens count input plus output.",
            },
        ),
    )
    inlines = (TariffInline, TrafficRuleInline)
    actions = ("retire", "restore")

    def get_queryset(self, request: HttpRequest) -> QuerySet[DeployedModel]:
        everyone = AccessGroup.models.through.objects.filter(
            deployedmodel_id=OuterRef("pk"), accessgroup__is_builtin=True
        )
        return (
            super()
            .get_queryset(request)
            .annotate(public=Exists(everyone))
            .prefetch_related(Prefetch("tariffs", queryset=Tariff.objects.current(), to_attr="current_tariffs"))
        )

    def has_delete_permission(self, request: HttpRequest, obj: DeployedModel | None = None) -> bool:
        return False  # retiring is the delete: the price history and past requests keep their model

    @admin.display(description="public", boolean=True, ordering="public")
    def is_public(self, model: DeployedModel) -> bool:
        return model.public  # type: ignore[attr-defined]

    @admin.display(description="retired", boolean=True, ordering="deleted_at")
    def is_retired(self, model: DeployedModel) -> bool:
        return model.deleted_at is not None

    @admin.display(description="price in / out")
    def prices(self, model: DeployedModel) -> str:
        tariffs = sorted(model.current_tariffs, key=lambda t: t.tier != Tier.REALTIME)  # type: ignore[attr-defined]
        shown = [
            f"{price_key(t.tier, t.completion_window)} {t.input_price.normalize():f} / {t.output_price.normalize():f}"
            for t in tariffs
            if t.is_paid
        ]
        return "; ".join(shown) or "free"

    def save_model(self, request: HttpRequest, obj: DeployedModel, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        for key, (input_price, output_price) in form.price_changes().items():
            tier, _, window = key.partition(":")
            try:
                set_tariff(obj, tier=tier, window=window, input_price=input_price, output_price=output_price)
            except ValueError as exc:
                self.message_user(request, f"The {key} price was not changed: {exc}", messages.ERROR)

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        set_model_groups(form.instance, form.cleaned_data["access_groups"])

    def save_formset(self, request: HttpRequest, form: Any, formset: Any, change: bool) -> None:
        if formset.model is not TrafficRule:
            super().save_formset(request, form, formset, change)
            return
        for rule in formset.save(commit=False):  # new and changed rules, written by the services
            save_rule(rule)
        for rule in formset.deleted_objects:
            delete_traffic_rule(rule)

    @admin.action(description="Retire the selected models", permissions=["change"])
    def retire(self, request: HttpRequest, queryset: QuerySet[DeployedModel]) -> None:
        retired = sum(retire_model(model) for model in queryset.filter(deleted_at__isnull=True))
        self.message_user(request, f"Retired {retired} model{'s' if retired != 1 else ''}.", messages.SUCCESS)

    @admin.action(description="Bring the selected models back", permissions=["change"])
    def restore(self, request: HttpRequest, queryset: QuerySet[DeployedModel]) -> None:
        restored = sum(restore_model(model) for model in queryset.filter(deleted_at__isnull=False))
        self.message_user(request, f"Restored {restored} model{'s' if restored != 1 else ''}.", messages.SUCCESS)


# --- history --------------------------------------------------------------------------------


@admin.register(InferenceRequest)
class InferenceRequestAdmin(LargeTableAdmin):  # a row per flex job, batch line, stored response
    list_display = (
        "public_id",
        "owner",
        "model_alias",
        "path",
        "service_tier",
        "background",
        "state",
        "attempts",
        "response_status",
        "cost",
        "created_at",
        "completed_at",
    )
    list_select_related = ("owner",)
    list_filter = ("service_tier", "state", "background")
    search_fields = ("owner__username", "model_alias", "custom_id")
    readonly_fields = ("public_id", "loop_steps")
    exclude = ("steps", "loop_state")
    actions = ("cancel",)

    @admin.display(description="steps of its loop")
    def loop_steps(self, job: InferenceRequest) -> str:
        """Each model call and tool call of a response with server tools, in order (gateway.loop)."""
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    step.get("kind"), step.get("name"), step.get("status") or "—", step.get("latency_ms", "—"),
                    f"{step.get('input_tokens')} / {step.get('output_tokens')}" if step.get("kind") == "model" else "",
                    step.get("error") or "",
                )
                for step in job.steps or []
            ),
        )  # fmt: skip
        if not rows:
            return "—"
        head = "<tr><th>kind</th><th>name</th><th>status</th><th>ms</th><th>tokens in / out</th><th>error</th></tr>"
        return format_html("<table>{}{}</table>", mark_safe(head), rows)  # noqa: S308  (a constant)

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        # Jobs are history, not editable, but an operator who may change them may stop them.
        return request.user.has_perm("gateway.change_inferencerequest")

    @admin.action(description="Cancel the selected unfinished jobs", permissions=["cancel"])
    def cancel(self, request: HttpRequest, queryset: InferenceRequestQuerySet) -> None:
        canceled = sum(cancel_job(job).state == JobState.CANCELED for job in queryset.unfinished())
        self.message_user(request, f"Canceled {canceled} job{'s' if canceled != 1 else ''}.", messages.SUCCESS)

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[InferenceRequest], search_term: str) -> Any:
        # Operators paste the id clients see: `resp_<hex>` (or the bare uuid).
        try:
            job_id = uuid.UUID(search_term.strip().removeprefix("resp_"))
        except ValueError:
            return super().get_search_results(request, queryset, search_term)
        return queryset.filter(id=job_id), False


@admin.register(StoredFile)
class StoredFileAdmin(ReadOnlyAdmin):
    list_display = ("public_id", "owner", "filename", "purpose", "bytes", "line_count", "created_at", "expires_at")
    list_select_related = ("owner",)
    list_filter = ("purpose",)
    search_fields = ("owner__username", "filename")
    readonly_fields = ("public_id",)

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[StoredFile], search_term: str) -> Any:
        # Operators paste the id clients see: `file-<hex>` (or the bare uuid).
        try:
            file_id = uuid.UUID(search_term.strip().removeprefix("file-"))
        except ValueError:
            return super().get_search_results(request, queryset, search_term)
        return queryset.filter(id=file_id), False


# Registered by importing: batches, the request log, tools; the usage page and the user and key pages with their spend.
from gateway import batch_admin, dashboard, request_log_admin, tool_admin  # noqa: E402, F401
