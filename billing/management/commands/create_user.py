from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from billing.services import create_user, parse_amount
from common.commands import errors_as_command_errors


class Command(BaseCommand):
    help = "Create a user, optionally with starting credits and group memberships, all or nothing."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--credits", help="Starting credits.")
        parser.add_argument("--group", action="append", default=[], dest="groups", help="Add to a group (repeatable).")
        parser.add_argument("--staff", action="store_true", help="May log into the admin.")
        parser.add_argument("--superuser", action="store_true", help="Has every permission (implies --staff).")
        parser.add_argument("--email", default="")
        parser.add_argument("--password", help="Without it the user cannot log into the admin.")

    def handle(self, *args: Any, **options: Any) -> None:
        with errors_as_command_errors():
            credits = parse_amount(options["credits"]) if options["credits"] is not None else None
            user = create_user(
                options["username"],
                email=options["email"],
                password=options["password"],
                credits=credits,
                groups=options["groups"],
                is_staff=options["staff"],
                is_superuser=options["superuser"],
            )
        extras = []
        if credits:
            extras.append(f"{credits} credits")
        if options["groups"]:
            extras.append("groups: " + ", ".join(options["groups"]))
        suffix = f" ({'; '.join(extras)})" if extras else ""
        self.stdout.write(f"Created user '{user.username}'{suffix}")
