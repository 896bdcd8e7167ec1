"""The admin's form for a model with a write-only credential (gateway.models.EncryptedCredential):
endpoints and tools."""

from __future__ import annotations

from django import forms


class CredentialForm(forms.ModelForm):
    """The credential is never rendered (clear or encrypted) and is kept when left blank."""

    api_key = forms.CharField(
        label="Credential",
        required=False,
        max_length=500,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Write-only. Leave blank to keep the stored credential.",
    )
    clear_api_key = forms.BooleanField(label="Remove the stored credential", required=False)

    def credential(self) -> str | None:
        """What to do with the stored credential: replace it, remove it (""), or keep it (None: left blank)."""
        if self.cleaned_data.get("clear_api_key"):
            return ""
        return self.cleaned_data.get("api_key") or None
