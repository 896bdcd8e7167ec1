from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.models import KEY_LIMITS, ApiKey
from accounts.services import set_key_limits
from common.commands import errors_as_command_errors, get_api_key, get_model
from common.numbers import plain_decimal
from gateway.models import MODEL_LIMITS, DeployedModel
from gateway.services import set_model_limits

COUNTS = {
    "requests_per_second": "Calls per second, on average.",
    "burst_size": "Calls allowed at once (default: the rate; needs a rate).",
    "tokens_per_minute": "Input plus output tokens per rolling minute.",
}


class Command(BaseCommand):
    help = (
        "Change the limits of an API key or a model. Only the given limits change; --clear removes "
        "every limit first (a model's flex concurrency goes back to its default)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        targets = parser.add_subparsers(dest="target", required=True, metavar="key|model")
        key = targets.add_parser("key", help="The limits of one user's key.")
        key.add_argument("username")
        key.add_argument("key_name", metavar="keyname", help="The key's name (see the admin).")
        add_counts(key, COUNTS)
        key.add_argument(
            "--spend-limit", metavar="AMOUNT", help="Credits per spend window (needs --spend-window, or a window set)."
        )
        key.add_argument("--spend-window", metavar="day|week|month", help="A UTC calendar window.")
        key.add_argument("--clear", action="store_true", help="Remove every limit, then set the given ones.")

        model = targets.add_parser("model", help="The limits of a deployed model.")
        model.add_argument("alias")
        add_counts(
            model,
            {
                **COUNTS,
                "capacity": "Concurrent real-time calls.",
                "flex_concurrency": "Concurrent queued (flex) calls.",
                "max_output_tokens": "Output reserved for a call that sets no bound.",
            },
        )
        model.add_argument(
            "--clear", action="store_true", help="Remove every limit (flex concurrency: its default), then set these."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["target"] == "key":
            api_key = get_api_key(options["username"], options["key_name"])
            limits = given(options, KEY_LIMITS)
            if not limits and not options["clear"]:
                raise CommandError("Nothing to change: give a limit, or --clear.")
            with errors_as_command_errors():
                set_key_limits(api_key, clear=options["clear"], **limits)
            self.stdout.write(f"Set the limits of key '{api_key.name}' ({api_key.prefix}…) of '{options['username']}':")
            self.stdout.write(describe_key(api_key))
        else:
            model = get_model(options["alias"], live=True)
            limits = given(options, MODEL_LIMITS)
            if not limits and not options["clear"]:
                raise CommandError("Nothing to change: give a limit, or --clear.")
            with errors_as_command_errors():
                set_model_limits(model, clear=options["clear"], **limits)
            self.stdout.write(f"Set the limits of model '{model.alias}':")
            self.stdout.write(describe_model(model))


def add_counts(parser: CommandParser, counts: dict[str, str]) -> None:
    for name, help_text in counts.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, metavar="N", help=help_text)


def given(options: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    return {name: options[name] for name in fields if options.get(name) is not None}


def describe_key(api_key: ApiKey) -> str:
    spend = (
        f"{plain_decimal(api_key.spend_limit)} credits per {api_key.spend_window}"
        if api_key.spend_limit is not None
        else "none"
    )
    return ", ".join([*counts_of(api_key, COUNTS), f"spend limit {spend}"])


def describe_model(model: DeployedModel) -> str:
    return ", ".join(counts_of(model, MODEL_LIMITS))


def counts_of(row: Any, fields: Any) -> list[str]:
    return [f"{name.replace('_', ' ')} {getattr(row, name) or 'none'}" for name in fields]
