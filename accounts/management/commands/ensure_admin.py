from __future__ import annotations

import os
import secrets
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from accounts.models import User
from accounts.services import create_user
from common.commands import errors_as_command_errors


class Command(BaseCommand):
    help = "Create a superuser if there is none (password from ADMIN_PASSWORD, or generated and printed once)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--username", default="admin")

    def handle(self, *args: Any, **options: Any) -> None:
        existing = User.objects.filter(is_superuser=True).order_by("pk").first()
        if existing is not None:
            self.stdout.write(f"Superuser '{existing.username}' already exists; nothing to do.")
            return
        username = options["username"]
        password = os.environ.get("ADMIN_PASSWORD", "")
        with errors_as_command_errors():
            create_user(username, password=password or (generated := secrets.token_urlsafe(18)), is_superuser=True)
        if password:
            self.stdout.write(f"Created admin user '{username}' with the password from ADMIN_PASSWORD.")
        else:
            self.stdout.write(f"Created admin user '{username}' with password: {generated}")
