from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from billing.models import Balance
from common.commands import get_user
from common.numbers import plain_decimal


class Command(BaseCommand):
    help = "Print a user's balance, in credits, as a plain decimal on the last line."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")

    def handle(self, *args: Any, **options: Any) -> None:
        user = get_user(options["username"])
        self.stdout.write(plain_decimal(Balance.objects.amount_of(user)))
