from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from billing.models import Balance
from billing.services import grant_credits, parse_amount
from common.commands import errors_as_command_errors, get_user
from common.numbers import plain_decimal


class Command(BaseCommand):
    help = "Add credits to a user's balance (an admin grant in the ledger)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("amount")
        parser.add_argument("--description", default="")

    def handle(self, *args: Any, **options: Any) -> None:
        user = get_user(options["username"])
        with errors_as_command_errors():
            amount = parse_amount(options["amount"])
            grant_credits(user, amount, description=options["description"])
        self.stdout.write(f"Granted {plain_decimal(amount)} credits to '{user.username}'; balance is now:")
        self.stdout.write(plain_decimal(Balance.objects.amount_of(user)))
