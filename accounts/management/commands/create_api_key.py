from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from accounts.models import Purpose
from accounts.services import create_api_key
from common.commands import errors_as_command_errors, get_user


class Command(BaseCommand):
    help = "Create an API key for a user. The secret is the last line of the output and is never shown again."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument(
            "--purpose", default=Purpose.REALTIME, help="realtime (default), batch, playground or platform."
        )
        parser.add_argument("--name", default="")

    def handle(self, *args: Any, **options: Any) -> None:
        owner = get_user(options["username"])
        with errors_as_command_errors():
            api_key, secret = create_api_key(owner, name=options["name"], purpose=options["purpose"])
        self.stdout.write(
            f"Created {api_key.purpose} key {api_key.prefix}… for '{owner.username}'. Store the secret now:"
        )
        self.stdout.write(secret)
