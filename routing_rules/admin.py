from __future__ import annotations

from django.contrib import admin

from routing_rules.models import TrafficRule


@admin.register(TrafficRule)
class TrafficRuleAdmin(admin.ModelAdmin):
    """Validation is the model's: `TrafficRule.clean` and its constraints run on every save."""

    list_display = ("model", "purpose", "action", "target", "created_at")
    list_select_related = ("model", "target")
    list_filter = ("action", "purpose")
    search_fields = ("model__alias", "target__alias")
    autocomplete_fields = ("model", "target")
