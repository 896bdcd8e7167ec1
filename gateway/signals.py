"""Cache invalidation only: any change to the data behind the auth snapshot moves its version, and
every committed balance reaches credit admission."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.db import transaction
from django.db.models.signals import m2m_changed, post_delete, post_save

from accounts.models import AccessGroup, ApiKey, User
from billing.models import Balance, Tariff
from billing.signals import balance_changed
from gateway.models import DeployedModel, Endpoint, Tool
from routing_rules.models import TrafficRule


def _changed(**kwargs) -> None:  # type: ignore[no-untyped-def]
    from gateway.snapshot import mark_changed

    transaction.on_commit(mark_changed)


for model in (ApiKey, AccessGroup, User, DeployedModel, Endpoint, Tariff, TrafficRule, Tool):
    post_save.connect(_changed, sender=model, dispatch_uid=f"snapshot-save-{model.__name__}")
    post_delete.connect(_changed, sender=model, dispatch_uid=f"snapshot-delete-{model.__name__}")
for through in (AccessGroup.members.through, AccessGroup.models.through, Tool.models.through, Tool.groups.through):
    m2m_changed.connect(_changed, sender=through, dispatch_uid=f"snapshot-m2m-{through.__name__}")


def _balance_changed(*, user_id: int, version: int, amount: Decimal, **kwargs: Any) -> None:
    from gateway.budget import balance_seen, to_nanos

    balance_seen(user_id, version, to_nanos(amount))


balance_changed.connect(_balance_changed, sender=Balance, dispatch_uid="budget-balance")
