"""The management API's money and records: credit grants and removals land in the append-only ledger with
the balance moved in step, idempotently; balances; usage added up and the request log, filtered and paged."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from accounts.models import Purpose
from accounts.services import create_api_key
from billing.models import Balance, CreditTransaction, TransactionKind
from gateway.models import RequestLog
from tests.conftest import HELLO, REALTIME_COST, settle
from tests.management_client import ManagementClient, error_of

pytestmark = pytest.mark.django_db


def balance_of(user) -> Decimal:  # type: ignore[no-untyped-def]
    return Balance.objects.get(user=user).amount


# --- credits --------------------------------------------------------------------------------


def test_a_grant_is_one_ledger_entry_and_moves_the_balance(api, user_with_credits, admin_user):
    response = api.post(
        f"/users/{user_with_credits.pk}/credit-grants", {"amount": "0.000000001", "description": "top-up"}
    )
    assert response.status_code == 201
    body = response.json()
    assert body["balance"] == "100.000000001"
    assert (body["transaction"]["kind"], body["transaction"]["amount"], body["transaction"]["signed_amount"]) == (
        "admin_grant",
        "0.000000001",
        "0.000000001",
    )
    entry = CreditTransaction.objects.get(pk=body["transaction"]["id"])
    assert (entry.description, entry.created_by_id) == ("top-up", admin_user.pk)  # who granted it is on record
    assert balance_of(user_with_credits) == Decimal("100.000000001")
    assert CreditTransaction.objects.filter(user=user_with_credits).signed_total() == balance_of(user_with_credits)


def test_a_removal_may_take_the_balance_below_zero(api, user_with_credits):
    response = api.post(f"/users/{user_with_credits.pk}/credit-removals", {"amount": "150"})
    assert response.status_code == 201
    assert response.json()["transaction"]["signed_amount"] == "-150"
    assert response.json()["balance"] == "-50"
    assert balance_of(user_with_credits) == Decimal(-50)
    kinds = list(CreditTransaction.objects.filter(user=user_with_credits).values_list("kind", flat=True))
    assert sorted(kinds) == [TransactionKind.ADMIN_GRANT, TransactionKind.ADMIN_REMOVAL]


def test_the_same_idempotency_key_posts_once(api, user_with_credits):
    body = {"amount": "10", "idempotency_key": "invoice-42"}
    first = api.post(f"/users/{user_with_credits.pk}/credit-grants", body)
    again = api.post(f"/users/{user_with_credits.pk}/credit-grants", body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["transaction"]["id"] == again.json()["transaction"]["id"]
    assert balance_of(user_with_credits) == Decimal(110)
    assert CreditTransaction.objects.filter(user=user_with_credits).count() == 2  # the persona's, and this one


def test_an_idempotency_key_used_for_another_amount_is_a_409(api, user_with_credits):
    api.post(f"/users/{user_with_credits.pk}/credit-grants", {"amount": "10", "idempotency_key": "k"})
    response = api.post(f"/users/{user_with_credits.pk}/credit-grants", {"amount": "11", "idempotency_key": "k"})
    assert response.status_code == 409
    assert error_of(response)["param"] == "idempotency_key"
    assert balance_of(user_with_credits) == Decimal(110)


@pytest.mark.parametrize("amount", ["0", "-5", "abc", "1e400", 0.1])
def test_a_bad_amount_is_a_400_and_posts_nothing(api, user_with_credits, amount):
    response = api.post(f"/users/{user_with_credits.pk}/credit-removals", {"amount": amount})
    if amount == 0.1:  # a JSON number is taken as written: 0.1, not the float's binary neighbour
        assert response.status_code == 201
        assert balance_of(user_with_credits) == Decimal("99.9")
        return
    assert response.status_code == 400
    assert error_of(response)["param"] == "amount"
    assert CreditTransaction.objects.filter(user=user_with_credits).count() == 1


def test_credits_for_an_unknown_user_are_a_404(api):
    assert api.post("/users/999999/credit-grants", {"amount": "1"}).status_code == 404


def test_the_ledger_and_balances_are_listed(api, user_with_credits, user_without_credits):
    api.post(f"/users/{user_with_credits.pk}/credit-removals", {"amount": "30"})
    ledger = api.get(f"/users/{user_with_credits.pk}/transactions").json()
    assert [(row["kind"], row["signed_amount"]) for row in ledger["items"]] == [
        ("admin_removal", "-30"),
        ("admin_grant", "100"),
    ]
    assert api.get(f"/users/{user_with_credits.pk}/transactions", kind="admin_grant").json()["count"] == 1
    assert api.get(f"/users/{user_with_credits.pk}/balance").json()["balance"] == "70"
    never = api.get(f"/users/{user_without_credits.pk}/balance").json()
    assert (never["balance"], never["updated_at"]) == ("0", None)
    listed = {row["username"]: row["balance"] for row in api.get("/balances").json()["items"]}
    assert listed == {"admin": "0", "alice": "70", "bob": "0"}


# --- usage and the request log --------------------------------------------------------------


@pytest.fixture
def logs(user_with_credits, outsider):  # type: ignore[no-untyped-def]
    """A day ago: alice's two paid calls on gpt-a (one estimated); now: a refusal and mallory's call on gpt-b."""
    key, _ = create_api_key(user_with_credits, name="ci")
    now = timezone.now()
    rows = [
        ("req_1", user_with_credits, key, "gpt-a", 200, "", 10, 20, "0.5", now - timedelta(days=1)),
        ("req_2", user_with_credits, key, "gpt-a", 200, "", 5, 5, "0.25", now - timedelta(days=1)),
        ("req_3", None, None, "gpt-a", 401, "invalid_api_key", None, None, None, now),
        ("req_4", outsider, None, "gpt-b", 429, "rate_limit_exceeded", None, None, None, now),
        ("req_5", outsider, None, "gpt-b", 200, "", 100, 0, "2", now),
    ]
    for request_id, user, api_key, alias, status, code, tokens_in, tokens_out, cost, at in rows:
        RequestLog.objects.create(
            request_id=request_id,
            user=user,
            api_key=api_key,
            key_prefix=api_key.prefix if api_key else "",
            model_alias=alias,
            path="chat/completions",
            service_tier="flex" if request_id == "req_2" else "realtime",
            status_code=status,
            error_code=code,
            latency_ms=1.0,
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            cost=Decimal(cost) if cost else None,
            created_at=at,
        )
    return key


def test_usage_is_added_up_by_model_dearest_first(api, logs):
    report = api.get("/usage", group_by="model").json()
    assert report["totals"] == {
        "requests": 5,
        "errors": 2,
        "input_tokens": 115,
        "output_tokens": 25,
        "cost": "2.75",
    }
    assert [(g["model"], g["requests"], g["errors"], g["cost"]) for g in report["groups"]] == [
        ("gpt-b", 2, 1, "2"),
        ("gpt-a", 3, 1, "0.75"),
    ]


def test_usage_is_added_up_by_user_key_and_day(api, logs, user_with_credits):
    by_user = api.get("/usage", group_by="user").json()["groups"]
    assert {(g.get("username"), g["requests"]) for g in by_user} == {("mallory", 2), ("alice", 2), (None, 1)}
    by_key = api.get("/usage", group_by="key", user_id=user_with_credits.pk).json()["groups"]
    assert [(g["key_id"], g["key_prefix"], g["requests"], g["cost"]) for g in by_key] == [
        (logs.pk, logs.prefix, 2, "0.75")
    ]
    by_day = api.get("/usage", group_by="day").json()["groups"]
    today, yesterday = timezone.now().date(), (timezone.now() - timedelta(days=1)).date()
    assert [(g["day"], g["requests"]) for g in by_day] == [(yesterday.isoformat(), 2), (today.isoformat(), 3)]


def test_usage_keeps_to_its_period(api, logs):
    since = (timezone.now() - timedelta(hours=1)).isoformat()
    assert api.get("/usage", since=since).json()["totals"]["requests"] == 3
    refused = api.get("/usage", since=since, until=since)
    assert refused.status_code == 400
    assert "since must be before until" in error_of(refused)["message"]


def test_the_request_log_is_filtered(api, logs, outsider):
    def ids(**filters: object) -> list[str]:
        return [row["request_id"] for row in api.get("/requests", **filters).json()["items"]]

    assert ids() == ["req_5", "req_4", "req_3", "req_2", "req_1"]
    assert ids(status="4xx") == ["req_4", "req_3"]
    assert ids(status="429") == ["req_4"]
    assert ids(error_code="invalid_api_key") == ["req_3"]
    assert ids(model="gpt-b") == ["req_5", "req_4"]
    assert ids(user_id=outsider.pk) == ["req_5", "req_4"]
    assert ids(key_id=logs.pk) == ["req_2", "req_1"]
    assert ids(key_prefix=logs.prefix, tier="flex") == ["req_2"]
    assert ids(until=(timezone.now() - timedelta(hours=1)).isoformat()) == ["req_2", "req_1"]


def test_the_request_log_pages_by_cursor_without_losing_a_row(api, logs):
    seen: list[str] = []
    page = api.get("/requests", page_size=2).json()
    while True:
        seen += [row["request_id"] for row in page["items"]]
        if not page["next"]:
            break
        page = api.client.get(page["next"], headers=api.headers).json()
    assert seen == ["req_5", "req_4", "req_3", "req_2", "req_1"]


@pytest.mark.django_db(transaction=True)
def test_a_call_through_the_gateway_shows_in_the_request_log_and_usage(world, admin_user, user_with_credits):
    gateway_key, secret = create_api_key(user_with_credits, name="app")
    world.client(secret).chat.completions.create(model="gpt-test", messages=HELLO)
    settle()
    api = ManagementClient(create_api_key(admin_user, purpose=Purpose.PLATFORM)[1])
    (row,) = api.get("/requests", key_id=gateway_key.pk).json()["items"]
    assert (row["model"], row["status_code"], row["input_tokens"], row["output_tokens"]) == ("gpt-test", 200, 12, 30)
    assert Decimal(row["cost"]) == REALTIME_COST
    usage = api.get("/usage", group_by="user", user_id=user_with_credits.pk).json()
    assert Decimal(usage["totals"]["cost"]) == REALTIME_COST
    ledger = api.get(f"/users/{user_with_credits.pk}/transactions", kind="usage").json()["items"]
    assert [Decimal(entry["amount"]) for entry in ledger] == [REALTIME_COST]
