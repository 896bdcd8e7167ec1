from __future__ import annotations

from typing import Any

import orjson
from django.core.management.base import BaseCommand, CommandError, CommandParser

from common.commands import errors_as_command_errors
from gateway.services import add_tool


class Command(BaseCommand):
    help = (
        "Register a server tool the gateway runs itself (or update the one with this name): offered on "
        "/v1/responses calls of its models by callers in its groups."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="The function name the model calls.")
        parser.add_argument("url", help="Where the gateway POSTs the call's arguments (a JSON object).")
        parser.add_argument("--description", required=True, help="What the tool does, as the model reads it.")
        parser.add_argument(
            "--parameters", required=True, help='The JSON schema of its arguments, e.g. \'{"type": "object", ...}\'.'
        )
        parser.add_argument("--api-key", help="The tool's credential, sent as a bearer token (stored, never printed).")
        parser.add_argument("--timeout", type=int, help="Seconds the gateway waits for the tool (default 30).")
        parser.add_argument(
            "--model", action="append", default=[], dest="models", help="Offer it on this model (repeatable)."
        )
        parser.add_argument(
            "--group", action="append", default=[], dest="groups", help="Offer it to this group (repeatable)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            parameters = orjson.loads(options["parameters"])
        except orjson.JSONDecodeError as exc:
            raise CommandError(f"--parameters is not valid JSON: {exc}.") from None
        with errors_as_command_errors():
            tool, created = add_tool(
                options["name"],
                options["url"],
                description=options["description"],
                parameters=parameters,
                api_key=options["api_key"],
                timeout_seconds=options["timeout"],
                models=options["models"],
                groups=options["groups"],
            )
        models = ", ".join(tool.models.values_list("alias", flat=True)) or "no model yet"
        groups = ", ".join(tool.groups.values_list("name", flat=True)) or "no group yet"
        self.stdout.write(f"{'Created' if created else 'Updated'} tool '{tool.name}' → {tool.url} ({models}; {groups})")
