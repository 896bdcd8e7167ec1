from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from billing.models import Balance
from common.commands import errors_as_command_errors
from gateway.services import DEMO_ALIAS, DEMO_USER, set_up_demo

CURL = """curl --fail-with-body -sS {url}/ai/v1/chat/completions \\
  -H "Authorization: Bearer {secret}" -H "Content-Type: application/json" \\
  -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello, gateway!"}}]}}'"""

PYTHON = """.venv/bin/pip install openai   # once
.venv/bin/python - <<'EOF'
from openai import OpenAI

client = OpenAI(base_url="{url}/ai/v1", api_key="{secret}")
stream = client.chat.completions.create(
    model="{model}", messages=[{{"role": "user", "content": "Hello, gateway!"}}], stream=True
)
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
EOF"""


class Command(BaseCommand):
    help = (
        "Set up a demo served by the gateway itself: an echo model that streams and costs credits, a user with "
        "credits and a new API key (earlier demo keys are revoked); prints a curl and a Python snippet to try it."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--url", default="http://127.0.0.1:8000", help="The gateway's own URL, as its clients reach it."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        url = options["url"].rstrip("/")
        with errors_as_command_errors():
            user, secret = set_up_demo(url)
        balance = Balance.objects.filter(user=user).values_list("amount", flat=True).first() or Decimal(0)
        fields = {"url": url, "secret": secret, "model": DEMO_ALIAS}
        self.stdout.write(
            f"Demo ready: model '{DEMO_ALIAS}' on the gateway's own echo upstream ({url}/demo/v1), user "
            f"'{DEMO_USER}' with {balance.normalize():f} credits, and a new API key (run this again for another; "
            "earlier demo keys are revoked).\n\nTry it with curl:\n\n"
        )
        self.stdout.write(CURL.format(**fields) + "\n\nor with the openai client (a stream):\n\n")
        self.stdout.write(PYTHON.format(**fields) + "\n\n")
        self.stdout.write(f"Then see the call, its tokens and its cost at {url}/admin/gateway/requestlog/\n")
