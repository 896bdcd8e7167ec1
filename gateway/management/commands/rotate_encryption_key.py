from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from common.commands import errors_as_command_errors
from gateway.services import rotate_credentials


class Command(BaseCommand):
    help = (
        "Re-encrypt every stored upstream credential with the first key of GATEWAY_ENCRYPTION_KEYS, "
        "so the keys after it can be dropped."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        with errors_as_command_errors():
            rotated = rotate_credentials()
        self.stdout.write(
            f"Re-encrypted {rotated} upstream credential{'s' if rotated != 1 else ''} with the first key: "
            "the keys after it can be dropped from GATEWAY_ENCRYPTION_KEYS."
        )
