from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from billing.services import grant_credits, parse_amount
from dwctl_site.cli import balance_of, errors_as_command_errors, get_user, plain_decimal


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
        self.stdout.write(plain_decimal(balance_of(user)))
