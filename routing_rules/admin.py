from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from routing_rules.models import TrafficRule
from routing_rules.services import add_traffic_rule, delete_traffic_rule, update_traffic_rule


def save_rule(rule: TrafficRule) -> None:
    """Write a rule an admin form filled in through the services (the model and inline forms alike)."""
    if rule.pk is not None:
        update_traffic_rule(rule, purpose=rule.purpose, action=rule.action, target=rule.target)
        return
    saved = add_traffic_rule(rule.model, purpose=rule.purpose, action=rule.action, target=rule.target)
    # The admin goes on with `rule` (log entry, redirect): make it the saved row.
    rule.pk, rule.created_at = saved.pk, saved.created_at
    rule._state.adding, rule._state.db = False, saved._state.db


@admin.register(TrafficRule)
class TrafficRuleAdmin(admin.ModelAdmin):
    """Validation is the model's (`TrafficRule.clean`, shown on the form); writes go through the services."""

    list_display = ("model", "purpose", "action", "target", "created_at")
    list_select_related = ("model", "target")
    list_filter = ("action", "purpose")
    search_fields = ("model__alias", "target__alias")
    autocomplete_fields = ("model", "target")

    def save_model(self, request: HttpRequest, obj: TrafficRule, form: Any, change: bool) -> None:
        save_rule(obj)

    def delete_model(self, request: HttpRequest, obj: TrafficRule) -> None:
        delete_traffic_rule(obj)

    def delete_queryset(self, request: HttpRequest, queryset: Any) -> None:
        for rule in queryset:
            delete_traffic_rule(rule)
