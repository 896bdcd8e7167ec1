from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, register


@register("dwctl")
def check_environment(app_configs, **kwargs):  # type: ignore[no-untyped-def]
    """Report every bad environment variable found while reading the settings."""
    return [Error(message, id=f"dwctl.E{index:03d}") for index, message in enumerate(settings.ENV_ERRORS, start=1)]
