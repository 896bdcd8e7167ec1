"""Invariants of accounts and billing that hold whatever path a write takes."""

from __future__ import annotations

import hashlib
import re
import threading
from datetime import datetime, timedelta
from datetime import timezone as tz
from decimal import Decimal

import pytest
from django.db import IntegrityError, close_old_connections, connection, transaction
from django.db.models.deletion import ProtectedError
from django.utils import timezone

from accounts.models import AccessGroup, ApiKey, User
from accounts.services import create_api_key, hash_secret
from billing.models import AppendOnlyError, Balance, CreditTransaction, Tariff
from billing.services import (
    Usage,
    charge_usage,
    charge_usages,
    grant_credits,
    remove_credits,
    set_tariff,
    tariff_for,
)
from common.bulk import insert_rows
from gateway.accounting import LOG_COLUMNS
from gateway.models import DeployedModel, RequestLog
from gateway.services import add_endpoint, add_model


def usage(user: User, source_id: str, cost: str = "0.25") -> Usage:
    return Usage(
        user_id=user.pk,
        source_id=source_id,
        model_alias="gpt-test",
        tier="realtime",
        input_tokens=100,
        output_tokens=50,
        cost=Decimal(cost),
    )


def assert_ledger_matches_balance(user: User) -> Decimal:
    balance = Balance.objects.get(user=user).amount
    assert CreditTransaction.objects.filter(user=user).signed_total() == balance
    return balance


@pytest.fixture
def model(db) -> DeployedModel:
    endpoint, _ = add_endpoint("local", "http://127.0.0.1:9/v1")
    return add_model("gpt-test", endpoint=endpoint)


# --- the Everyone group ---------------------------------------------------------------------


def test_everyone_cannot_be_deleted_as_an_instance_or_in_a_queryset(db) -> None:
    everyone = AccessGroup.objects.everyone()
    AccessGroup.objects.create(name="research")
    with pytest.raises(ProtectedError):
        everyone.delete()
    with pytest.raises(ProtectedError):
        AccessGroup.objects.all().delete()
    assert AccessGroup.objects.count() == 2


def test_everyone_cannot_be_renamed_by_save(db) -> None:
    everyone = AccessGroup.objects.everyone()
    everyone.name = "Nobody"
    with pytest.raises(IntegrityError), transaction.atomic():
        everyone.save()
    assert AccessGroup.objects.filter(is_builtin=True).get().name == "Everyone"


def test_everyone_cannot_be_renamed_by_a_queryset_update(db) -> None:
    AccessGroup.objects.everyone()
    with pytest.raises(IntegrityError), transaction.atomic():
        AccessGroup.objects.filter(is_builtin=True).update(name="Nobody")
    assert AccessGroup.objects.filter(is_builtin=True).get().name == "Everyone"


def test_other_groups_can_be_renamed_and_deleted(db) -> None:
    group = AccessGroup.objects.create(name="research")
    AccessGroup.objects.filter(pk=group.pk).update(name="science")
    AccessGroup.objects.filter(name="science").delete()
    assert not AccessGroup.objects.filter(is_builtin=False).exists()


# --- API key secrets ------------------------------------------------------------------------


def test_an_api_key_secret_is_never_stored_in_clear(user_with_credits: User) -> None:
    api_key, secret = create_api_key(user_with_credits, name="ci")
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{43}", secret)
    assert api_key.secret_hash == hashlib.sha256(secret.encode()).hexdigest() == hash_secret(secret)
    row = ApiKey.objects.filter(pk=api_key.pk).values().get()
    for name, value in row.items():
        assert secret not in str(value), name
    assert secret.startswith(row["prefix"]) and len(row["prefix"]) < 16


def test_two_api_keys_never_share_a_secret(user_with_credits: User) -> None:
    secrets = {create_api_key(user_with_credits)[1] for _ in range(20)}
    assert len(secrets) == 20
    assert ApiKey.objects.values("secret_hash").distinct().count() == 20


# --- the append-only ledger -----------------------------------------------------------------


def test_ledger_rows_cannot_be_updated_or_deleted(user_with_credits: User) -> None:
    entry = CreditTransaction.objects.get(user=user_with_credits)
    entry.amount = Decimal(1_000_000)
    with pytest.raises(AppendOnlyError):
        entry.save()
    with pytest.raises(AppendOnlyError):
        entry.delete()
    with pytest.raises(AppendOnlyError):
        CreditTransaction.objects.filter(pk=entry.pk).update(amount=Decimal(1))
    with pytest.raises(AppendOnlyError):
        CreditTransaction.objects.all().delete()
    entry.refresh_from_db()
    assert entry.amount == 100


def test_a_ledger_amount_must_be_positive_in_the_database(user_with_credits: User) -> None:
    with pytest.raises(IntegrityError), transaction.atomic():
        CreditTransaction.objects.create(user=user_with_credits, kind="usage", amount=Decimal(-1), source_id="x")


def test_charging_the_same_source_twice_charges_once(user_with_credits: User) -> None:
    first = charge_usage(usage(user_with_credits, "req-1"))
    second = charge_usage(usage(user_with_credits, "req-1"))
    assert first is not None and second is None
    assert CreditTransaction.objects.filter(source_id="req-1").count() == 1
    assert assert_ledger_matches_balance(user_with_credits) == Decimal("99.75")


def test_a_free_request_writes_no_ledger_row(user_with_credits: User) -> None:
    assert charge_usage(usage(user_with_credits, "req-free", cost="0")) is None
    assert not CreditTransaction.objects.filter(source_id="req-free").exists()


def test_grants_and_removals_keep_the_ledger_total_equal_to_the_balance(
    user_with_credits: User, user_without_credits: User, admin_user: User
) -> None:
    grant_credits(user_without_credits, "10", created_by=admin_user)
    remove_credits(user_without_credits, "12.5", description="refund reversal")
    grant_credits(user_with_credits, Decimal("0.000000001"))
    remove_credits(user_with_credits, 40)
    charge_usage(usage(user_with_credits, "req-2", cost="0.123456789"))
    assert assert_ledger_matches_balance(user_without_credits) == Decimal("-2.5")
    assert assert_ledger_matches_balance(user_with_credits) == Decimal("59.876543212")


def test_a_grant_with_a_repeated_source_is_posted_once(user_without_credits: User) -> None:
    grant_credits(user_without_credits, 5, source_id="purchase:abc", kind="purchase")
    assert grant_credits(user_without_credits, 5, source_id="purchase:abc", kind="purchase") is None
    assert assert_ledger_matches_balance(user_without_credits) == 5


@pytest.mark.parametrize("amount", ["0", "-1", "abc", "1e20", "0.0000000001"])
def test_bad_amounts_are_refused_before_anything_is_written(user_with_credits: User, amount: str) -> None:
    with pytest.raises(ValueError):
        grant_credits(user_with_credits, amount)
    with pytest.raises(ValueError):
        remove_credits(user_with_credits, amount)
    assert CreditTransaction.objects.filter(user=user_with_credits).count() == 1
    assert assert_ledger_matches_balance(user_with_credits) == 100


# --- tariffs --------------------------------------------------------------------------------


def test_a_price_change_keeps_the_old_price_for_old_requests(model: DeployedModel) -> None:
    start = timezone.now() - timedelta(days=2)
    set_tariff(model, input_price="1", output_price="2", at=start)
    change = start + timedelta(days=1)
    set_tariff(model, input_price="3", output_price="4", at=change)

    old = tariff_for(model.pk, "realtime", at=change - timedelta(seconds=1))
    new = tariff_for(model.pk, "realtime", at=change)
    assert old is not None and (old.input_price, old.output_price) == (1, 2)
    assert new is not None and (new.input_price, new.output_price) == (3, 4)
    assert tariff_for(model.pk, "realtime") == new
    assert tariff_for(model.pk, "realtime", at=start - timedelta(seconds=1)) is None
    assert Tariff.objects.filter(model=model, valid_until__isnull=True).get() == new


def test_flex_falls_back_to_the_realtime_price_until_it_has_its_own(model: DeployedModel) -> None:
    start = timezone.now() - timedelta(hours=2)
    realtime = set_tariff(model, input_price="1", output_price="2", at=start)
    assert tariff_for(model.pk, "flex") == realtime
    flex = set_tariff(model, tier="flex", input_price="0.5", output_price="1", at=start + timedelta(hours=1))
    assert tariff_for(model.pk, "flex") == flex
    assert tariff_for(model.pk, "flex", at=start + timedelta(minutes=30)) == realtime


def test_only_one_open_tariff_per_model_and_tier_exists_in_the_database(model: DeployedModel) -> None:
    set_tariff(model, input_price="1", output_price="2")
    with pytest.raises(IntegrityError), transaction.atomic():
        Tariff.objects.create(model=model, tier="realtime", input_price=1, output_price=1)


def test_a_negative_price_is_refused(model: DeployedModel) -> None:
    with pytest.raises(ValueError):
        set_tariff(model, input_price="-1", output_price="1")
    assert not Tariff.objects.exists()


# --- the bulk writer (common.bulk: COPY on PostgreSQL, executemany on SQLite) ----------------

# What a text format may take for its own: delimiters, escapes, its NULL and end-of-data markers.
AWKWARD = [
    "tab\there",
    "new\nline\r\nand return\r",
    "back\\slash \\\\ two",
    "\\N",
    "\\.",
    "'single' \"double\" `back`",
    "unicode é ✓ 🙂 中文",
    "",
    " spaced ",
    "comma,semi;pipe|",
    "\\x41 \\t not an escape",
]
# Exact to the nano-credit. SQLite keeps 15 significant digits of a decimal (it stores a REAL):
# the full 24 only on PostgreSQL.
EXACT = [Decimal("0.000000001"), Decimal("0.1"), Decimal("123456.123456789"), Decimal("0.999999999"), Decimal("1E-9")]
EXACT_24 = [Decimal("123456789012345.123456789"), Decimal("99999999999999.999999999")]


def exact_amounts() -> list[Decimal]:
    return EXACT + EXACT_24 if connection.vendor == "postgresql" else EXACT


def log_row(n: int, text: str, cost: Decimal | None) -> tuple[object, ...]:
    values = {
        "request_id": f"req_bulk_{n}",
        "user_id": None,
        "api_key_id": None,
        "model_alias": text,
        "path": text[:100],
        "service_tier": "realtime",
        "status_code": 200,
        "latency_ms": 1234.5678901234,
        "ttfb_ms": None if n % 2 else 0.1,
        "input_tokens": None if n % 3 else 2**31 - 1,
        "output_tokens": 0,
        "cost": cost,
        "usage_estimated": bool(n % 2),
        "client_request_id": text * 3,
        "error_code": text[:64],
        "key_prefix": text[:16],
        "client_ip": [None, "10.0.0.1", "2001:db8::1"][n % 3],
        # Aware, not UTC, to the microsecond.
        "created_at": datetime(2026, 12, 2, 9, 30, 15, n, tzinfo=tz(timedelta(hours=5, minutes=30))),
    }
    return tuple(values[column] for column in LOG_COLUMNS)


@pytest.mark.parametrize("skip_conflicts", [False, True])
def test_bulk_rows_keep_awkward_text_exact_decimals_aware_times_and_nulls(db, skip_conflicts: bool) -> None:
    costs = [*exact_amounts(), None]
    rows = [log_row(n, text, costs[n % len(costs)]) for n, text in enumerate(AWKWARD)]

    insert_rows(RequestLog, LOG_COLUMNS, rows, skip_conflicts=skip_conflicts)

    stored = RequestLog.objects.values_list(*LOG_COLUMNS)
    assert sorted(stored) == sorted(rows)
    assert all(row[-1].tzinfo is not None for row in stored)


def test_charges_keep_their_exact_amounts_and_awkward_descriptions(user_with_credits: User) -> None:
    costs = exact_amounts()
    usages = [
        Usage(
            user_id=user_with_credits.pk,
            source_id=f"req-exact-{n}",
            model_alias=AWKWARD[n],
            tier="realtime",
            input_tokens=n,
            output_tokens=1,
            cost=cost,
        )
        for n, cost in enumerate(costs)
    ]

    charge_usages(usages)

    stored = CreditTransaction.objects.filter(kind="usage").values_list("source_id", "amount", "description")
    assert sorted(stored) == sorted(
        (u.source_id, u.cost, f"{u.model_alias}: {u.input_tokens} in / 1 out") for u in usages
    )
    assert assert_ledger_matches_balance(user_with_credits) == Decimal(100) - sum(costs)


@pytest.mark.django_db(transaction=True)
def test_rows_skipping_conflicts_are_written_outside_a_transaction_too() -> None:
    # No transaction of the caller's: what is staged on the way in must not be dropped by a commit.
    rows = [log_row(n, "autocommit", Decimal("0.5")) for n in range(3)]
    insert_rows(RequestLog, LOG_COLUMNS, rows, skip_conflicts=True)
    insert_rows(RequestLog, LOG_COLUMNS, [*rows, log_row(3, "autocommit", None)], skip_conflicts=True)
    assert RequestLog.objects.filter(model_alias="autocommit").count() == 4


# --- concurrency ----------------------------------------------------------------------------

THREADS = 8
CHARGES_PER_THREAD = 25


@pytest.mark.django_db(transaction=True)
def test_concurrent_charges_and_grants_keep_the_ledger_equal_to_the_balance_and_post_each_source_once() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("SQLite serialises every writer: concurrent charging needs PostgreSQL (set DATABASE_URL)")
    alice = User.objects.create(username="alice")
    grant_credits(alice, 100)
    cost = Decimal("0.010000001")
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def charge(thread: int) -> None:
        try:
            start.wait()
            for i in range(CHARGES_PER_THREAD):
                # Threads pair up on the same request ids: every source is charged by two threads.
                charge_usage(usage(alice, f"req-{thread // 2}-{i}", cost=str(cost)))
            grant_credits(alice, 1, source_id=f"purchase:{thread // 2}", kind="purchase")
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=charge, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    close_old_connections()
    assert not errors, errors
    sources = THREADS // 2 * CHARGES_PER_THREAD
    usage_rows = CreditTransaction.objects.filter(user=alice, kind="usage")
    assert usage_rows.count() == sources
    assert usage_rows.values("source_id").distinct().count() == sources
    assert CreditTransaction.objects.filter(user=alice, kind="purchase").count() == THREADS // 2
    assert assert_ledger_matches_balance(alice) == 100 + THREADS // 2 - sources * cost
