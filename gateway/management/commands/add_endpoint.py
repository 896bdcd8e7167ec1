from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.validators import URLValidator

from common.commands import errors_as_command_errors
from gateway.models import ResponsesApi
from gateway.services import add_endpoint


class Command(BaseCommand):
    help = "Add an upstream endpoint, or update the one with this name."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("base_url", help="Up to and including /v1, e.g. https://api.openai.com/v1")
        parser.add_argument("--api-key", help="The upstream credential (stored, never printed).")
        parser.add_argument("--timeout", type=int, help="Whole upstream call, in seconds.")
        parser.add_argument(
            "--responses",
            choices=ResponsesApi.values,
            help="How /v1/responses is served: the upstream's own (native, the default) or translated to its "
            "/chat/completions (translate).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            URLValidator(schemes=["http", "https"])(options["base_url"])
        except ValidationError:
            raise CommandError(
                f"'{options['base_url']}' is not a valid base URL: use http(s)://host[:port]/v1."
            ) from None
        with errors_as_command_errors():
            endpoint, created = add_endpoint(
                options["name"],
                options["base_url"],
                api_key=options["api_key"],
                timeout_seconds=options["timeout"],
                responses_api=options["responses"],
            )
        verb = "Created" if created else "Updated"
        translated = " (/responses translated to /chat/completions)" if endpoint.responses_api == "translate" else ""
        self.stdout.write(f"{verb} endpoint '{endpoint.name}' → {endpoint.base_url}{translated}")
