"""What every management command shares: turning domain errors into clear `CommandError`s."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.core.management.base import CommandError

from accounts.models import User
from billing.models import Balance
from gateway.models import DeployedModel, Endpoint


@contextmanager
def errors_as_command_errors() -> Iterator[None]:
    """Report a service's ValueError or ValidationError as a CommandError (exit status 1)."""
    try:
        yield
    except ValidationError as exc:
        raise CommandError(" ".join(exc.messages)) from None
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def get_user(username: str) -> User:
    try:
        return User.objects.get(username=username)
    except User.DoesNotExist:
        raise CommandError(f"User '{username}' does not exist.") from None


def get_endpoint(name: str) -> Endpoint:
    try:
        return Endpoint.objects.get(name=name)
    except Endpoint.DoesNotExist:
        known = ", ".join(Endpoint.objects.values_list("name", flat=True)) or "none yet; add one with add_endpoint"
        raise CommandError(f"Endpoint '{name}' does not exist (known endpoints: {known}).") from None


def get_model(alias: str) -> DeployedModel:
    try:
        return DeployedModel.objects.get(alias=alias)
    except DeployedModel.DoesNotExist:
        raise CommandError(f"Model '{alias}' does not exist.") from None


def plain_decimal(value: Decimal) -> str:
    """`100`, `99.999965`, `-0.5`: no exponent, no trailing zeros."""
    text = format(value.normalize(), "f")
    return "0" if text in {"-0", "0"} else text


def balance_of(user: User) -> Decimal:
    return Balance.objects.filter(user=user).values_list("amount", flat=True).first() or Decimal(0)
