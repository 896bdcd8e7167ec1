from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from common.commands import errors_as_command_errors, get_model
from routing_rules.services import add_traffic_rule


class Command(BaseCommand):
    help = "Deny a model to keys of one purpose, or redirect their calls to another model."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("alias", help="The model the rule applies to.")
        parser.add_argument("purpose", help="realtime, batch, playground or platform.")
        parser.add_argument("action", help="deny or redirect.")
        parser.add_argument("--target", help="The model to serve instead (redirect only).")

    def handle(self, *args: Any, **options: Any) -> None:
        model = get_model(options["alias"])
        target = get_model(options["target"]) if options["target"] else None
        with errors_as_command_errors():
            rule = add_traffic_rule(model, purpose=options["purpose"], action=options["action"], target=target)
        self.stdout.write(f"Added rule: {rule}")
