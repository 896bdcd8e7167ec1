from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from billing.models import Balance
from billing.services import parse_amount, remove_credits
from common.commands import errors_as_command_errors, get_user
from common.numbers import plain_decimal


class Command(BaseCommand):
    help = "Take credits from a user's balance (an admin removal in the ledger). The balance may go negative."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("amount")
        parser.add_argument("--description", default="")

    def handle(self, *args: Any, **options: Any) -> None:
        user = get_user(options["username"])
        with errors_as_command_errors():
            amount = parse_amount(options["amount"])
            remove_credits(user, amount, description=options["description"])
        self.stdout.write(f"Removed {plain_decimal(amount)} credits from '{user.username}'; balance is now:")
        self.stdout.write(plain_decimal(Balance.objects.amount_of(user)))
