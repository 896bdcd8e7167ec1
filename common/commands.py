"""What every management command shares: turning domain errors into clear `CommandError`s."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.apps import apps
from django.contrib.auth import get_user_model
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.core.management.base import CommandError


@contextmanager
def errors_as_command_errors() -> Iterator[None]:
    """Report a service's ValueError or ValidationError as a CommandError (exit status 1)."""
    try:
        yield
    except ValidationError as exc:
        raise CommandError(" ".join(validation_messages(exc))) from None
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def validation_messages(exc: ValidationError) -> list[str]:
    """The messages of a ValidationError, each named by its field: a generic "Ensure this value is
    greater than or equal to 0." says nothing on a command line without it."""
    if not hasattr(exc, "error_dict"):
        return exc.messages
    return [
        message if field == NON_FIELD_ERRORS else f"{field.replace('_', ' ').capitalize()}: {message}"
        for field, errors in exc.message_dict.items()
        for message in errors
    ]


def get_user(username: str) -> Any:
    user_model = get_user_model()
    try:
        return user_model.objects.get(username=username)
    except user_model.DoesNotExist:
        raise CommandError(f"User '{username}' does not exist.") from None


def get_api_key(username: str, name: str) -> Any:
    """The user's key with this name: the unrevoked one, or else a revoked one (callers say it is).

    Revoked keys keep their names for good, so only unrevoked keys can make a name ambiguous.
    """
    owner = get_user(username)
    keys = list(apps.get_model("accounts", "ApiKey").objects.filter(owner=owner, name=name).order_by("-created_at"))
    if not keys:
        raise CommandError(f"User '{username}' has no key named '{name}'.")
    unrevoked = [key for key in keys if key.revoked_at is None]
    if len(unrevoked) > 1:
        prefixes = ", ".join(f"{key.prefix}…" for key in unrevoked)
        raise CommandError(
            f"User '{username}' has {len(unrevoked)} keys named '{name}' ({prefixes}): rename all but one in the admin."
        )
    return unrevoked[0] if unrevoked else keys[0]


def get_model(alias: str, *, live: bool = False) -> Any:
    """The deployed model with this alias (any app's command may name one; looked up by label, not imported).

    With `live`, a retired model is refused too.
    """
    deployed_model = apps.get_model("gateway", "DeployedModel")
    try:
        model = deployed_model.objects.get(alias=alias)
    except deployed_model.DoesNotExist:
        raise CommandError(f"Model '{alias}' does not exist.") from None
    if live and model.deleted_at is not None:
        raise CommandError(f"Model '{alias}' is retired: bring it back in the admin first.")
    return model
