from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from common.commands import errors_as_command_errors
from gateway.models import Endpoint, ModelKind
from gateway.services import add_model


class Command(BaseCommand):
    help = "Deploy a model on an endpoint, with its prices (credits per 1M tokens) and group access."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("alias", help="The name clients send as `model`.")
        parser.add_argument("--endpoint", required=True, help="The name of an endpoint (see add_endpoint).")
        parser.add_argument("--upstream-model", help="The name the upstream knows it by (default: the alias).")
        parser.add_argument("--kind", default=ModelKind.CHAT, help="chat (default) or embeddings.")
        parser.add_argument("--input-price", help="Real-time credits per 1M input tokens.")
        parser.add_argument("--output-price", help="Real-time credits per 1M output tokens.")
        parser.add_argument("--flex-input-price", help="Flex credits per 1M input tokens (default: real-time).")
        parser.add_argument("--flex-output-price", help="Flex credits per 1M output tokens (default: real-time).")
        parser.add_argument(
            "--batch-input-price", help="Batch credits per 1M input tokens (default: flex, then real-time)."
        )
        parser.add_argument(
            "--batch-output-price", help="Batch credits per 1M output tokens (default: flex, then real-time)."
        )
        parser.add_argument(
            "--batch-window",
            action="append",
            dest="batch_windows",
            help="The completion window the batch price is for (repeatable; default: every window).",
        )
        parser.add_argument("--public", action="store_true", help="Attach it to Everyone.")
        parser.add_argument(
            "--group", action="append", default=[], dest="groups", help="Attach it to a group (repeatable)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        endpoint = get_endpoint(options["endpoint"])
        with errors_as_command_errors():
            model = add_model(
                options["alias"],
                endpoint=endpoint,
                upstream_model=options["upstream_model"],
                kind=options["kind"],
                input_price=options["input_price"],
                output_price=options["output_price"],
                flex_input_price=options["flex_input_price"],
                flex_output_price=options["flex_output_price"],
                batch_input_price=options["batch_input_price"],
                batch_output_price=options["batch_output_price"],
                batch_windows=options["batch_windows"],
                public=options["public"],
                groups=options["groups"],
            )
        self.stdout.write(f"Created model '{model.alias}' ({model.kind}) → {model.upstream_model} on '{endpoint.name}'")


def get_endpoint(name: str) -> Endpoint:
    try:
        return Endpoint.objects.get(name=name)
    except Endpoint.DoesNotExist:
        known = ", ".join(Endpoint.objects.values_list("name", flat=True)) or "none yet; add one with add_endpoint"
        raise CommandError(f"Endpoint '{name}' does not exist (known endpoints: {known}).") from None
