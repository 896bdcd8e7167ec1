from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts import services as accounts
from accounts.models import User
from billing.models import (
    CREDITING_KINDS,
    Balance,
    CreditTransaction,
    Tariff,
    Tier,
    TransactionKind,
    price_key,
    price_keys,
    price_tokens,
)
from billing.signals import balance_changed
from common.bulk import insert_rows
from common.numbers import parse_amount


def _post(
    user: User,
    kind: str,
    amount: Decimal,
    *,
    source_id: str,
    description: str = "",
    tier: str = "",
    created_by: User | None = None,
) -> CreditTransaction | None:
    """Insert one ledger row and move the balance with it. Returns None when the source was already posted.

    Caller holds an open transaction.
    """
    if CreditTransaction.objects.filter(source_id=source_id).exists():
        return None
    balance, _ = Balance.objects.select_for_update().get_or_create(user=user)
    try:
        with transaction.atomic():
            entry = CreditTransaction.objects.create(
                user=user,
                kind=kind,
                amount=amount,
                source_id=source_id,
                description=description[:500],
                tier=tier,
                created_by=created_by,
            )
    except IntegrityError:
        # A concurrent post of the same source won the race: nothing more to do.
        if CreditTransaction.objects.filter(source_id=source_id).exists():
            return None
        raise
    _move(balance, amount if kind in CREDITING_KINDS else -amount)
    return entry


def _move(balance: Balance, delta: Decimal) -> None:
    """Apply a ledger change to a locked balance; announce it on commit."""
    balance.amount += delta
    balance.version += 1
    balance.updated_at = timezone.now()
    balance.save(update_fields=["amount", "version", "updated_at"])
    user_id, version, amount = balance.user_id, balance.version, balance.amount
    transaction.on_commit(lambda: balance_changed.send(sender=Balance, user_id=user_id, version=version, amount=amount))


@transaction.atomic
def grant_credits(
    user: User,
    amount: Decimal | str | int,
    *,
    description: str = "",
    source_id: str | None = None,
    created_by: User | None = None,
    kind: str = TransactionKind.ADMIN_GRANT,
) -> CreditTransaction | None:
    """Add credits to a user's balance (an admin grant unless `kind` says purchase)."""
    if kind not in CREDITING_KINDS:
        raise ValueError(f"{kind!r} does not add credits.")
    return _post(
        user,
        kind,
        parse_amount(amount),
        source_id=source_id or f"{kind}:{uuid.uuid4()}",
        description=description,
        created_by=created_by,
    )


@transaction.atomic
def remove_credits(
    user: User,
    amount: Decimal | str | int,
    *,
    description: str = "",
    source_id: str | None = None,
    created_by: User | None = None,
) -> CreditTransaction | None:
    """Take credits from a user's balance. The balance may go negative."""
    return _post(
        user,
        TransactionKind.ADMIN_REMOVAL,
        parse_amount(amount),
        source_id=source_id or f"admin_removal:{uuid.uuid4()}",
        description=description,
        created_by=created_by,
    )


@transaction.atomic
def create_user(username: str, *, credits: Decimal | str | int | None = None, **fields: Any) -> User:
    """Create a user (as `accounts.services.create_user`) with an opening balance, all or nothing."""
    user = accounts.create_user(username, **fields)
    if credits:
        grant_credits(user, credits, description="Initial credits")
    return user


@dataclass(frozen=True)
class Usage:
    user_id: int
    source_id: str
    model_alias: str
    tier: str
    input_tokens: int
    output_tokens: int
    cost: Decimal


def charge_usage(usage: Usage) -> CreditTransaction | None:
    """Charge one request's cost. Idempotent: a second call with the same source changes nothing."""
    with transaction.atomic():
        charged = charge_usages([usage])
        return CreditTransaction.objects.get(source_id=charged[0]) if charged else None


@transaction.atomic
def charge_usages(usages: list[Usage]) -> list[str]:
    """Charge many requests in one transaction: one ledger row per new source, one balance write per user.

    Sources already in the ledger and zero costs are skipped, so replaying a batch charges nothing twice.
    Returns the sources charged now.
    """
    wanted = {usage.source_id: usage for usage in usages if usage.cost > 0}
    if not wanted:
        return []
    user_ids = sorted({usage.user_id for usage in wanted.values()})
    # Lock balances in a fixed order so concurrent batches cannot deadlock.
    for user_id in user_ids:
        Balance.objects.get_or_create(user_id=user_id)
    balances = {
        b.user_id: b for b in Balance.objects.select_for_update().filter(user_id__in=user_ids).order_by("user_id")
    }
    # Only under the locks: a concurrent batch with the same sources has committed by now, and is seen.
    seen = set(CreditTransaction.objects.filter(source_id__in=list(wanted)).values_list("source_id", flat=True))
    fresh = [usage for source, usage in wanted.items() if source not in seen]
    if not fresh:
        return []
    by_user: dict[int, Decimal] = {}
    for usage in fresh:
        by_user[usage.user_id] = by_user.get(usage.user_id, Decimal(0)) + usage.cost
    now = timezone.now()
    insert_rows(
        CreditTransaction,
        ("user_id", "kind", "amount", "source_id", "description", "tier", "created_at"),
        [
            (
                usage.user_id,
                TransactionKind.USAGE,
                usage.cost,
                usage.source_id,
                f"{usage.model_alias}: {usage.input_tokens} in / {usage.output_tokens} out"[:500],
                usage.tier,
                now,
            )
            for usage in fresh
        ],
    )
    for user_id, total in by_user.items():
        _move(balances[user_id], -total)
    return [usage.source_id for usage in fresh]


acharge_usage = sync_to_async(charge_usage)


def select_tariff(tariffs: Iterable[Tariff], tier: str, at: datetime, window: str = "") -> Tariff | None:
    """Pick, from one model's tariffs, the one in force for a tier (a batch: and window) at a time.

    A batch window with no price of its own falls back to flex, flex to realtime.
    """
    in_force = {
        (t.tier, t.completion_window): t
        for t in tariffs
        if t.valid_from <= at and (t.valid_until is None or t.valid_until > at)
    }
    chain: list[tuple[str, str]]
    if tier == Tier.BATCH:
        chain = [(Tier.BATCH, window), (Tier.FLEX, ""), (Tier.REALTIME, "")]
    elif tier == Tier.FLEX:
        chain = [(Tier.FLEX, ""), (Tier.REALTIME, "")]
    else:
        chain = [(tier, "")]
    return next((in_force[key] for key in chain if key in in_force), None)


def paid_tiers(tariffs: Iterable[Tariff], at: datetime) -> frozenset[str]:
    """The price keys (billing.models.price_key) at which one model's calls cost something at a time:
    the one "is it paid" rule."""
    versions = list(tariffs)
    return frozenset(
        price_key(tier, window)
        for tier, window in price_keys()
        if (tariff := select_tariff(versions, tier, at, window)) is not None and tariff.is_paid
    )


def prices_at(tariffs: Iterable[Tariff], at: datetime) -> dict[str, tuple[Decimal, Decimal]]:
    """One model's (input, output) prices per price key at a time, for the keys that have one."""
    versions = list(tariffs)
    return {
        price_key(tier, window): (tariff.input_price, tariff.output_price)
        for tier, window in price_keys()
        if (tariff := select_tariff(versions, tier, at, window)) is not None
    }


def tariff_for(model_id: int, tier: str, *, at: datetime | None = None, window: str = "") -> Tariff | None:
    """Return the tariff in force for a model and tier (and batch window) at a time, with the fallbacks."""
    at = at or timezone.now()
    return select_tariff(Tariff.objects.active_at(at).filter(model_id=model_id), tier, at, window)


def cost_of(tariff: Tariff | None, input_tokens: int, output_tokens: int) -> Decimal:
    if tariff is None:
        return Decimal(0)
    return price_tokens(tariff.input_price, tariff.output_price, input_tokens, output_tokens)


@transaction.atomic
def set_tariff(
    model,  # type: ignore[no-untyped-def]
    *,
    input_price: Decimal | str | int,
    output_price: Decimal | str | int,
    tier: str = Tier.REALTIME,
    window: str = "",
    at: datetime | None = None,
) -> Tariff:
    """Open a new price for a model and tier (a batch price: for one completion window), closing the
    one in force, so past requests keep their price."""
    if tier not in Tier.values:
        raise ValueError(f"Unknown tier {tier!r}: use one of {', '.join(Tier.values)}.")
    if tier == Tier.BATCH and window not in settings.GATEWAY_BATCH_WINDOWS:
        raise ValueError(
            f"Unknown completion window {window!r}: use one of {', '.join(settings.GATEWAY_BATCH_WINDOWS)}."
        )
    if tier != Tier.BATCH and window:
        raise ValueError("Only a batch price has a completion window.")
    prices = []
    for label, raw in (("input", input_price), ("output", output_price)):
        try:
            price = Decimal(str(raw))
        except InvalidOperation:
            raise ValueError(f"The {label} price '{raw}' is not a number.") from None
        if not price.is_finite() or price < 0:
            raise ValueError(f"The {label} price must be zero or more, not '{raw}'.")
        prices.append(price)
    at = at or timezone.now()
    current = (
        Tariff.objects.select_for_update().current().filter(model=model, tier=tier, completion_window=window).first()
    )
    if current is not None:
        if current.valid_from >= at:
            raise ValueError("A newer tariff already exists for this model and tier.")
        current.valid_until = at
        current.save(update_fields=["valid_until"])
    return Tariff.objects.create(
        model=model,
        tier=tier,
        completion_window=window,
        input_price=prices[0],
        output_price=prices[1],
        valid_from=at,
    )
