"""The admin of server tools (gateway.tools): staff set their URLs; their credential is write-only."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.contrib.admin.widgets import FilteredSelectMultiple

from accounts.models import EVERYONE, AccessGroup
from gateway.credential_form import CredentialForm
from gateway.models import DeployedModel, Tool
from gateway.services import tool_parameters_error


class ToolForm(CredentialForm):
    """The credential (sent as a bearer token) is never rendered and is kept when left blank."""

    url = forms.URLField(
        max_length=500, assume_scheme="https", help_text="The gateway POSTs the call's arguments here."
    )
    models = forms.ModelMultipleChoiceField(
        queryset=DeployedModel.objects.live(),
        required=False,
        widget=FilteredSelectMultiple("models", is_stacked=False),
        help_text="Offered on /v1/responses calls of these models…",
    )
    groups = forms.ModelMultipleChoiceField(
        queryset=AccessGroup.objects.all(),
        required=False,
        widget=FilteredSelectMultiple("access groups", is_stacked=False),
        help_text=f"…by callers in one of these groups ('{EVERYONE}': every caller).",
    )

    class Meta:
        model = Tool
        fields = ("name", "description", "parameters", "url", "api_key", "clear_api_key", "timeout_seconds")

    def clean_parameters(self) -> Any:
        parameters = self.cleaned_data.get("parameters")
        problem = tool_parameters_error(parameters)
        if problem:
            raise forms.ValidationError(problem)
        return parameters

    def save(self, commit: bool = True) -> Tool:
        credential = self.credential()
        if credential is not None:
            self.instance.set_credential(credential)
        return super().save(commit)


@admin.register(Tool)
class ToolAdmin(admin.ModelAdmin):
    form = ToolForm
    list_display = ("name", "url", "has_credential", "timeout_seconds")
    search_fields = ("name", "url", "description")
    fields = (
        "name",
        "description",
        "parameters",
        "url",
        "api_key",
        "clear_api_key",
        "timeout_seconds",
        "models",
        "groups",
    )

    @admin.display(description="credential", boolean=True)
    def has_credential(self, tool: Tool) -> bool:
        return tool.has_credential
