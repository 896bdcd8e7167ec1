"""What every management command shares: turning domain errors into clear `CommandError`s."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.apps import apps
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import CommandError


@contextmanager
def errors_as_command_errors() -> Iterator[None]:
    """Report a service's ValueError or ValidationError as a CommandError (exit status 1)."""
    try:
        yield
    except ValidationError as exc:
        raise CommandError(" ".join(exc.messages)) from None
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def get_user(username: str) -> Any:
    user_model = get_user_model()
    try:
        return user_model.objects.get(username=username)
    except user_model.DoesNotExist:
        raise CommandError(f"User '{username}' does not exist.") from None


def get_model(alias: str) -> Any:
    """The deployed model with this alias (any app's command may name one; looked up by label, not imported)."""
    deployed_model = apps.get_model("gateway", "DeployedModel")
    try:
        return deployed_model.objects.get(alias=alias)
    except deployed_model.DoesNotExist:
        raise CommandError(f"Model '{alias}' does not exist.") from None
