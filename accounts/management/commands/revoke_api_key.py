from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.services import revoke_api_key
from common.commands import get_api_key


class Command(BaseCommand):
    help = "Revoke a user's API key, named by its name; every gateway process refuses it within a moment."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("key_name", metavar="keyname", help="The key's name (see the admin).")

    def handle(self, *args: Any, **options: Any) -> None:
        api_key = get_api_key(options["username"], options["key_name"])
        described = f"key '{api_key.name}' ({api_key.prefix}…) of '{options['username']}'"
        if api_key.is_revoked:
            # Not a silent success: the operator may have meant another key, and nothing was done.
            revoked_at = api_key.revoked_at.isoformat(" ", "seconds")
            raise CommandError(f"The {described} was already revoked at {revoked_at}.")
        revoke_api_key(api_key)
        self.stdout.write(f"Revoked the {described}.")
