"""System checks that need the database: stored upstream credentials the configured keys cannot read."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, Tags, register
from django.db import DatabaseError

from gateway.models import Endpoint, UnreadableCredentials, decrypt_credentials


@register(Tags.database)
def check_credentials(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list[Error]:
    """Name every endpoint whose credential no key of GATEWAY_ENCRYPTION_KEYS decrypts.

    Runs where Django passes databases (`migrate`, `check --database default`) and at the gateway's
    start (`gateway.handler.lifespan`), so a wrong or dropped key stops a deployment before a request.
    """
    if not databases or not settings.GATEWAY_ENCRYPTION_KEYS:
        return []  # no key at all is reported by dwctl_site.checks, naming the variable
    errors = []
    for alias in databases:
        try:
            decrypt_credentials(Endpoint.objects.using(alias).exclude(api_key_encrypted=""))
        except UnreadableCredentials as exc:
            errors.append(Error(str(exc), id="gateway.E001"))
        except DatabaseError:
            pass  # not migrated yet (migrate checks first) or unreachable: the snapshot build reports it
    return errors
